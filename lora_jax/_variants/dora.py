"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024).

The adapted weight is ``W' = m * V / ||V||`` with ``V = W + scale * a @ b``:
the direction comes from the LoRA-updated weight, the length of each output
unit's column from the trained magnitude ``m`` (`LoraWeights.m`, shape
``(*stacked, out)``). ``||V||`` is the L2 norm over the input axes of each
output unit -- PEFT's ``weight_norm``, taken per output row of the torch
``(out, in)`` weight -- and is treated as a constant in the backward pass,
as the paper recommends (and PEFT does).

The norm without forming ``a @ b``: per output unit ``j``,

    ||V_j||^2 = ||W_j||^2 + 2 s <(a^T W)_j, b_j> + s^2 b_j^T (a^T a) b_j

which reads W once (``||W||^2`` and ``a^T W`` in one pass, an
``(r, out)`` result) and otherwise touches only rank-sized arrays: no
``(in, out)`` temporary. Its FLOPs are those of one rank-``r`` product with
W, negligible next to the layer's ``x @ W`` for any batch of more than a
few tokens. `column_norm` is that form; `merge` uses the dense one (it
forms the sum anyway), which the tests compare it against.

Unmerging needs ``||V||``, which the merged weight no longer determines
(its columns have norm ``m``): compute `dora_norms` before merging and pass
them to `lj.unmerge` (PEFT caches the same vector at merge time).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.leaf import as_matrix, dense_float32, from_matrix
from lora_jax._core.paths import LeafSpec, unflatten_params
from lora_jax._core.weights import LoraWeights, check_adapters, delta

__all__ = ["dora_norms", "column_norm", "dense_column_norm", "magnitude_init"]

_HI = lax.Precision.HIGHEST


def dense_column_norm(v):
    """``||v||`` over the input axis of ``(*stacked, in, out)``: ``(*stacked, out)``."""
    v = jnp.asarray(v, jnp.float32)
    return jnp.sqrt(jnp.sum(v * v, axis=-2))


def column_norm(w, a, b, scale):
    """``||w + scale * a @ b||`` per output unit, without forming ``a @ b``.

    ``w``: ``(*S, in, out)``; ``a``: ``(*S, in, r)``; ``b``: ``(*S, r, out)``;
    returns float32 ``(*S, out)``. Exact up to float32 rounding (the
    expansion is of a sum of squares; the rounding is relative to
    ``||W_j||^2``, so a column that the update nearly cancels loses digits).
    """
    f32 = jnp.float32
    w, a, b = w.astype(f32), a.astype(f32), b.astype(f32)
    s = jnp.asarray(scale, f32)
    aw = jnp.einsum("...ir,...io->...ro", a, w, precision=_HI)
    aa = jnp.einsum("...ir,...is->...rs", a, a, precision=_HI)
    ab = jnp.einsum("...rs,...so->...ro", aa, b, precision=_HI)
    n2 = jnp.sum(w * w, axis=-2) + 2 * s * jnp.sum(aw * b, axis=-2) + \
        s * s * jnp.sum(b * ab, axis=-2)
    return jnp.sqrt(jnp.maximum(n2, 0.0))


def magnitude_init(leaf, spec: LeafSpec, dtype):
    """DoRA's initial ``m``: the column norms of the base (so ``W' = W`` at B = 0)."""
    return dense_column_norm(as_matrix(dense_float32(leaf), spec)).astype(dtype)


def merged(w32, node: LoraWeights, spec: LeafSpec, d):
    """``m * (W + d) / ||W + d||`` in float32, weight-shaped (``d``: the LoRA delta)."""
    v = as_matrix(w32 + d, spec)
    n = lax.stop_gradient(dense_column_norm(v))
    m = jnp.asarray(node.m, jnp.float32)
    return from_matrix(v * (m / n)[..., None, :], spec)


def unmerged(merged32, node: LoraWeights, spec: LeafSpec, d, norm):
    """Inverse of `merged`: ``W' * ||V|| / m - d`` (needs the norm at merge time)."""
    m = jnp.asarray(node.m, jnp.float32)
    n = jnp.asarray(norm, jnp.float32)
    v = as_matrix(merged32, spec) * (n / m)[..., None, :]
    return from_matrix(v, spec) - d


def dora_norms(params, adapters, config: LoraConfig):
    """``||W + scale * a @ b||`` per output unit of every DoRA leaf, for `lj.unmerge`.

    A DoRA-merged weight has columns of norm ``m``; the norm it was divided
    by is gone, so `lj.unmerge` needs it: compute it from the base before
    merging (PEFT caches the same vector when it merges).

    Args:
      params: the base params (arrays or quantized containers).
      adapters: the adapter tree (`LoraWeights` with ``m``).
      config: the `LoraConfig` (``use_dora=True``).

    Returns:
      A tree mirroring ``params``: float32 ``(*stacked, out)`` at each adapted
      leaf, None elsewhere.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w", use_dora=True)
      >>> ad = lj.init(params, cfg, key=jax.random.key(1))
      >>> ad = {"w": ad["w"]._replace(b=jnp.ones((2, 8)), m=2 * ad["w"].m)}
      >>> norms = lj.dora_norms(params, ad, cfg)
      >>> back = lj.unmerge(lj.merge(params, ad, cfg), ad, cfg, norms=norms)
      >>> bool(jnp.allclose(back["w"], params["w"], atol=1e-5))
      True
    """
    if not isinstance(config, LoraConfig):
        raise error("lj.dora_norms",
                    f"config must be a lj.LoraConfig, got {type(config).__name__}",
                    "pass the LoraConfig the adapters were made with", kind=TypeError)
    if not config.use_dora:
        raise error("lj.dora_norms", "config.use_dora is False; only DoRA adapters need "
                    "norms to be unmerged", "call lj.unmerge without norms=")
    entries = check_adapters(params, adapters, config)
    out = []
    for _, leaf, node, spec in entries:
        if spec is None:
            out.append(None)
            continue
        v = as_matrix(dense_float32(leaf) + delta(node, spec), spec)
        out.append(dense_column_norm(v))
    return unflatten_params(params, out)
