"""Composition: one adapter from weighted adapters of a set, and weighted merges.

`combine` is PEFT's ``add_weighted_adapter`` for an `lj.AdapterSet`
(``"cat"``: the exact sum, ``"svd"``: the sum truncated to a rank from the
factors, ``"linear"``: weights on the factors); `merge_weighted` folds a
weighted sum of a set's adapters into the base weights at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax._analysis.spectrum import Analysis, Spectrum, factor_svd
from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.leaf import dense_float32, from_matrix, is_container
from lora_jax._core.paths import unflatten_params
from lora_jax._core.weights import LoraWeights, check_adapters, flatten_adapters
from lora_jax._merge import check_merged
from lora_jax._multi.set import BASE, AdapterSet, check_set, index_of, targets_config
from lora_jax._variants.quantize import requantize_merged

__all__ = ["Combination", "combine", "merge_weighted"]


class Combination(NamedTuple):
    """What `combine` returns: ``adapters, config, report = lj.combine(...)``.

    Attributes:
      adapters: the combined adapter (one adapter tree; scale 1).
      config: its `LoraConfig` (``alpha = rank`` per path, so scale 1).
      report: an `Analysis` with, per layer, the singular values of the exact
        weighted sum ``sum_i w_i * scale_i * a_i @ b_i`` and ``error``, the
        relative Frobenius distance of the result to it (0 for ``"cat"``;
        with ``"svd"`` also ``rank_kept``, so its table shows the energy
        kept).
    """

    adapters: Any
    config: LoraConfig
    report: Analysis


def _refuse_dora(aset: AdapterSet, where: str) -> None:
    if aset.config.use_dora:
        raise error(f"lj.{where}", "the set holds DoRA adapters: a weighted sum of DoRA "
                                   "updates is not a DoRA adapter (each one rescales its own "
                                   "W + s a b to its magnitudes), so there is nothing exact to "
                                   "combine",
                    "merge each DoRA adapter alone (lj.merge with lj.select_adapter), or "
                    "combine plain LoRA adapters")


def _weights(aset: AdapterSet, weights, where: str) -> list:
    """``[(member index, weight), ...]`` validated; errors name ``where``."""
    if isinstance(weights, Mapping):
        named = [(index_of(aset, n, where) if n != BASE else None, w)
                 for n, w in weights.items()]
        if any(i is None for i, _ in named):
            raise error(where, f"{BASE!r} is not an adapter and can't be weighted",
                        f"leave {BASE!r} out of weights (the base is what the adapters are "
                        f"added to)")
        pairs = [(i, w) for i, w in named if i is not None]
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        if len(weights) != aset.n:
            raise error(where, f"{len(weights)} weights for a set of {aset.n} adapters "
                               f"{list(aset.names)}",
                        "one weight per adapter, or a {name: weight} dict for some of them")
        pairs = list(enumerate(weights))
    else:
        raise error(where, f"weights must be {{name: weight}} or a sequence with one weight per "
                           f"adapter; got {type(weights).__name__}",
                    f"e.g. weights={{{aset.names[0]!r}: 1.0}}", kind=TypeError)
    for i, w in pairs:
        if isinstance(w, bool) or not isinstance(w, (int, float, np.number)) \
                or not math.isfinite(float(w)):
            raise error(where, f"the weight of {aset.names[i]!r} is {w!r}; weights must be "
                               f"finite numbers (negative subtracts the adapter)",
                        "pass a finite float for every adapter")
    if not pairs:
        raise error(where, "no adapters to combine: weights is empty",
                    "give at least one adapter a weight, e.g. {name: 1.0}")
    return [(i, float(w)) for i, w in pairs]


def _gram_error(a_new, b_new, a_ref, b_ref) -> np.ndarray:
    """``||a_new b_new - a_ref b_ref||_F / ||a_ref b_ref||_F`` per leading index,
    from the factors' Gram matrices (the in x out matrices are never formed)."""
    x = np.concatenate([a_new, -a_ref], -1)
    y = np.concatenate([b_new, b_ref], -2)
    t = np.swapaxes

    def sq(p, q):
        return np.maximum(np.einsum("...ij,...ji->...", t(p, -1, -2) @ p, q @ t(q, -1, -2)), 0.0)
    ref = sq(a_ref, b_ref)
    return np.sqrt(sq(x, y) / np.where(ref > 0, ref, 1.0))


