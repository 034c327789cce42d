"""Plots of adapter spectra (needs the ``plot`` extra: ``pip install 'lora-jax[plot]'``).

Both functions take what `lj.analyze`, `lj.truncate` or `lj.extract` report
(an `Analysis`, or any iterable of `Spectrum` rows), return a matplotlib
``Figure`` and, given ``file``, write it as a PNG. They draw on a bare
``Figure`` (no pyplot), so they never touch the global backend or open a
window.

Example:
  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> from lora_jax import plot
  >>> k1, k2 = jax.random.split(jax.random.key(0))
  >>> ad = {"w": lj.LoraWeights(jax.random.normal(k1, (32, 4)),
  ...                           jax.random.normal(k2, (4, 16)), jnp.float32(1.0))}
  >>> fig = plot.spectra(lj.analyze(None, ad, lj.LoraConfig(rank=4, targets="w")))
  >>> [ax.get_title() for ax in fig.axes]
  ['singular values', 'cumulative energy']
"""

from __future__ import annotations

import os

import numpy as np

from lora_jax._analysis.spectrum import Spectrum
from lora_jax._core.errors import error

__all__ = ["spectra", "truncation_error"]

_MAX_LEGEND = 12


def _figure(ncols: int):
    # matplotlib is an optional extra: imported when a plot is drawn, so that
    # `lora_jax.plot` imports without it and the error below says how to get it.
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise error("lora_jax.plot", "it needs matplotlib, which is not installed",
                    "pip install 'lora-jax[plot]' (or pip install matplotlib)",
                    kind=ImportError) from None
    return Figure(figsize=(5.0 * ncols, 3.8), layout="constrained")


def _rows(where: str, report, paths) -> list:
    rows = list(report)
    bad = [type(r).__name__ for r in rows if not isinstance(r, Spectrum)]
    if bad:
        raise error(where, f"expected an Analysis (from lj.analyze / lj.truncate / lj.extract) "
                    f"or Spectrum rows; got elements of type {bad[0]}",
                    f"pass the report, e.g. {where}(lj.analyze(None, adapters, config))",
                    kind=TypeError)
    if paths is not None:
        wanted = {paths} if isinstance(paths, str) else set(paths)
        known = sorted({r.path for r in rows})
        missing = sorted(wanted - set(known))
        if missing:
            raise error(where, f"paths {missing} are not in the report; it has {known[:8]}"
                        f"{' ...' if len(known) > 8 else ''}",
                        "pass paths= among these, or leave paths out to plot every leaf")
        rows = [r for r in rows if r.path in wanted]
    if not rows:
        raise error(where, "nothing to plot: the report has no spectra",
                    "pass the report of adapters that hold LoraWeights, e.g. "
                    "lj.analyze(None, adapters, config)")
    return rows


def _label(row) -> str:
    return row.path + (f" [{','.join(map(str, row.layer))}]" if row.layer else "")


def _colors(n: int):
    from matplotlib import colormaps  # optional extra; `_figure` has checked it is there
    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _finish(fig, axes, n, file):
    if n <= _MAX_LEGEND:
        axes[-1].legend(fontsize="x-small")
    if file is not None:
        fig.savefig(os.fspath(file), format="png", dpi=110)
    return fig


def spectra(report, *, file=None, paths=None):
    """Per-layer singular values (log scale) and cumulative energy.

    One line per layer of each leaf; dashed lines at 90% and 99% energy.

    Args:
      report: an `Analysis` or an iterable of `Spectrum` rows.
      file: where to write the PNG (optional).
      paths: only these leaf paths (a str or a collection).

    Returns:
      The matplotlib ``Figure``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from lora_jax import plot
      >>> ad = {"w": lj.LoraWeights(jnp.eye(6, 3), jnp.diag(jnp.array([3.0, 2.0, 1.0])),
      ...                           jnp.float32(1.0))}
      >>> fig = plot.spectra(lj.analyze(None, ad, lj.LoraConfig(rank=3, targets="w")))
      >>> fig.axes[0].lines[0].get_ydata().tolist()
      [3.0, 2.0, 1.0]
    """
    rows = _rows("lj.plot.spectra", report, paths)
    fig = _figure(2)
    ax_s, ax_e = fig.subplots(1, 2)
    for row, c in zip(rows, _colors(len(rows)), strict=True):
        k = np.arange(1, len(row.singular_values) + 1)
        ax_s.plot(k, row.singular_values, marker=".", color=c, label=_label(row))
        ax_e.plot(k, row.energy, marker=".", color=c, label=_label(row))
    if any(np.any(r.singular_values > 0) for r in rows):
        ax_s.set_yscale("log")
    ax_s.set(title="singular values", xlabel="index", ylabel="singular value")
    for f in (0.9, 0.99):
        ax_e.axhline(f, color="grey", linestyle="--", linewidth=0.8)
    ax_e.set(title="cumulative energy", xlabel="rank k", ylabel="energy in top k",
             ylim=(0, 1.02))
    return _finish(fig, (ax_s, ax_e), len(rows), file)


def truncation_error(report, *, file=None, paths=None):
    """Relative reconstruction error of the best rank-k approximation vs k.

    ``||dW - dW_k||_F / ||dW||_F`` for ``k = 0 .. len(singular_values)``, one
    line per layer of each leaf; a marker at the rank a truncation or
    extraction kept. An elbow at the true rank shows how low the update's
    intrinsic rank is.

    Args:
      report: an `Analysis` or an iterable of `Spectrum` rows.
      file: where to write the PNG (optional).
      paths: only these leaf paths (a str or a collection).

    Returns:
      The matplotlib ``Figure``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from lora_jax import plot
      >>> ad = {"w": lj.LoraWeights(jnp.eye(6, 2), jnp.eye(2, 5), jnp.float32(1.0))}
      >>> fig = plot.truncation_error(lj.analyze(None, ad, lj.LoraConfig(rank=2, targets="w")))
      >>> [round(float(e), 4) for e in fig.axes[0].lines[0].get_ydata()]
      [1.0, 0.7071, 0.0]
    """
    rows = _rows("lj.plot.truncation_error", report, paths)
    fig = _figure(1)
    ax = fig.subplots(1, 1)
    for row, c in zip(rows, _colors(len(rows)), strict=True):
        k = np.arange(0, len(row.singular_values) + 1)
        err = np.array([row.error_at(int(i)) for i in k])
        ax.plot(k, err, marker=".", color=c, label=_label(row))
        if row.rank_kept is not None:
            ax.plot([row.rank_kept], [row.error_at(row.rank_kept)], marker="o",
                    markersize=9, markerfacecolor="none", color=c)
    ax.set(title="reconstruction error vs rank", xlabel="rank k",
           ylabel="||dW - dW_k|| / ||dW||", ylim=(0, 1.02))
    return _finish(fig, (ax,), len(rows), file)
