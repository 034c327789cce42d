"""lora_jax.plot: the plotted data equals the report, PNGs are written, and a
missing matplotlib gives an actionable error."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

pytest.importorskip("matplotlib")
from lora_jax import plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report(rng, stacked=3):
    g = np.random.default_rng(np.asarray(jax.random.key_data(rng)).tolist())
    a = jnp.asarray(g.standard_normal((stacked, 20, 5)), jnp.float32)
    b = jnp.asarray(g.standard_normal((stacked, 5, 16)), jnp.float32)
    ad = {"w": lj.LoraWeights(a, b, jnp.float32(2.0)),
          "u": lj.LoraWeights(a[0], b[0] * 0, jnp.float32(1.0))}    # untrained: all zero
    cfg = lj.LoraConfig(rank=5, targets="w|u", layouts={"w": lj.Layout(1, 1, 1)})
    return lj.analyze(None, ad, cfg)


def test_spectra_png_and_data(rng, tmp_path):
    rep = _report(rng)
    file = tmp_path / "spectra.png"
    fig = plot.spectra(rep, file=file)
    assert file.read_bytes()[:8] == PNG_MAGIC
    ax_s, ax_e = fig.axes
    assert len(ax_s.lines) == len(rep) == 4 and ax_s.get_yscale() == "log"
    for line, row in zip(ax_s.lines, rep):
        np.testing.assert_array_equal(line.get_ydata(), row.singular_values)
    for line, row in zip(ax_e.lines, rep):
        np.testing.assert_allclose(line.get_ydata(), row.energy)
    labels = [t.get_text() for t in ax_e.get_legend().get_texts()]
    assert labels == ["u", "w [0]", "w [1]", "w [2]"]


def test_truncation_error_marks_kept_rank(rng, tmp_path):
    """After extraction, the curve is the reference error and the kept rank is marked."""
    g = np.random.default_rng(np.asarray(jax.random.key_data(rng)).tolist())
    base = {"w": jnp.zeros((60, 40))}
    dw = g.standard_normal((60, 6)) @ g.standard_normal((6, 40)) \
        + 0.01 * g.standard_normal((60, 40))
    cfg = lj.LoraConfig(rank=6, targets="w")
    _, rep = lj.extract(base, {"w": jnp.asarray(dw, jnp.float32)}, cfg)
    file = tmp_path / "err.png"
    fig = plot.truncation_error(rep, file=file, paths="w")
    assert file.read_bytes()[:8] == PNG_MAGIC
    curve, marker = fig.axes[0].lines
    s = np.linalg.svd(dw, compute_uv=False)
    ref = [np.linalg.norm(s[k:]) / np.linalg.norm(s) for k in range(41)]
    np.testing.assert_allclose(curve.get_ydata(), ref, atol=1e-5)
    assert list(marker.get_xdata()) == [6]
    assert marker.get_ydata()[0] == pytest.approx(ref[6], abs=1e-5)


def test_many_lines_drop_legend(rng):
    rep = _report(rng, stacked=14)
    fig = plot.spectra(rep)
    assert fig.axes[-1].get_legend() is None and len(fig.axes[0].lines) == 15


def test_plot_errors(rng, monkeypatch):
    rep = _report(rng)
    with pytest.raises(ValueError, match=r"paths \['nope'\] are not in the report"):
        plot.spectra(rep, paths=["nope"])
    with pytest.raises(TypeError, match="expected an Analysis"):
        plot.truncation_error([1, 2])
    with pytest.raises(ValueError, match="nothing to plot"):
        plot.spectra([])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'lora-jax\[plot\]'"):
        plot.spectra(rep)
