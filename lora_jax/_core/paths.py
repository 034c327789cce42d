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
from typing import Any, NamedTuple, cast

import jax
import numpy as np

from lora_jax._core.config import Layout, LoraConfig, LoraWarning
from lora_jax._core.errors import error, message
from lora_jax._core.fmt import sample_paths
from lora_jax._core.leaf import is_container

__all__ = ["path_str", "flatten_params", "leaves_with_paths", "unflatten_params",
           "map_params", "mirror", "matcher", "is_array_like", "LeafSpec", "Resolved",
           "resolve"]


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
      >>> tree = {"params": {"dense": {"kernel": 1.0}}, "layers": [2.0]}
      >>> [path for path, _ in leaves_with_paths(tree)]
      ['layers/0', 'params/dense/kernel']
    """
    keys = list(keypath)
    if len(keys) > 1 and isinstance(keys[-1], jax.tree_util.GetAttrKey) \
            and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_str(k) for k in keys)


# ----------------------------------------------------------------------------- THE walk
#
# Every function of lora_jax that visits a params tree goes through the three
# functions below, so quantized containers (and any future LeafContainer) are
# one leaf everywhere: a test fails on any other flattening of params.


def flatten_params(params):
    """``(flat_with_keypaths, treedef)`` of params, containers kept as leaves."""
    return jax.tree_util.tree_flatten_with_path(params, is_leaf=is_container)


def leaves_with_paths(params) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` of params in flattening order (containers are leaves)."""
    return [(path_str(p), x) for p, x in flatten_params(params)[0]]


def unflatten_params(params, leaves):
    """A tree of ``params``' structure holding ``leaves`` (in flattening order)."""
    return jax.tree_util.tree_unflatten(flatten_params(params)[1], list(leaves))


def map_params(fn: Callable[[str, Any], Any], params):
    """``fn(path, leaf)`` at every leaf of params (containers are leaves).

    Example:
      >>> map_params(lambda path, x: path, {"a": {"b": 1.0}, "c": 2.0})
      {'a': {'b': 'a/b'}, 'c': 'c'}
    """
    return unflatten_params(params, [fn(p, x) for p, x in leaves_with_paths(params)])


def mirror(params, tree, *, what: str, fix: str, is_leaf=None, against: str = "params") -> list:
    """``tree``'s nodes at the leaf positions of ``params``, in flattening order.

    ``tree`` must have the structure of ``params`` down to its leaves (an
    adapter tree, DoRA norms, shardings); below them its nodes are taken
    whole. ``is_leaf`` says what a node of ``tree`` is when it is not a leaf
    of params' structure (e.g. ``None``, which is an empty pytree);
    ``against`` is how messages name ``params``.

    Raises:
      ValueError: ``tree`` does not mirror ``params``, at the first path
        where they differ, naming the paths missing on each side, ``what``
        the tree is and ``fix``.
    """
    flat, treedef = flatten_params(params)
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        leaf = is_leaf or (lambda x: x is None)
        ours = [path_str(p) for p, _ in
                jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)[0]]
        theirs = [path_str(p) for p, _ in flat]
        missing = sorted(set(theirs) - set(ours))[:5]
        extra = sorted(set(ours) - set(theirs))[:5]
        # Same paths on both sides: the trees differ in their node types only.
        where = (missing or extra or [against])[0]
        raise error(
            where,
            f"{what} does not mirror {against}: it must have the structure of {against}, "
            f"with one entry at each leaf.\n"
            f"  {against} leaves missing from {what}: {missing}\n"
            f"  {what} entries not in {against}: {extra}\n"
            f"  ({str(e).rstrip('.')})", fix) from None


# ----------------------------------------------------------------------------- matching


def matcher(spec) -> Callable[[str, Any], bool]:
    """A ``(path, leaf) -> bool`` predicate from a normalized pattern spec
    (a tuple of regexes, fullmatched, or a callable)."""
    if callable(spec) and not isinstance(spec, tuple):
        # The user's predicate, used as given (its result is only tested for truth).
        return cast(Callable[[str, Any], bool], spec)
    compiled = [re.compile(p) for p in spec]
    return lambda path, leaf: any(c.fullmatch(path) for c in compiled)


def is_array_like(x) -> bool:
    """Has ``shape`` and ``dtype``: an array, a ShapeDtypeStruct or a container."""
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _default_layout(leaf) -> Layout:
    nd = len(leaf.shape)
    return Layout(0, nd - 1, 1)


class LeafSpec(NamedTuple):
    """Everything the library knows about one adapted leaf.

    ``a`` has shape ``(*stacked_shape, in_size, rank)`` and ``b``
    ``(*stacked_shape, rank, out_size)``; the shapes list the weight's axes
    in ``layout.order`` (stacked, then input, then output axes).
    """

    path: str
    shape: tuple
    dtype: Any
    layout: Layout
    rank: int
    alpha: float
    scale: float

    @property
    def order(self) -> tuple:
        """The weight's axes as stacked, then input, then output axes."""
        return self.layout.order or tuple(range(len(self.shape)))

    @property
    def canonical_shape(self) -> tuple:
        """The weight's shape with its axes in `order`."""
        return tuple(self.shape[i] for i in self.order)

    @property
    def stacked_shape(self) -> tuple:
        return self.canonical_shape[: self.layout.n_stacked]

    @property
    def in_shape(self) -> tuple:
        s = self.layout.n_stacked
        return self.canonical_shape[s: s + self.layout.n_in]

    @property
    def out_shape(self) -> tuple:
        return self.canonical_shape[self.layout.n_stacked + self.layout.n_in:]

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


