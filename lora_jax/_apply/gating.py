"""Per-token gates of a mixture of adapters: softmax, or softmax over the top k.

`lj.apply_mixture` gates each adapted matmul ``x W + sum_i g_i(x) s_i (x a_i) b_i``
with ``g(x) = gates(x @ router)``; `gates` is that map and `gate_blocks` spreads
each adapter's gate over its block of the rank axis of ``x a`` (the adapters'
factors side by side, `lora_jax._apply.lazy.LazyWeight.router`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax._core.dtypes import promote

__all__ = ["Gating", "gates", "gate_blocks"]


class Gating(NamedTuple):
    """How router logits become gates (static: part of the compiled program).

    Attributes:
      top_k: None for a softmax over all adapters; else the softmax over the
        ``top_k`` largest logits, every other gate exactly 0.
      temperature: the logits are divided by it first.
    """

    top_k: int | None = None
    temperature: float = 1.0


def gates(logits, gating: Gating):
    """Gates over the last axis of ``logits``, in ``logits``' dtype (at least float32).

    Top-k keeps exactly ``top_k`` entries (`lax.top_k`: of equal logits, the
    lower index), so ties never select more.

    Example:
      >>> import jax.numpy as jnp
      >>> g = gates(jnp.array([[0.0, 2.0, 1.0]]), Gating(top_k=2))
      >>> [round(float(v), 4) for v in g[0]]
      [0.0, 0.7311, 0.2689]
    """
    z = logits.astype(promote(logits.dtype, jnp.float32))
    if gating.temperature != 1.0:
        z = z / jnp.asarray(gating.temperature, z.dtype)
    n = z.shape[-1]
    if gating.top_k is None or gating.top_k >= n:
        return jax.nn.softmax(z, axis=-1)
    _, idx = lax.top_k(lax.stop_gradient(z), gating.top_k)
    keep = jnp.sum(jax.nn.one_hot(idx, n, dtype=jnp.int32), axis=-2) > 0
    return jax.nn.softmax(jnp.where(keep, z, jnp.asarray(-jnp.inf, z.dtype)), axis=-1)


def gate_blocks(t, logits, axis: int, gating: Gating):
    """``t`` (its ``axis``: n blocks of r, adapter-major) times each block's gate.

    ``logits`` has ``t``'s shape with ``n`` at ``axis``.
    """
    n = logits.shape[axis]
    g = jnp.moveaxis(gates(jnp.moveaxis(logits, axis, -1), gating), -1, axis)
    g = jnp.repeat(g, t.shape[axis] // n, axis=axis, total_repeat_length=t.shape[axis])
    return t * g.astype(t.dtype)
