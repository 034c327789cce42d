"""Paths, target matching and leaf layouts.

Inside the library a leaf is addressed by its JAX KeyPath; users see one
form, the ``'/'``-joined string that `path_str` produces
(``params/block_0/q/kernel``). Every error, log line and file key uses it.
Structure is never rebuilt by splitting strings: trees are always mapped
over (or loaded into) a skeleton.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._core.config import Layout, LoraConfig, LoraWarning

__all__ = ["path_str", "leaves_with_paths", "flatten_params", "LeafContainer",
           "is_container", "LeafSpec", "resolve", "Resolved", "dense_float32", "as_matrix"]


def _key_str(k) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(keypath) -> str:
    """The user-facing ``'/'``-joined form of a JAX KeyPath.

    An NNX ``Variable``'s trailing ``.value`` is dropped, so an NNX state and
    its pure dict show the same paths.

    Example:
      >>> import jax
      >>> tree = {"params": {"dense": {"kernel": 1.0}}, "layers": [2.0]}
      >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
      ['layers/0', 'params/dense/kernel']
    """
    keys = list(keypath)
    if len(keys) > 1 and isinstance(keys[-1], jax.tree_util.GetAttrKey) \
            and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_str(k) for k in keys)


class LeafContainer:
    """Base of pytree nodes that stand for *one* params leaf (quantized weights).

    A subclass (`lora_jax.NF4Weight`, `lora_jax.Int8Weight`) is a registered
    pytree whose children are storage arrays, so it passes through ``jit``,
    ``scan`` and ``device_put``; lora_jax flattens params with `is_container`
    as ``is_leaf``, so its path is the weight's path and ``shape``/``dtype``
    are the weight's logical ones.
    """

    shape: tuple
    dtype: Any
    _children: tuple = ()     # names of the storage arrays (the pytree children)

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


def dense_float32(leaf):
    """The weight ``leaf`` as a float32 array (dequantized if it is a container)."""
    if is_container(leaf):
        return leaf.dequantize(jnp.float32)
    return jnp.asarray(leaf, jnp.float32)


def flatten_params(params):
    """``(flat_with_paths, treedef)`` of params, containers kept as leaves."""
    return jax.tree_util.tree_flatten_with_path(params, is_leaf=is_container)


def leaves_with_paths(tree) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in flattening order (containers are leaves)."""
    return [(path_str(p), x) for p, x in flatten_params(tree)[0]]


def _matcher(spec) -> Callable[[str, Any], bool]:
    if callable(spec) and not isinstance(spec, tuple):
        return spec
    compiled = [re.compile(p) for p in spec]
    return lambda path, leaf: any(c.fullmatch(path) for c in compiled)