class Resolved(NamedTuple):
    """The outcome of matching a config against a params tree."""

    targets: dict  # path -> LeafSpec, in flattening order
    train: tuple   # paths trained fully


def _no_match_error(field, spec, arrays):
    example = arrays[0][0] if arrays else "params/dense/kernel"
    if isinstance(spec, tuple) and len(spec) == 1:
        spec = spec[0]
    return error(
        f"LoraConfig.{field}",
        f"{spec!r} matched no leaf of params; some real paths are:\n  "
        f"{sample_paths([p for p, _ in arrays])}\n"
        f"(patterns are regexes fullmatched against '/'-joined paths)",
        f"write the pattern against these, e.g. {field}=r'{re.escape(example)}' "
        f"or r'.*/kernel'")


def resolve(params, config: LoraConfig) -> Resolved:
    """Matches ``config`` against ``params`` and checks every targeted leaf.

    Raises:
      ValueError: a pattern matches nothing (the message lists real paths);
        a target can't be factorized (not a floating array with >= 2 axes
        beyond its stacked ones, or a layout that doesn't fit its shape); a
        rank exceeds ``min(in, out)``; a leaf is both a target and ``train``.
    """
    if not isinstance(config, LoraConfig):
        raise error("config", f"expected a lj.LoraConfig, got {type(config).__name__}",
                    "pass e.g. config=lj.LoraConfig(rank=8, targets=r'.*/kernel')",
                    kind=TypeError)
    items = leaves_with_paths(params)
    arrays = [(p, x) for p, x in items if is_array_like(x)]
    is_target = matcher(config.targets)
    is_excluded = matcher(config.exclude)
    is_train = matcher(config.train)

    if isinstance(config.targets, tuple) and len(config.targets) > 1:
        for pat in config.targets:
            if not any(re.fullmatch(pat, p) for p, _ in arrays):
                warnings.warn(message(
                    "LoraConfig.targets",
                    f"pattern {pat!r} matched no leaf (the other patterns did)",
                    "correct the pattern, or remove it"), LoraWarning, stacklevel=3)

    targets: dict[str, LeafSpec] = {}
    train: list[str] = []
    for path, leaf in items:
        hit = is_target(path, leaf) and not is_excluded(path, leaf)
        trained = bool(config.train) and is_train(path, leaf)
        if hit and trained:
            raise error(
                path, "matched by both LoraConfig.targets and LoraConfig.train. A leaf is "
                "adapted with LoRA or trained fully, not both",
                f"narrow one pattern, or add the path to exclude=, e.g. "
                f"exclude=r'{re.escape(path)}'")
        if trained:
            if not is_array_like(leaf):
                raise error(path, f"LoraConfig.train matched a {type(leaf).__name__}, not an "
                            f"array", "narrow the train pattern")
            train.append(path)
        if hit:
            targets[path] = _leaf_spec(path, leaf, config)

    if not targets:
        raise _no_match_error("targets", config.targets, arrays)
    if config.train and not train:
        raise _no_match_error("train", config.train, arrays)
    return Resolved(targets, tuple(train))


def _leaf_spec(path: str, leaf, config: LoraConfig) -> LeafSpec:
    if not is_array_like(leaf):
        raise error(path, f"LoraConfig.targets matched a {type(leaf).__name__}, not an array",
                    "narrow the pattern to weight arrays, e.g. r'.*/kernel'")
    dtype = np.dtype(leaf.dtype)
    if not (np.issubdtype(dtype, np.floating) or dtype.name in ("bfloat16",)):
        raise error(path, f"can't adapt a {dtype.name} leaf {tuple(leaf.shape)}; LoRA needs a "
                    f"floating-point weight", f"exclude it, e.g. exclude=r'{re.escape(path)}'")
    shape = tuple(leaf.shape)
    layout = config.layout_for(path)
    if layout is None:
        if len(shape) < 2:
            raise error(
                path, f"can't factorize a {len(shape)}-D leaf {shape} (a bias or norm "
                f"scale?); LoRA needs a matrix",
                f"narrow LoraConfig.targets to kernels, or train it fully with "
                f"train=r'{re.escape(path)}'")
        layout = _default_layout(leaf)
    elif layout.ndim != len(shape):
        raise error(
            path, f"layout {layout} (n_stacked, n_in, n_out) covers {layout.ndim} "
            f"axes but the leaf has shape {shape}",
            f"set LoraConfig.layouts for this path so n_stacked + n_in + n_out == "
            f"{len(shape)}")
    rank = config.rank_for(path)
    spec = LeafSpec(path, shape, dtype, layout, rank, config.alpha_for(path),
                    config.scale_for(path))
    if rank > min(spec.in_size, spec.out_size):
        raise error(
            path, f"rank {rank} exceeds min(in, out) = min({spec.in_size}, "
            f"{spec.out_size}) for shape {shape} with layout {layout}; the update "
            f"could never use it",
            f"lower the rank for this path, e.g. "
            f"rank_pattern={{r'{re.escape(path)}': {min(spec.in_size, spec.out_size)}}}, "
            f"or check LoraConfig.layouts if the axes are split wrongly")
    return spec
