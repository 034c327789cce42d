"""Leaf containers: pytree nodes that stand for one params leaf.

A quantized weight (`lj.NF4Weight`, `lj.Int8Weight`) is stored as several
arrays but is *one* weight to every part of lora_jax: it has the weight's
logical ``shape`` and ``dtype`` and densifies itself with ``dequantize()``.
The params flattener (`lora_jax._core.paths.flatten_params`) keeps
containers whole, so a container's path is the weight's path.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._core.errors import error

__all__ = ["LeafContainer", "is_container", "register_container", "dense_float32",
           "as_matrix", "from_matrix"]


class LeafContainer:
    """Base of pytree nodes that stand for *one* params leaf (quantized weights).

    A subclass (`lora_jax.NF4Weight`, `lora_jax.Int8Weight`) is registered
    with `register_container`: its children are storage arrays, so it passes
    through ``jit``, ``scan`` and ``device_put``, and ``shape``/``dtype`` are
    the weight's logical ones. Subclasses implement ``dequantize(*, dtype=None)``
    (the dense weight) and ``requantize(dense)`` (a new container with the same
    settings).
    """

    _children: tuple = ()     # names of the storage arrays (the pytree children)

    # The logical shape and dtype are properties of each subclass (computed from
    # its storage). Missing, they raise AttributeError, so `hasattr` stays False.
    @property
    def shape(self) -> tuple:
        """The weight's logical shape (``(*stacked, *in, *out)``)."""
        raise error(type(self).__name__, "this LeafContainer subclass defines no shape",
                    "define a `shape` property giving the weight's logical shape",
                    kind=AttributeError)

    @property
    def dtype(self) -> Any:
        """The weight's logical dtype (what ``dequantize()`` returns)."""
        raise error(type(self).__name__, "this LeafContainer subclass defines no dtype",
                    "define a `dtype` property giving the weight's logical dtype",
                    kind=AttributeError)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of storage (all children)."""
        return sum(math.prod(np.shape(c)) * np.dtype(c.dtype).itemsize
                   for c in (getattr(self, f) for f in self._children))


def is_container(x) -> bool:
    """True for a `LeafContainer` (use as ``is_leaf=`` when flattening params)."""
    return isinstance(x, LeafContainer)


def register_container(cls):
    """Registers a `LeafContainer` subclass as a pytree (a class decorator).

    Its ``_children`` (storage arrays) are the pytree children, keyed by
    attribute name; ``_aux()`` / ``_set_aux()`` give and take the static
    rest. Unflattening stores the children as they are, so the same class
    holds shardings, ``ShapeDtypeStruct``s or labels in a tree of them.
    """
    fields = cls._children

    def flatten_with_keys(x):
        return ([(jax.tree_util.GetAttrKey(f), getattr(x, f)) for f in fields], x._aux())

    def flatten(x):
        return [getattr(x, f) for f in fields], x._aux()

    def unflatten(aux, children):
        # Children may be anything here (shardings, ShapeDtypeStructs, labels):
        # store them as they are.
        obj = object.__new__(cls)
        for f, c in zip(fields, children, strict=True):
            object.__setattr__(obj, f, c)
        obj._set_aux(aux)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


def dense_float32(leaf):
    """The weight ``leaf`` as a float32 array (dequantized if it is a container)."""
    if is_container(leaf):
        return leaf.dequantize(dtype=jnp.float32)
    return jnp.asarray(leaf, jnp.float32)


def as_matrix(x, spec):
    """A weight-shaped array as ``(*stacked, in, out)`` (``spec``: its `LeafSpec`),
    its axes first put in the layout's order."""
    order = spec.order
    if order != tuple(range(len(order))):
        x = jnp.transpose(x, order)
    return jnp.reshape(x, (*spec.stacked_shape, spec.in_size, spec.out_size))


def from_matrix(m, spec):
    """Inverse of `as_matrix`: ``(*stacked, in, out)`` back to the weight's shape."""
    order = spec.order
    x = jnp.reshape(m, spec.canonical_shape)
    if order != tuple(range(len(order))):
        x = jnp.transpose(x, tuple(int(i) for i in np.argsort(order)))
    return x