def _refactor(a, b, k):
    """Best rank-``k`` factors (scale 1) of ``a @ b`` from the factors, zero-padded to k."""
    left, s, right = factor_svd(LoraWeights(a, b, np.float64(1.0)))
    kk = min(k, s.shape[-1])
    root = np.sqrt(s[..., :kk])
    a2 = left[..., :, :kk] * root[..., None, :]
    b2 = root[..., :, None] * right[..., :kk, :]
    if kk < k:
        pad = k - kk
        a2 = np.concatenate([a2, np.zeros((*a2.shape[:-1], pad))], -1)
        b2 = np.concatenate([b2, np.zeros((*b2.shape[:-2], pad, b2.shape[-1]))], -2)
    return a2, b2, s


# The methods of `combine`. Each takes the exact weighted sum as concatenated factors
# (``a_cat: (..., in, sum r_i)``, ``b_cat: (..., sum r_i, out)``), the ``(member index,
# weight, rank)`` parts and the set's node on the host, and returns ``(a, b, rank, error)``:
# ``error`` per layer, or None when it is the spectrum's tail at ``rank`` ("svd").


def _cat(a_cat, b_cat, parts, host, *, rank, path, names):
    """Exact: the concatenated factors, re-factorized (still exactly) above min(in, out)."""
    k = min(a_cat.shape[-1], a_cat.shape[-2], b_cat.shape[-1])
    a_new, b_new = (a_cat, b_cat) if k == a_cat.shape[-1] else _refactor(a_cat, b_cat, k)[:2]
    return a_new, b_new, k, np.zeros(a_cat.shape[:-2])


def _svd(a_cat, b_cat, parts, host, *, rank, path, names):
    """The sum's best rank-``rank`` approximation (default: the largest member rank)."""
    k = min(rank or max(r for _, _, r in parts), a_cat.shape[-2], b_cat.shape[-1])
    a_new, b_new, _ = _refactor(a_cat, b_cat, k)
    return a_new, b_new, k, None


def _linear(a_cat, b_cat, parts, host, *, rank, path, names):
    """PEFT's linear: sqrt-weighted sums of the factors themselves (one common rank)."""
    rs = {names[i]: r for i, _, r in parts}
    if len(set(rs.values())) > 1:
        raise error("lj.combine", f"method='linear': {path} has adapters of different ranks "
                                  f"{rs}; 'linear' adds the factors themselves, so it needs "
                                  f"one rank",
                    "use method='cat' (exact) or 'svd'")
    k = next(iter(rs.values()))
    f64, s_all = np.float64, host.scale
    a_new = sum(math.copysign(math.sqrt(abs(w * float(s_all[i]))), w * float(s_all[i]))
                * host.a[i, ..., :r].astype(f64) for i, w, r in parts)
    b_new = sum(math.sqrt(abs(w * float(s_all[i]))) * host.b[i, ..., :r, :].astype(f64)
                for i, w, r in parts)
    return a_new, b_new, k, _gram_error(a_new, b_new, a_cat, b_cat)


_METHODS = {"cat": _cat, "svd": _svd, "linear": _linear}


