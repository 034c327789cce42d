"""Looking at trained adapters: `analyze` (spectra, effective rank) and `truncate`.

Both look at the update ``dW = scale * a @ b`` of each adapted weight as an
``(in, out)`` matrix (per layer of a stacked leaf), from its factors
(`factor_svd`), and report through `Analysis`:

* `analyze` gives its singular values, without forming the ``in x out``
  matrix;
* `truncate` re-factorizes an adapter at a lower rank, keeping the best
  rank-k approximation of ``dW`` exactly.

`spectra_summary` is the table ``python -m lora_jax inspect`` prints.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from lora_jax._analysis.spectrum import Analysis, Spectrum, as_float64, factor_svd
from lora_jax._checkpoint.api import restore
from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.leaf import as_matrix, dense_float32
from lora_jax._core.weights import (
    LoraWeights,
    check_adapters,
    flatten_adapters,
    is_lora,
    map_adapters,
)

__all__ = ["Truncation", "analyze", "truncate", "spectra_summary"]


def _lora_nodes(where: str, adapters, config: LoraConfig, params=None):
    """``[(path, node, w_or_None, spec_or_None)]`` for the LoraWeights of ``adapters``.

    Without params, checks that a and b fit each other and the config's rank.
    ``where`` is the calling function, as errors name it (``lj.analyze``).
    """
    if not isinstance(config, LoraConfig):
        raise error(where, f"expected a lj.LoraConfig as config, got {type(config).__name__}",
                    "pass the config the adapters were made with", kind=TypeError)
    if params is not None:
        return [(p, n, leaf, spec) for p, leaf, n, spec in
                check_adapters(params, adapters, config) if is_lora(n)]
    out = []
    for path, node in flatten_adapters(adapters)[0]:
        if not is_lora(node):
            continue  # None (frozen) or a fully-trained leaf
        sa, sb = tuple(np.shape(node.a)), tuple(np.shape(node.b))
        if len(sa) < 2 or len(sa) != len(sb) or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
            raise error(
                path, f"a {sa} and b {sb} do not form a LoRA pair; expected a "
                f"(*stacked, in, r) and b (*stacked, r, out)",
                "pass adapters made by lj.init (or restored with their config)")
        if sa[-1] != config.rank_for(path):
            raise error(
                path, f"the adapter has rank {sa[-1]} but the config gives rank "
                f"{config.rank_for(path)} for this path",
                "pass the config the adapters were made with (after lj.truncate, the config "
                "it returned)")
        out.append((path, node, None, None))
    if not out:
        raise error(
            where, "the adapter tree holds no LoraWeights (only None / fully-trained leaves)",
            "pass the tree returned by lj.init, lj.truncate, lj.extract or lj.restore")
    return out


def _base_norms(leaf, spec, lead: tuple) -> np.ndarray:
    """``||W||_F`` per stacked layer, broadcast over an adapter set's extra axis."""
    w = as_matrix(dense_float32(leaf), spec).reshape(*spec.stacked_shape, -1)
    return np.broadcast_to(as_float64(jnp.linalg.norm(w, axis=-1)), lead)


