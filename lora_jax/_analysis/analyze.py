"""Looking at trained adapters: `analyze` (spectra, effective rank) and `truncate`.

Both look at the update ``dW = scale * a @ b`` of each adapted weight as an
``(in, out)`` matrix (per layer of a stacked leaf), from its factors
(`factor_svd`), and report through `Analysis`:

* `analyze` gives its singular values, without forming the ``in x out``
  matrix;
* `truncate` re-factorizes adapters at lower ranks (a rank or energy per
  leaf, or one budget across all layers), keeping each layer's best rank-k
  approximation of ``dW`` exactly.

`spectra_summary` is the table ``python -m lora_jax inspect`` prints.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from lora_jax._analysis.spectrum import Analysis, Spectrum, as_float64, factor_svd
from lora_jax._checkpoint.api import restore
from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.leaf import as_matrix, dense_float32
from lora_jax._core.weights import (
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
             energy: float | None = None, total_rank: int | None = None,
             total_energy: float | None = None) -> Truncation:
    """Lower-rank adapters holding the best rank-k approximation of each update.

    For each `LoraWeights` leaf the SVD of ``dW = scale * a @ b`` is taken
    from the factors (as in `analyze`) and the top ``k`` directions of each
    layer are kept, so each layer's ``dW_k`` is exactly its best rank-k
    approximation (Eckart-Young). Exactly one of four budgets:

    * per leaf: ``rank=k`` keeps at most ``k`` (leaves already at or below
      ``k`` are returned unchanged); ``energy=f`` keeps, per leaf, the
      smallest rank holding a fraction ``f`` of ``||dW||_F**2`` in *every*
      stacked layer;
    * global, one budget over every layer of every leaf (a stacked layer, or
      an adapter of a set, counts as its own update): ``total_rank=n`` keeps
      the ``n`` largest singular values of all the updates together;
      ``total_energy=f`` keeps the fewest of them, taken from the largest
      down, whose squares sum to a fraction ``f`` of the summed
      ``||dW||_F**2``. Ties at the cut go to the leaf first in the tree's
      order, then the lower layer index, so exactly ``n`` are kept (all of
      them when ``n`` exceeds their number). Layers then keep different
      ranks ``k_l``: a stacked leaf gets rank ``max_l k_l`` and its layers
      that keep fewer have the directions beyond ``k_l`` set to zero
      (columns of ``a``, rows of ``b``); a leaf that keeps no direction gets
      rank 1 with zero ``a`` and ``b`` (a zero update, reported as
      ``rank_kept=0``).

    Scale semantics: ``alpha`` is kept and the rank changes, so the new scale
    is ``alpha / k`` (``alpha / sqrt(k)`` with rsLoRA), as the returned config
    computes it; the singular values are split evenly between the new
    factors, ``a = U sqrt(S / scale)``, ``b = sqrt(S / scale) V^T``. Use the
    returned config with the returned adapters (`lj.merge`, `lj.save`): it
    sets the new ranks (``rank``, or exact-path ``rank_pattern`` entries).
    Factors keep their dtype; DoRA's magnitude ``m`` is kept as it is (the
    cut, and the error reported, are of the low-rank update ``dW``);
    fully-trained leaves are passed through.

    Args:
      adapters: an adapter tree.
      config: the `LoraConfig` the adapters were made with.
      rank: keep at most this rank per leaf.
      energy: keep this fraction of the energy per leaf, in ``(0, 1]``.
      total_rank: keep this many singular directions across all layers.
      total_energy: keep this fraction, in ``(0, 1]``, of the energy of all
        layers together.

    Returns:
      ``Truncation(adapters, config, report)``; the report (an `Analysis`)
      lists per layer the rank kept, the energy kept and the relative error
      ``||dW - dW_k||_F / ||dW||_F`` the cut costs that layer.

    Raises:
      ValueError: not exactly one of the four budgets, or a bad value.

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

      A global budget: the 3 largest singular values of q (4, 3, 0.5) and
      v (2, 0.2, 0.1) together are 4, 3 and 2, so q keeps rank 2 and v 1:

      >>> cfg = lj.LoraConfig(rank=3, alpha=3, targets="q|v")             # scale 1
      >>> ad = {n: lj.LoraWeights(jnp.eye(8, 3) * jnp.array(sv), jnp.eye(3, 6), jnp.float32(1))
      ...       for n, sv in (("q", [4.0, 3.0, 0.5]), ("v", [2.0, 0.2, 0.1]))}
      >>> small, cfg2, report = lj.truncate(ad, cfg, total_rank=3)
      >>> [(row.path, row.rank_kept, round(row.error, 3)) for row in report]
      [('q', 2, 0.1), ('v', 1, 0.111)]
      >>> cfg2.rank_for("q"), cfg2.rank_for("v"), small["v"].a.shape
      (2, 1, (8, 1))
    """
    _check_budget(rank=rank, energy=energy, total_rank=total_rank, total_energy=total_energy)
    nodes = _lora_nodes("lj.truncate", adapters, config)
    svds, specs = [], []
    for path, node, _, _ in nodes:
        lead = tuple(np.shape(node.a)[:-2])
        shape = (int(np.shape(node.a)[-2]), int(np.shape(node.b)[-1]))
        left, s, right = factor_svd(node, path=path)
        svds.append((path, left, s, right))
        specs.append([Spectrum(path, tuple(int(i) for i in idx), shape, s[idx])
                      for idx in np.ndindex(*lead)])
    if total_rank is not None or total_energy is not None:
        kept = _global_ranks([s for _, _, s, _ in svds], total_rank,
                             1.0 if total_energy is None else float(total_energy))
    else:
        kept = [np.full(np.shape(s)[:-1], _leaf_rank(sp, np.shape(s)[-1], rank, energy))
                for (_, _, s, _), sp in zip(svds, specs, strict=True)]

    new_ranks, replaced, rows = {}, {}, []
    for (path, left, s, right), sp, k in zip(svds, specs, kept, strict=True):
        rows += [dataclasses.replace(row, rank_kept=int(k[row.layer]),
                                     error=row.error_at(int(k[row.layer]))) for row in sp]
        r = int(np.shape(s)[-1])
        if int(np.min(k, initial=r)) == r:
            continue                     # every layer keeps all its directions
        new_rank = max(1, int(np.max(k, initial=0)))
        if new_rank != r:
            new_ranks[path] = new_rank
        replaced[path] = (left, s, right, k, new_rank)

    new_config = config.with_ranks(new_ranks, paths=[p for p, *_ in nodes])

    def rebuild(path, node):
        if path not in replaced:
            return node
        left, s, right, k, new_rank = replaced[path]
        new_scale = new_config.scale_for(path)
        # Directions past a layer's own k (all of them, for k = 0) are zero.
        keep = np.arange(new_rank) < k[..., None]
        root = np.where(keep, np.sqrt(s[..., :new_rank] / new_scale), 0.0)
        a = left[..., :, :new_rank] * root[..., None, :]
        b = root[..., :, None] * right[..., :new_rank, :]
        scale = np.full(np.shape(node.scale), new_scale, np.float32)
        # _replace keeps DoRA's magnitude m: it is not part of the low-rank update.
        return node._replace(a=jnp.asarray(a, node.a.dtype), b=jnp.asarray(b, node.b.dtype),
                             scale=jnp.asarray(scale))

    return Truncation(map_adapters(rebuild, adapters), new_config, Analysis(tuple(rows)))


def _check_budget(**budgets) -> None:
    """Exactly one of truncate's four budgets, with a valid value."""
    if sum(v is not None for v in budgets.values()) != 1:
        got = ", ".join(f"{k}={v!r}" for k, v in budgets.items())
        raise error("lj.truncate", f"it needs exactly one of rank=k or energy=f (per leaf) or "
                    f"total_rank=n or total_energy=f (across all layers); got {got}",
                    "e.g. lj.truncate(adapters, config, rank=4), energy=0.99, total_rank=64 "
                    "or total_energy=0.99")
    for name, value in budgets.items():
        if value is None:
            continue
        if name.endswith("rank") and (isinstance(value, bool) or
                                      not isinstance(value, (int, np.integer)) or value < 1):
            raise error("lj.truncate", f"{name}={value!r} must be a positive int",
                        f"e.g. {name}={4 if name == 'rank' else 64}")
        if name.endswith("energy") and (isinstance(value, bool) or
                                        not isinstance(value, (int, float, np.floating))
                                        or not 0.0 < float(value) <= 1.0):
            raise error("lj.truncate", f"{name}={value!r} must be a fraction in (0, 1]",
                        f"e.g. {name}=0.99")