def combine(aset: AdapterSet, weights, *, method: str = "svd",
            rank: int | None = None) -> Combination:
    """One adapter from a weighted combination of a set's adapters (PEFT's
    ``add_weighted_adapter``).

    Each adapter ``i`` contributes ``w_i * scale_i * a_i @ b_i``; weights may
    be negative (subtract an adapter). The result has scale 1 (its config has
    ``alpha = rank``), as in PEFT. Methods:

    * ``"cat"``: exact. ``a = [w_i s_i a_i]`` and ``b = [b_i]`` concatenated
      along the rank: rank ``sum r_i``. Where that exceeds ``min(in, out)``
      the factors are re-factorized (still exactly) at ``min(in, out)``.
    * ``"svd"``: the weighted sum truncated to ``rank`` (default: the largest
      member rank, PEFT's default) -- its best rank-k approximation, taken
      from the factors: QR of the concatenated factors and the SVD of a
      small ``sum r_i``-square core, never the dense ``in x out`` update.
      The report gives the energy kept per layer.
    * ``"linear"``: PEFT's ``linear``: ``a = sum_i sign(w_i s_i)
      sqrt|w_i s_i| a_i``, ``b = sum_i sqrt|w_i s_i| b_i`` (all ranks
      equal). Cheap, but **not** the weighted sum of the updates (cross
      terms ``a_i b_j`` appear); the report measures how far off it is.

    Factors are combined in float64 on the host and cast to the set's dtype.

    Args:
      aset: the set.
      weights: ``{name: weight}`` for the adapters to combine, or a sequence
        with one weight per adapter of the set.
      method: ``"cat"``, ``"svd"`` or ``"linear"``.
      rank: the target rank for ``"svd"`` (capped at ``min(in, out)``).

    Returns:
      ``Combination(adapters, config, report)``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((16, 12))}
      >>> cfg = lj.LoraConfig(rank=4, alpha=8, targets="w")
      >>> def adapter(seed):
      ...     ad = lj.init(params, cfg, key=jax.random.key(seed))
      ...     b = jax.random.normal(jax.random.key(seed + 100), (4, 12))
      ...     return {"w": ad["w"]._replace(b=b)}, cfg
      >>> aset = lj.adapter_set({"x": adapter(0), "y": adapter(1)})
      >>> exact = lj.merge_weighted(params, aset, {"x": 1.0, "y": -0.5})["w"]
      >>> cat = lj.combine(aset, {"x": 1.0, "y": -0.5}, method="cat")
      >>> merged = lj.merge(params, cat.adapters, cat.config)["w"]
      >>> cat.config.rank, bool(jnp.allclose(merged, exact, atol=1e-5))
      (8, True)
      >>> svd = lj.combine(aset, {"x": 1.0, "y": -0.5}, method="svd", rank=8)   # full rank: exact
      >>> float(svd.report.spectra[0].error) < 1e-6
      True
      >>> lj.combine(aset, {"x": 1.0, "y": -0.5}, method="svd").config.rank    # default: max rank
      4
    """
    check_set(aset, "combine")
    _refuse_dora(aset, "combine")
    _check_method(method, rank)
    pairs = _weights(aset, weights, "lj.combine")
    flat, treedef = flatten_adapters(aset.adapters)
    nodes, ranks, rows = [], {}, []
    for path, node in flat:
        new, k, path_rows = _combine_path(aset, pairs, path, node, method, rank)
        nodes.append(new)
        if new is not None:
            ranks[path] = k
        rows += path_rows
    members = [aset.members[i] for i, _ in pairs]
    config = targets_config(aset.config, members, list(ranks)).with_ranks(ranks, unit_scale=True)
    adapters = jax.tree_util.tree_unflatten(treedef, nodes)
    return Combination(adapters, config, Analysis(tuple(rows)))


def _check_method(method: str, rank) -> None:
    names = tuple(_METHODS)   # a tuple: an unhashable method is refused, not a TypeError
    if method not in names:
        raise error("lj.combine", f"method={method!r} is not one of {names}",
                    "use one of those ('cat' is exact, 'svd' truncates, 'linear' is PEFT's "
                    "approximate one)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer))
                             or rank < 1):
        raise error("lj.combine", f"rank={rank!r} must be a positive int",
                    "pass an int >= 1, or rank=None for the largest member rank")
    if rank is not None and method != "svd":
        raise error("lj.combine", f"rank= applies to method='svd' only (cat's rank is the sum "
                                  f"of the ranks, linear's the common rank); got "
                                  f"method={method!r}",
                    "drop rank=, or use method='svd'")


