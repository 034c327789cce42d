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
           "resolve", "register_adapter_node"]


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


# ----------------------------------------------------------------------------- params checks

# Node types of adapter trees (`LoraWeights`, registered by lora_jax._core.weights):
# one inside params means the adapters were passed where the params go.
_ADAPTER_NODES: list[type] = []


def register_adapter_node(cls):
    """Marks ``cls`` as an adapter-tree node that never belongs in params (a class
    decorator); `resolve` refuses params holding one."""
    _ADAPTER_NODES.append(cls)
    return cls


def _is_adapter_node(x) -> bool:
    return isinstance(x, tuple(_ADAPTER_NODES))


def _checked_items(params) -> list[tuple[str, Any]]:
    """`leaves_with_paths` of params, refusing adapter nodes in them (the adapter tree
    passed as params) and two leaves with one '/'-joined path (they would share an
    adapter, and one file key)."""
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: is_container(x) or _is_adapter_node(x))[0]
    for keypath, x in flat:
        if _is_adapter_node(x):
            raise error(
                path_str(keypath) or "params",
                f"params holds a {type(x).__name__} here: an adapter tree was passed where "
                f"the frozen params go (the arguments look swapped)",
                "pass the params first and the adapters second: lj.merge(params, adapters, "
                "config), lj.apply(fn, config)(params, adapters, *args)")
    seen: dict[str, Any] = {}
    for keypath, _ in flat:
        path = path_str(keypath)
        if path in seen:
            raise error(
                path, f"two leaves of params have this '/'-joined path, "
                f"{jax.tree_util.keystr(seen[path])} and {jax.tree_util.keystr(keypath)}; "
                f"lora_jax addresses leaves by it, so they would share one adapter and "
                f"collapse into one entry when saved",
                "rename one of the keys (e.g. the one holding '/') so every '/'-joined "
                "path is unique")
        seen[path] = keypath
    return [(path_str(p), x) for p, x in flat]


def _sample_or_none(paths: list[str]) -> str:
    return sample_paths(paths) if paths else "(none)"


def _check_exclude(config: LoraConfig, matched: list, excluded: list) -> None:
    """Each exclude pattern must remove a leaf that targets matches: one that removes
    nothing is a typo, or was written for another model."""
    if not config.exclude:
        return
    if not isinstance(config.exclude, tuple):   # a callable: it must exclude something
        if not excluded:
            raise error(
                "LoraConfig.exclude",
                f"{config.exclude!r} excludes none of the leaves LoraConfig.targets matches, "
                f"so it has no effect; targets matches:\n  {_sample_or_none(matched)}",
                "make it return True for a path above, or drop exclude=")
        return
    for pat in config.exclude:
        if not any(re.fullmatch(pat, p) for p in matched):
            raise error(
                "LoraConfig.exclude",
                f"pattern {pat!r} matches none of the leaves LoraConfig.targets matches, so "
                f"it excludes nothing (exclude only removes targeted leaves); targets "
                f"matches:\n  {_sample_or_none(matched)}",
                "write the pattern against these paths, or remove it")


def _check_patterns(config: LoraConfig, targeted: list, paths: list) -> None:
    """Each rank_pattern / alpha_pattern / layouts key must match a targeted leaf, each
    inferred_layouts key and tied path a leaf of params: else it never applies."""
    for field in ("rank_pattern", "alpha_pattern", "layouts"):
        for pat, _ in getattr(config, field):
            if any(re.fullmatch(pat, p) for p in targeted):
                continue
            other = [p for p in paths if re.fullmatch(pat, p)]
            why = (f"it matches only leaves that are not targeted ({other[0]}"
                   f"{', ...' if len(other) > 1 else ''})" if other else "it matches no leaf")
            raise error(
                f"LoraConfig.{field}",
                f"pattern {pat!r} matches no targeted leaf, so it never applies: {why}. The "
                f"targeted paths are:\n  {_sample_or_none(targeted)}\n(patterns are regexes "
                f"fullmatched against '/'-joined paths)",
                f"write the pattern against these paths (e.g. r'{re.escape(targeted[0])}'), "
                f"or remove it" if targeted else "remove it")
    for pat, _ in config.inferred_layouts:
        if not any(re.fullmatch(pat, p) for p in paths):
            raise error(
                "LoraConfig.inferred_layouts",
                f"path {pat!r} matches no leaf of params (the layouts were read for another "
                f"params tree); some real paths are:\n  {_sample_or_none(paths)}",
                "run lj.configure(config, fn, params, *args) again with these params")
    known = set(paths)
    for path in config.tied:
        if path not in known:
            raise error(
                "LoraConfig.tied",
                f"{path!r} is not the path of a leaf of params; some real paths are:\n  "
                f"{_sample_or_none(paths)}",
                "name tied weights by their '/'-joined path, or let lj.configure find them")


