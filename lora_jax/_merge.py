"""Reference semantics: `merge`, `unmerge` and the dense delta.

``merge`` computes ``W + scale * a @ b`` in float32 (full-precision matmul
on every backend) and casts back to W's dtype. It is the reference that the
efficient `apply` is tested against, and what inference should run on.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
from jax import core as jax_core

from lora_jax._core.config import LoraConfig, LoraWarning
from lora_jax._core.errors import error, message
from lora_jax._core.leaf import dense_float32, is_container
from lora_jax._core.paths import leaves_with_paths, mirror, unflatten_params
from lora_jax._core.weights import check_adapters, delta
from lora_jax._variants import dora as _dora
from lora_jax._variants.quantize import requantize_merged

__all__ = ["merge", "unmerge", "delta", "check_merged"]

# Warn when casting the merged weight back erases more than this fraction of
# the update's non-zero entries (bf16 erased 88% at |dW|/|W| = 6e-4).
_ERASED_WARN_FRACTION = 0.5


def _is_concrete(x) -> bool:
    return not isinstance(x, jax_core.Tracer)


def check_merged(path, base, merged, d):
    """Eager-only checks: non-finite results, and deltas erased by the cast."""
    if not (_is_concrete(merged) and _is_concrete(d)):
        return
    if not bool(jnp.all(jnp.isfinite(d))):
        raise error(
            path, "the adapter's update scale * a @ b has NaN/Inf entries; merging would "
            "corrupt the weight",
            "check the adapter (training diverged, or a corrupted file) before merging")
    if jnp.dtype(merged.dtype).itemsize >= 4:
        return
    changed = d != 0
    n = int(jnp.sum(changed))
    if n == 0:
        return
    erased = int(jnp.sum(changed & (merged == jnp.asarray(base, merged.dtype))))
    if erased / n > _ERASED_WARN_FRACTION:
        warnings.warn(message(
            path, f"casting the merged weight to {jnp.dtype(merged.dtype).name} erased "
            f"{erased / n:.0%} of the update's entries (the delta is below that dtype's "
            f"resolution)",
            "keep a float32 copy of the merged weights, or serve unmerged with lj.apply"),
            LoraWarning, stacklevel=3)


def _combine(params, adapters, config, sign: float, norms=None):
    entries = check_adapters(params, adapters, config)
    norm_of = _norms_by_path(params, norms, config) if sign < 0 else {}
    leaves, trained = [], []
    for path, leaf, node, spec in entries:
        if spec is not None:
            d = delta(node, spec)
            w32 = dense_float32(leaf)
            if node.m is None:
                new32 = w32 + sign * d
            elif sign > 0:
                new32 = _dora.merged(w32, node, spec, d)
            else:
                new32 = _dora.unmerged(w32, node, spec, d, norm_of[path])
            if is_container(leaf):
                what = "merging an adapter" if sign > 0 else "unmerging an adapter"
                leaves.append(requantize_merged(path, leaf, new32, what=what))
                continue
            new = new32.astype(leaf.dtype)
            check_merged(path, leaf, new, new32 - w32)
            leaves.append(new)
        elif node is not None:
            trained.append(path)
            leaves.append(node if sign > 0 else leaf)
        else:
            leaves.append(leaf)
    return unflatten_params(params, leaves), trained


def _norms_by_path(params, norms, config) -> dict:
    if not config.use_dora:
        if norms is not None:
            raise error("lj.unmerge",
                        "norms= is for DoRA adapters, but config.use_dora is False",
                        "leave norms out")
        return {}
    if norms is None:
        raise error(
            "lj.unmerge",
            "DoRA adapters can't be unmerged from the merged weights alone (their columns "
            "have norm m; the norm ||W + scale * a @ b|| they were divided by is gone)",
            "norms = lj.dora_norms(params, adapters, config) before merging, then "
            "lj.unmerge(merged, adapters, config, norms=norms)")
    nodes = mirror(params, norms, what="norms=",
                   fix="pass the tree lj.dora_norms(params, adapters, config) returned.")
    return {path: n for (path, _), n in zip(leaves_with_paths(params), nodes, strict=True)}


def merge(params, adapters, config: LoraConfig):
    """Folds the adapters into the weights: ``W + scale * a @ b``.

    The sum is computed in float32 and cast back to each weight's dtype;
    fully-trained (``config.train``) leaves are replaced by their trained
    values. Stacked leaves merge layer by layer. Outside ``jit`` it raises
    if an update has NaN/Inf entries and warns (`LoraWarning`) when the cast
    would erase most of an update (merging a small delta into bfloat16).

    DoRA adapters merge to ``m * (W + scale * a @ b) / ||W + scale * a @ b||``.
    A quantized weight (`lj.quantize`) is dequantized, summed in float32 and
    requantized with the same settings, with a `LoraWarning` giving the
    rounding error (the merged model is not exactly the adapted one).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.ones((8, 8))}
      >>> cfg = lj.LoraConfig(rank=2, alpha=2, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(0))
      >>> ad = {"w": ad["w"]._replace(b=jnp.ones((2, 8)))}
      >>> merged = lj.merge(params, ad, cfg)
      >>> bool(jnp.allclose(merged["w"], 1 + ad["w"].a.sum(-1, keepdims=True)))
      True
    """
    merged, _ = _combine(params, adapters, config, +1.0)
    return merged


def unmerge(merged, adapters, config: LoraConfig, *, norms=None):
    """Removes the adapters from merged weights: ``W' - scale * a @ b``.

    Exact up to float32 rounding of the merge (``unmerge(merge(p)) == p`` to
    ~1e-7 relative in float32; in bfloat16 the round trip loses what the
    cast lost). Fully-trained leaves can't be un-trained: their trained
    values stay, with a `LoraWarning` naming them.

    Args:
      merged: the merged params.
      adapters: the adapter tree that was merged.
      config: its `LoraConfig`.
      norms: DoRA only (required there): `lj.dora_norms` of the base,
        computed before merging.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(1), (8, 8))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(0))
      >>> ad = {"w": ad["w"]._replace(b=jnp.ones((2, 8)))}
      >>> back = lj.unmerge(lj.merge(params, ad, cfg), ad, cfg)
      >>> bool(jnp.allclose(back["w"], params["w"], atol=1e-6))
      True
    """
    params, trained = _combine(merged, adapters, config, -1.0, norms)
    if trained:
        warnings.warn(message(
            "lj.unmerge", f"kept the trained values of fully-trained leaves {trained}: the "
            f"adapter does not hold their original values",
            "keep the original params if you need them back"), LoraWarning, stacklevel=2)
    return params