def _combine_path(aset: AdapterSet, pairs: list, path: str, node, method: str, rank):
    """One path's ``(combined LoraWeights, rank, report rows)``; ``(None, None, [])``
    where none of the weighted adapters adapts it."""
    parts = [(i, w, aset.members[i].rank_for(path)) for i, w in pairs]
    parts = [(i, w, r) for i, w, r in parts if r > 0]
    if node is None or not parts:
        return None, None, []
    host = LoraWeights(np.asarray(node.a), np.asarray(node.b), np.asarray(node.scale))
    a_cat, b_cat = _weighted_cat(host, parts)
    _, sv, _ = factor_svd(LoraWeights(a_cat, b_cat, np.float64(1.0)))
    a_new, b_new, k, err = _METHODS[method](a_cat, b_cat, parts, host, rank=rank, path=path,
                                            names=aset.names)
    rows = _report_rows(path, sv, (a_cat.shape[-2], b_cat.shape[-1]), k, err)
    new = LoraWeights(jnp.asarray(a_new.astype(node.a.dtype)),
                      jnp.asarray(b_new.astype(node.b.dtype)), jnp.asarray(1.0, jnp.float32))
    return new, k, rows


def _weighted_cat(host: LoraWeights, parts: list):
    """The exact weighted sum as concatenated float64 factors (PEFT's cat: weights on a)."""
    f64 = np.float64
    a_cat = np.concatenate([w * f64(host.scale[i]) * host.a[i, ..., :r].astype(f64)
                            for i, w, r in parts], -1)
    b_cat = np.concatenate([host.b[i, ..., :r, :].astype(f64) for i, _, r in parts], -2)
    return a_cat, b_cat


def _report_rows(path: str, sv, shape: tuple, k: int, err) -> list:
    """One `Spectrum` per layer: the exact sum's singular values and the result's error
    (``err=None``: truncated at ``k``, the error read off the spectrum)."""
    rows = []
    for idx in np.ndindex(*sv.shape[:-1]):
        sp = Spectrum(path, tuple(int(j) for j in idx), shape, sv[idx])
        if err is None:
            sp = dataclasses.replace(sp, rank_kept=k, error=sp.error_at(k))
        else:
            sp = dataclasses.replace(sp, error=float(err[idx]))
        rows.append(sp)
    return rows


def merge_weighted(params, aset: AdapterSet, weights):
    """Folds a weighted sum of a set's adapters into the base weights at once.

    Each adapted weight becomes ``W + sum_i w_i * scale_i * a_i @ b_i``,
    computed in float32 (as `lj.merge`) and cast back to ``W``'s dtype;
    weights may be negative. Outside ``jit`` it raises on NaN/Inf updates and
    warns when the cast erases most of an update, like `lj.merge`.

    Args:
      params: the base params the set is for.
      aset: the set.
      weights: ``{name: weight}`` or one weight per adapter of the set.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((4, 4))}
      >>> cfg = lj.LoraConfig(rank=1, alpha=1, targets="w")
      >>> ones = {"w": lj.LoraWeights(jnp.ones((4, 1)), jnp.ones((1, 4)), jnp.float32(1.0))}
      >>> aset = lj.adapter_set({"x": (ones, cfg), "y": (ones, cfg)})
      >>> float(lj.merge_weighted(params, aset, {"x": 2.0, "y": -0.5})["w"][0, 0])
      1.5
    """
    check_set(aset, "merge_weighted")
    _refuse_dora(aset, "merge_weighted")
    pairs = _weights(aset, weights, "lj.merge_weighted")
    w = np.zeros((aset.n,), np.float32)
    for i, x in pairs:
        w[i] += x
    w = jnp.asarray(w)
    leaves = []
    for path, leaf, node, spec in check_adapters(params, aset.adapters, aset.config):
        if spec is None:
            leaves.append(leaf)
            continue
        coef = w * jnp.asarray(node.scale, jnp.float32)
        a = jnp.asarray(node.a, jnp.float32) * coef.reshape((-1,) + (1,) * (node.a.ndim - 1))
        d = from_matrix(jnp.einsum("n...ir,n...ro->...io", a, jnp.asarray(node.b, jnp.float32),
                                   precision=lax.Precision.HIGHEST), spec)
        new32 = dense_float32(leaf) + d
        if is_container(leaf):
            leaves.append(requantize_merged(path, leaf, new32, what="merging adapters"))
            continue
        new = new32.astype(leaf.dtype)
        check_merged(path, leaf, new, d)
        leaves.append(new)
    return unflatten_params(params, leaves)