def analyze(params, adapters, config: LoraConfig) -> Analysis:
    """Singular values and effective rank of every adapter's update.

    For each `LoraWeights` leaf (each layer of a stacked leaf, each adapter
    of an adapter set), the singular values of ``dW = scale * a @ b`` are
    computed in float64 from the factors: QR of ``a`` and of ``b.T``, then
    the SVD of the ``r x r`` core. The ``in x out`` matrix is never formed.
    Fully-trained and frozen leaves are skipped.

    Each `Spectrum` row reports the ``r`` singular values, ``||dW||_F``, the
    ranks holding 90% and 99% of the energy ``sum(s**2)``, and the entropy
    effective rank of Roy & Vetterli (2007); with ``params``, also
    ``||dW||_F / ||W||_F``. An untrained adapter (B = 0) has all of them 0.

    Args:
      params: the frozen params (float or quantized), or None: with them the
        report adds ``||dW|| / ||W||`` and the adapters are checked against
        them.
      adapters: an adapter tree (`lj.init`, `lj.restore`, `truncate`, ...);
        float32 or bfloat16 factors.
      config: the `LoraConfig` the adapters were made with.

    Returns:
      An `Analysis`: ``str`` is a table; ``.spectra`` the rows.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.ones((4, 3))}
      >>> cfg = lj.LoraConfig(rank=2, alpha=2, targets="w")   # scale 1
      >>> b = jnp.array([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> ad = {"w": lj.LoraWeights(jnp.eye(4, 2), b, jnp.float32(1.0))}
      >>> rep = lj.analyze(params, ad, cfg)
      >>> rep.spectra[0].singular_values
      array([3., 1.])
      >>> print(rep)  # doctest: +NORMALIZE_WHITESPACE
      path  layer  in x out  n_sv  |dW|  |dW|/|W|  r90  r99  erank
      ----  -----  --------  ----  ----  --------  ---  ---  -----
      w     -           4x3     2  3.16     0.913    1    2   1.75
    """
    if isinstance(adapters, LoraConfig):
        raise error(
            "lj.analyze", "the arguments are (params, adapters, config) since lora_jax 0.2, "
            "like lj.merge; got a LoraConfig as adapters",
            "lj.analyze(params, adapters, config), or lj.analyze(None, adapters, config) "
            "without the base", kind=TypeError)
    rows = []
    for path, node, leaf, spec in _lora_nodes("lj.analyze", adapters, config, params):
        lead = tuple(np.shape(node.a)[:-2])
        shape = (int(np.shape(node.a)[-2]), int(np.shape(node.b)[-1]))
        _, s, _ = factor_svd(node, path=path)
        norms = _base_norms(leaf, spec, lead) if leaf is not None else None
        for idx in np.ndindex(*lead):
            rows.append(Spectrum(path, tuple(int(i) for i in idx), shape, s[idx],
                                 base_norm=None if norms is None else float(norms[idx])))
    return Analysis(tuple(rows))


# ----------------------------------------------------------------------------- truncate


class Truncation(NamedTuple):
    """What `truncate` returns: ``adapters, config, report = lj.truncate(...)``."""

    adapters: Any
    config: LoraConfig
    report: Analysis