def _is_array_like(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _default_layout(leaf) -> Layout:
    nd = len(leaf.shape)
    return Layout(0, nd - 1, 1)


class LeafSpec(NamedTuple):
    """Everything the library knows about one adapted leaf.

    ``a`` has shape ``(*stacked_shape, in_size, rank)`` and ``b``
    ``(*stacked_shape, rank, out_size)``.
    """

    path: str
    shape: tuple
    dtype: Any
    layout: Layout
    rank: int
    alpha: float
    scale: float

    @property
    def stacked_shape(self) -> tuple:
        return tuple(self.shape[: self.layout.n_stacked])

    @property
    def in_shape(self) -> tuple:
        s = self.layout.n_stacked
        return tuple(self.shape[s: s + self.layout.n_in])

    @property
    def out_shape(self) -> tuple:
        return tuple(self.shape[self.layout.n_stacked + self.layout.n_in:])

    @property
    def in_size(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_size(self) -> int:
        return math.prod(self.out_shape)

    @property
    def a_shape(self) -> tuple:
        return (*self.stacked_shape, self.in_size, self.rank)

    @property
    def b_shape(self) -> tuple:
        return (*self.stacked_shape, self.rank, self.out_size)

    @property
    def n_adapter_params(self) -> int:
        return math.prod(self.a_shape) + math.prod(self.b_shape)


def as_matrix(x, spec: LeafSpec):
    """A weight-shaped array as ``(*stacked, in, out)``."""
    return jnp.reshape(x, (*spec.stacked_shape, spec.in_size, spec.out_size))


class Resolved(NamedTuple):
    """The outcome of matching a config against a params tree."""

    targets: dict  # path -> LeafSpec, in flattening order
    train: tuple   # paths trained fully


def _sample_paths(paths: list[str], n: int = 8) -> str:
    shown = paths[:n]
    more = f" ... ({len(paths) - n} more)" if len(paths) > n else ""
    return "\n  ".join(shown) + more


def _no_match_error(field, spec, arrays):
    example = arrays[0][0] if arrays else "params/dense/kernel"
    if isinstance(spec, tuple) and len(spec) == 1:
        spec = spec[0]
    return ValueError(
        f"LoraConfig.{field}={spec!r} matched no leaf of params. Patterns are "
        f"regexes fullmatched against '/'-joined paths; some real paths are:\n  "
        f"{_sample_paths([p for p, _ in arrays])}\n"
        f"Fix: write the pattern against these, e.g. {field}=r'{re.escape(example)}' "
        f"or r'.*/kernel'.")


def resolve(params, config: LoraConfig) -> Resolved:
    """Matches ``config`` against ``params`` and checks every targeted leaf.

    Raises:
      ValueError: a pattern matches nothing (the message lists real paths);
        a target can't be factorized (not a floating array with >= 2 axes
        beyond its stacked ones, or a layout that doesn't fit its shape); a
        rank exceeds ``min(in, out)``; a leaf is both a target and ``train``.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a lj.LoraConfig, got {type(config).__name__}.")
    items = leaves_with_paths(params)
    arrays = [(p, x) for p, x in items if _is_array_like(x)]
    is_target = _matcher(config.targets)
    is_excluded = _matcher(config.exclude)
    is_train = _matcher(config.train)

    if isinstance(config.targets, tuple) and len(config.targets) > 1:
        for pat in config.targets:
            if not any(re.fullmatch(pat, p) for p, _ in arrays):
                warnings.warn(
                    f"LoraConfig.targets pattern {pat!r} matched no leaf (the other "
                    f"patterns did).", LoraWarning, stacklevel=3)

    targets: dict[str, LeafSpec] = {}
    train: list[str] = []
    for path, leaf in items:
        hit = is_target(path, leaf) and not is_excluded(path, leaf)
        trained = bool(config.train) and is_train(path, leaf)
        if hit and trained:
            raise ValueError(
                f"{path}: matched by both LoraConfig.targets and LoraConfig.train. A leaf "
                f"is adapted with LoRA or trained fully, not both. Fix: narrow one pattern, "
                f"or add the path to exclude=.")
        if trained:
            if not _is_array_like(leaf):
                raise ValueError(f"{path}: LoraConfig.train matched a {type(leaf).__name__}, "
                                 f"not an array. Fix: narrow the train pattern.")
            train.append(path)
        if hit:
            targets[path] = _leaf_spec(path, leaf, config)

    if not targets:
        raise _no_match_error("targets", config.targets, arrays)
    if config.train and not train:
        raise _no_match_error("train", config.train, arrays)
    return Resolved(targets, tuple(train))


def _leaf_spec(path: str, leaf, config: LoraConfig) -> LeafSpec:
    if not _is_array_like(leaf):
        raise ValueError(
            f"{path}: LoraConfig.targets matched a {type(leaf).__name__}, not an array. "
            f"Fix: narrow the pattern to weight arrays, e.g. r'.*/kernel'.")
    dtype = np.dtype(leaf.dtype)
    if not (np.issubdtype(dtype, np.floating) or dtype.name in ("bfloat16",)):
        raise ValueError(
            f"{path}: can't adapt a {dtype.name} leaf {tuple(leaf.shape)}; LoRA needs a "
            f"floating-point weight. Fix: exclude it, e.g. exclude=r'{re.escape(path)}'.")
    shape = tuple(leaf.shape)
    layout = config.layout_for(path)
    if layout is None:
        if len(shape) < 2:
            raise ValueError(
                f"{path}: can't factorize a {len(shape)}-D leaf {shape} (a bias or norm "
                f"scale?); LoRA needs a matrix. Fix: narrow LoraConfig.targets to kernels, "
                f"or train it fully with train=r'{re.escape(path)}'.")
        layout = _default_layout(leaf)
    elif layout.ndim != len(shape):
        raise ValueError(
            f"{path}: layout {tuple(layout)} (n_stacked, n_in, n_out) covers {layout.ndim} "
            f"axes but the leaf has shape {shape}. Fix: set LoraConfig.layouts for this "
            f"path so n_stacked + n_in + n_out == {len(shape)}.")
    rank = config.rank_for(path)
    spec = LeafSpec(path, shape, dtype, layout, rank, config.alpha_for(path),
                    config.scale_for(path))
    if rank > min(spec.in_size, spec.out_size):
        raise ValueError(
            f"{path}: rank {rank} exceeds min(in, out) = min({spec.in_size}, "
            f"{spec.out_size}) for shape {shape} with layout {tuple(layout)}; the update "
            f"could never use it. Fix: lower the rank for this path, e.g. "
            f"rank_pattern={{r'{re.escape(path)}': {min(spec.in_size, spec.out_size)}}}, "
            f"or check LoraConfig.layouts if the axes are split wrongly.")
    return spec