def resolve(params, config: LoraConfig) -> Resolved:
    """Matches ``config`` against ``params`` and checks every targeted leaf.

    Raises:
      ValueError: params hold adapter nodes (the arguments are swapped); two
        leaves share a '/'-joined path; a pattern applies nowhere (the
        message lists real paths: see `LoraConfig`); a target can't be
        factorized (not a floating array with >= 2 axes beyond its stacked
        ones, or a layout that doesn't fit its shape); a rank exceeds
        ``min(in, out)``; a leaf is both a target and ``train``.
    """
    if not isinstance(config, LoraConfig):
        raise error("config", f"expected a lj.LoraConfig, got {type(config).__name__}",
                    "pass e.g. config=lj.LoraConfig(rank=8, targets=r'.*/kernel')",
                    kind=TypeError)
    items = _checked_items(params)
    arrays = [(p, x) for p, x in items if is_array_like(x)]
    if isinstance(config.targets, tuple) and len(config.targets) > 1:
        for pat in config.targets:
            if not any(re.fullmatch(pat, p) for p, _ in arrays):
                warnings.warn(message(
                    "LoraConfig.targets",
                    f"pattern {pat!r} matched no leaf (the other patterns did)",
                    "correct the pattern, or remove it"), LoraWarning, stacklevel=3)

    matched, excluded, hits, train = _classify(items, config)
    if not hits:
        if matched:   # targets matched, exclude removed them all
            raise error(
                "LoraConfig.exclude",
                f"{_one(config.exclude)!r} excludes every leaf LoraConfig.targets "
                f"{_one(config.targets)!r} matches:\n  {sample_paths(matched)}",
                "narrow exclude= so some targets remain")
        raise _no_match_error("targets", config.targets, arrays)
    if config.train and not train:
        raise _no_match_error("train", config.train, arrays)
    _check_exclude(config, matched, excluded)
    _check_patterns(config, [p for p, _ in hits], [p for p, _ in items])
    targets = {path: _leaf_spec(path, leaf, config) for path, leaf in hits}
    return Resolved(targets, tuple(train))


def _one(spec):
    return spec[0] if isinstance(spec, tuple) and len(spec) == 1 else spec


def _classify(items, config: LoraConfig):
    """``(matched, excluded, hits, train)``: paths targets matches, those exclude
    removes, ``[(path, leaf)]`` adapted, and paths trained fully."""
    is_target = matcher(config.targets)
    is_excluded = matcher(config.exclude)
    is_train = matcher(config.train)
    matched: list[str] = []
    excluded: list[str] = []
    hits: list = []
    train: list[str] = []
    for path, leaf in items:
        hit = False
        if is_target(path, leaf):
            matched.append(path)
            if config.exclude and is_excluded(path, leaf):
                excluded.append(path)
            else:
                hit = True
                hits.append((path, leaf))
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
    return matched, excluded, hits, train


def _check_quantized_stack(path: str, leaf, layout: Layout) -> None:
    """A quantized weight's blocks are laid out per stacked slice only if it was
    quantized with the stacked axes the layout gives it: else a scan over its
    layers can't slice the storage (and blocks would span layers)."""
    settings = getattr(leaf, "settings", None)
    info = settings() if callable(settings) else None
    if not isinstance(info, dict):
        return
    stored = info.get("n_stacked")
    if stored is not None and int(stored) != layout.n_stacked:
        raise error(
            path, f"quantized with {stored} stacked (layer) axes, but the layout {layout} "
            f"has {layout.n_stacked}: its blocks are not laid out per layer",
            "quantize with the config that names the layout, e.g. "
            "lj.quantize(params, targets=..., config=config) (after lj.configure)")


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
    _check_quantized_stack(path, leaf, layout)
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
