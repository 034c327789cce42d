"""Primitives the interpreter has rules for that ``jax.extend.core.primitives``
does not export, found by tracing the public function that binds them."""

from __future__ import annotations

import jax
from jax import lax

__all__ = ["primitive_of", "ragged_dot_p"]


def primitive_of(fn, *shapes):
    """The primitive ``fn`` binds first, on abstract arguments ``(shape, dtype)``."""
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    return jax.make_jaxpr(fn)(*args).eqns[0].primitive


ragged_dot_p = primitive_of(lax.ragged_dot, ((2, 2), "float32"), ((1, 2, 2), "float32"),
                            ((1,), "int32"))
"""``ragged_dot_general``: grouped matmuls (MoE experts), bound by ``lax.ragged_dot``."""
