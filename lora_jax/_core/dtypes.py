"""Deliberate dtype promotion, valid under ``jax_numpy_dtype_promotion="strict"``.

lora_jax widens on purpose in a few places -- a low-rank sum is formed in
the wider of the output and adapter dtypes, a cotangent in the wider of its
operands' -- and must do so for users who run JAX with strict promotion
(which refuses every implicit widening, e.g. bfloat16 with float32).
`promote` applies JAX's standard lattice explicitly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["promote"]


def promote(*dtypes):
    """The dtype JAX's standard promotion gives ``dtypes``, whatever the config says.

    Example:
      >>> import jax.numpy as jnp
      >>> promote(jnp.bfloat16, jnp.float32)
      dtype('float32')
    """
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*(jnp.dtype(d) for d in dtypes))