def truncate(adapters, config: LoraConfig, *, rank: int | None = None,
             energy: float | None = None) -> Truncation:
    """Lower-rank adapters holding the best rank-k approximation of each update.

    For each `LoraWeights` leaf the SVD of ``dW = scale * a @ b`` is taken
    from the factors (as in `analyze`) and its top ``k`` directions are kept,
    so ``dW_k`` is exactly the best rank-k approximation (Eckart-Young).
    ``rank=k`` keeps at most ``k`` (leaves already at or below ``k`` are
    returned unchanged); ``energy=f`` keeps, per leaf, the smallest rank
    holding a fraction ``f`` of ``||dW||_F**2`` in *every* stacked layer
    (a stacked leaf has one rank for all its layers).

    Scale semantics: ``alpha`` is kept and the rank changes, so the new scale
    is ``alpha / k`` (``alpha / sqrt(k)`` with rsLoRA), as the returned config
    computes it; the singular values are split evenly between the new
    factors, ``a = U sqrt(S / scale)``, ``b = sqrt(S / scale) V^T``. Use the
    returned config with the returned adapters (`lj.merge`, `lj.save`): it
    sets the new ranks (``rank``, or exact-path ``rank_pattern`` entries).
    Factors keep their dtype; fully-trained leaves are passed through.

    Args:
      adapters: an adapter tree.
      config: the `LoraConfig` the adapters were made with.
      rank: keep at most this rank. Exactly one of ``rank`` and ``energy``.
      energy: keep this fraction of the energy, in ``(0, 1]``.

    Returns:
      ``Truncation(adapters, config, report)``; the report (an `Analysis`)
      lists per layer the rank kept, the energy kept and the relative error.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((16, 8))}
      >>> cfg = lj.LoraConfig(rank=4, alpha=8, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(0))
      >>> ad = {"w": ad["w"]._replace(b=jax.random.normal(jax.random.key(1), (4, 8)))}
      >>> small, cfg2, report = lj.truncate(ad, cfg, rank=2)
      >>> small["w"].a.shape, cfg2.rank, float(small["w"].scale)   # alpha 8 / rank 2
      ((16, 2), 2, 4.0)
      >>> dw = lj.merge(params, ad, cfg)["w"]
      >>> u, s, vt = jnp.linalg.svd(dw)
      >>> best = (u[:, :2] * s[None, :2]) @ vt[:2]
      >>> bool(jnp.allclose(lj.merge(params, small, cfg2)["w"], best, atol=1e-5))
      True
    """
    if (rank is None) == (energy is None):
        raise error("lj.truncate", f"it needs exactly one of rank=k or energy=f; got "
                    f"rank={rank!r}, energy={energy!r}",
                    "e.g. lj.truncate(adapters, config, rank=4) or energy=0.99")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer))
                             or rank < 1):
        raise error("lj.truncate", f"rank={rank!r} must be a positive int", "e.g. rank=4")
    if energy is not None and (isinstance(energy, bool) or
                               not isinstance(energy, (int, float, np.floating))
                               or not 0.0 < float(energy) <= 1.0):
        raise error("lj.truncate", f"energy={energy!r} must be a fraction in (0, 1]",
                    "e.g. energy=0.99")
    # Read only without rank=, that is with energy= (exactly one of them is given).
    fraction = 1.0 if energy is None else float(energy)
    nodes = _lora_nodes("lj.truncate", adapters, config)
    new_ranks, replaced, rows = {}, {}, []
    for path, node, _, _ in nodes:
        lead = tuple(np.shape(node.a)[:-2])
        r = int(np.shape(node.a)[-1])
        shape = (int(np.shape(node.a)[-2]), int(np.shape(node.b)[-1]))
        left, s, right = factor_svd(node, path=path)
        specs = [Spectrum(path, tuple(int(i) for i in idx), shape, s[idx])
                 for idx in np.ndindex(*lead)]
        if rank is not None:
            k = min(int(rank), r)
        else:
            k = max(1, max(sp.rank_for_energy(fraction) for sp in specs))
        rows += [dataclasses.replace(sp, rank_kept=k, error=sp.error_at(k)) for sp in specs]
        if k == r:
            continue
        new_ranks[path] = k
        replaced[path] = (node, left, s, right, k)

    new_config = config.with_ranks(new_ranks, paths=[p for p, *_ in nodes])

    def rebuild(path, node):
        if path not in replaced:
            return node
        node, left, s, right, k = replaced[path]
        new_scale = new_config.scale_for(path)
        root = np.sqrt(s[..., :k] / new_scale)
        a = left[..., :, :k] * root[..., None, :]
        b = root[..., :, None] * right[..., :k, :]
        scale = np.full(np.shape(node.scale), new_scale, np.float32)
        return LoraWeights(jnp.asarray(a, node.a.dtype), jnp.asarray(b, node.b.dtype),
                           jnp.asarray(scale))

    return Truncation(map_adapters(rebuild, adapters), new_config, Analysis(tuple(rows)))


def spectra_summary(directory, *, step: int | None = None) -> str:
    """The per-leaf spectra table of a checkpoint's adapters (``python -m lora_jax
    inspect`` prints it): restores ``(adapters, config)`` with `lj.restore` (no base
    needed) and returns ``analyze(None, adapters, config).summary()``."""

    adapters, config = restore(directory, step=step)
    return "spectra of s*A@B (energy ranks at 90%/99%; erank: entropy effective rank)\n" + \
        analyze(None, adapters, config).summary()