def _leaf_rank(specs: list[Spectrum], r: int, rank: int | None, energy: float | None) -> int:
    """The one rank a per-leaf budget keeps for a leaf of rank ``r``: ``min(rank, r)``,
    or the smallest rank reaching ``energy`` in every layer (at least 1)."""
    if rank is not None:
        return min(int(rank), r)
    fraction = 1.0 if energy is None else float(energy)
    return max(1, max(sp.rank_for_energy(fraction) for sp in specs))


def _global_ranks(spectra: list[np.ndarray], total_rank: int | None,
                  fraction: float) -> list[np.ndarray]:
    """Per leaf, the ranks ``(*lead)`` its layers keep under one global budget:
    ``total_rank`` directions, or (without it) the fewest holding ``fraction`` of
    the energy of all layers together.

    All singular values are ordered from the largest down; ties go to the
    earlier leaf, then the earlier layer (C order), then the earlier direction,
    so every layer keeps a prefix of its (descending) spectrum.
    """
    values, leaf, layer, direction = [], [], [], []
    for i, s in enumerate(spectra):
        n_layers, r = math.prod(np.shape(s)[:-1]), int(np.shape(s)[-1])
        values.append(np.reshape(s, -1))
        leaf.append(np.full(n_layers * r, i))
        layer.append(np.repeat(np.arange(n_layers), r))
        direction.append(np.tile(np.arange(r), n_layers))
    values, leaf, layer, direction = (np.concatenate(x) for x in (values, leaf, layer, direction))
    order = np.lexsort((direction, layer, leaf, -values))   # the last key sorts first
    if total_rank is not None:
        n = min(int(total_rank), values.size)
    else:
        cum = np.cumsum(values[order] ** 2)
        # The same relative slack as Spectrum.rank_for_energy.
        hit = np.nonzero(cum >= fraction * cum[-1] * (1 - 1e-12))[0]
        n = int(hit[0]) + 1 if cum[-1] > 0 else 0   # all updates zero: keep none
    chosen = order[:n]
    return [np.bincount(layer[chosen][leaf[chosen] == i],
                        minlength=math.prod(np.shape(s)[:-1])).reshape(np.shape(s)[:-1])
            for i, s in enumerate(spectra)]


def spectra_summary(directory, *, step: int | None = None) -> str:
    """The per-leaf spectra table of a checkpoint's adapters (``python -m lora_jax
    inspect`` prints it): restores ``(adapters, config)`` with `lj.restore` (no base
    needed) and returns ``analyze(None, adapters, config).summary()``."""

    adapters, config = restore(directory, step=step)
    return "spectra of s*A@B (energy ranks at 90%/99%; erank: entropy effective rank)\n" + \
        analyze(None, adapters, config).summary()
