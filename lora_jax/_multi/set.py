"""Many adapters on one base: adapter sets, hot swap, mixed batches, composition.

An `AdapterSet` holds several named adapters for the same base as *one*
pytree. Every `LoraWeights` of it has a leading adapter axis::

    a: (n, *stacked, in, R)    b: (n, *stacked, R, out)    scale: (n,)
    m: (n, *stacked, out)      (DoRA sets only: every member a DoRA adapter)

so one adapter is ``x[i]`` of every leaf, and a stacked (``nn.scan``) leaf
keeps its layer axis right after the adapter axis -- the layout
`lj.init` gives one adapter, with one more axis in front. Adapters of
different ranks are zero-padded to the largest rank ``R`` at each path: zero
columns of ``a`` and zero rows of ``b`` add nothing to ``a @ b``, so padding
is exact, and every adapter of a set has the same shapes (which is what
makes swapping free). ``benchmarks/RESULTS.md`` compares padding with
grouping by rank. The set's `LoraConfig` (``aset.config``) has the padded
ranks; each adapter's own scale (``alpha / rank`` of *its* config) stays in
``scale``, so an adapter behaves exactly as it did alone.

What a set is for:

* **hot swap** -- `select_adapter` returns one adapter of the set as an
  ordinary adapter tree, for `lj.apply` / `lj.merge` with ``aset.config``.
  Every adapter has the same shapes and the scale is data, so changing the
  adapter between calls of a jitted apply never recompiles.
* **mixed batches** (`lora_jax._multi.mixed`) -- `apply_mixed` runs one forward pass in
  which every example uses its own adapter, or none (``"__base__"``). It maps the
  low-rank apply over the examples with `jax.vmap`, each example's adapter
  gathered from the set by its index: under ``vmap`` the frozen products
  ``x @ W`` stay single matmuls over the whole batch, while the low-rank
  products become batched matmuls over the gathered per-example factors,
  ``(x_e @ a[i_e]) @ b[i_e]`` -- the gather-batched form of Punica's BGMV /
  S-LoRA. No Python loop over adapters, and the indices are data: a new
  assignment of adapters to examples reuses the compiled program.
* **composition** (`lora_jax._multi.combine`) -- `combine` builds one adapter from weighted
  adapters of a set, as PEFT's ``add_weighted_adapter`` (``"cat"``, ``"svd"``,
  ``"linear"``); `merge_weighted` folds a weighted sum of adapters into the
  base weights at once.
* **checkpoints** (`lora_jax._multi.io`) -- `save_set` / `restore_set`:
  `lj.save` / `lj.restore` of the stacked tree, with the names and
  per-adapter configs in the step's metadata.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.weights import (
    LoraWeights,
    flatten_adapters,
    is_lora,
    is_node,
    map_adapters,
)

__all__ = ["BASE", "AdapterSet", "Member", "adapter_set", "add_adapter", "remove_adapter",
           "select_adapter", "adapter_ids", "check_set", "index_of", "targets_config"]

BASE = "__base__"
"""The name that means "no adapter" in `adapter_ids` / `apply_mixed` (as PEFT)."""


# ----------------------------------------------------------------------------- the set


class Member(NamedTuple):
    """One adapter of an `AdapterSet`, as it was added.

    Attributes:
      name: the adapter's name.
      config: the `LoraConfig` it was created with (its own ranks and alphas).
      ranks: ``((path, rank), ...)`` for every path it adapts, before padding.
    """

    name: str
    config: LoraConfig
    ranks: tuple

    def rank_for(self, path: str) -> int:
        """Its rank at ``path``; 0 where it does not adapt ``path``."""
        return dict(self.ranks).get(path, 0)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class AdapterSet:
    """Several named adapters for one base, held as one pytree.

    A pytree whose only data is ``adapters``; ``config`` and ``members`` are
    static (part of the tree structure), so an `AdapterSet` passes through
    ``jax.jit`` like any tree and recompiles only when adapters are added
    or removed. Build one with `adapter_set`; it is immutable
    (`add_adapter` / `remove_adapter` return new sets).

    Attributes:
      adapters: the stacked adapter tree, mirroring params: at each adapted
        leaf ``LoraWeights(a (n, *stacked, in, R), b (n, *stacked, R, out),
        scale (n,))``, else None.
      config: the set's `LoraConfig`: the union of the members' targets,
        ranks padded to the largest member rank per path. Use it with
        `select_adapter`'s trees.
      members: one `Member` per adapter, in index order.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((8, 6))}
      >>> c2, c4 = lj.LoraConfig(rank=2, targets="w"), lj.LoraConfig(rank=4, targets="w")
      >>> aset = lj.adapter_set({"small": (lj.init(params, c2, key=jax.random.key(0)), c2),
      ...                        "big": (lj.init(params, c4, key=jax.random.key(1)), c4)})
      >>> aset
      AdapterSet(n=2, names=('small', 'big'), paths=1, max rank=4)
      >>> aset.adapters["w"].a.shape, aset.config.rank
      ((2, 8, 4), 4)
    """

    adapters: Any
    config: LoraConfig
    members: tuple

    @property
    def names(self) -> tuple:
        """The adapters' names, in index order."""
        return tuple(m.name for m in self.members)

    @property
    def n(self) -> int:
        """The number of adapters."""
        return len(self.members)

    def index(self, name: str) -> int:
        """The index of the adapter called ``name``."""
        return index_of(self, name)

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        ranks = [r for m in self.members for _, r in m.ranks]
        paths = {p for m in self.members for p, _ in m.ranks}
        return (f"AdapterSet(n={self.n}, names={self.names}, paths={len(paths)}, "
                f"max rank={max(ranks) if ranks else 0})")


jax.tree_util.register_dataclass(AdapterSet, data_fields=["adapters"],
                                 meta_fields=["config", "members"])


def index_of(aset: AdapterSet, name, where: str = "AdapterSet.index") -> int:
    """The index of the adapter ``name`` (a str, or an int index); errors name ``where``."""
    if isinstance(name, str):
        if name in aset.names:
            return aset.names.index(name)
        raise error(where, f"no adapter called {name!r} in this set; it holds {list(aset.names)}",
                    "use one of these names (or add it with lj.add_adapter)")
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if -aset.n <= int(name) < aset.n:
            return int(name) % aset.n
        raise error(where, f"adapter index {int(name)} is out of range for a set of {aset.n} "
                           f"adapters {list(aset.names)}",
                    f"use an index in [-{aset.n}, {aset.n}), or the adapter's name")
    raise error(where, f"an adapter is named by a str (or an int index); got "
                       f"{type(name).__name__} {name!r}",
                f"pass one of the names {list(aset.names)}", kind=TypeError)


def _check_name(name, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise error(where, f"adapter names must be non-empty strs; got {name!r}",
                    "name every adapter with a str, e.g. 'de'", kind=TypeError)
    if name == BASE:
        raise error(where, f"{BASE!r} is reserved: it means 'no adapter' in adapter_ids",
                    "name the adapter something else")
    return name


def _check_member(name, adapters, config, where: str):
    """``(flat nodes, treedef, ranks)`` of one adapter, validated."""
    if isinstance(adapters, AdapterSet):
        raise error(where, f"adapter {name!r}: got an AdapterSet where one adapter tree was "
                           f"expected",
                    "pass lj.select_adapter(aset, name, trim=True) (with "
                    "aset.members[i].config), or combine the sets member by member",
                    kind=TypeError)
    if not isinstance(config, LoraConfig):
        raise error(where, f"adapter {name!r}: expected its lj.LoraConfig, got "
                           f"{type(config).__name__}",
                    "pass (adapters, config) pairs", kind=TypeError)
    flat, treedef = flatten_adapters(adapters)
    ranks = []
    for path, node in flat:
        if node is None:
            continue
        _check_member_node(name, path, node, config)
        ranks.append((path, int(np.shape(node.a)[-1])))
    if not ranks:
        raise error(where, f"adapter {name!r} holds no LoraWeights",
                    "pass the tree returned by lj.init / lj.restore")
    return flat, treedef, tuple(ranks)


def _check_member_node(name, path: str, node, config: LoraConfig) -> None:
    """One adapted leaf of adapter ``name``: a LoRA pair of the config's rank (with a
    DoRA magnitude exactly when its config has ``use_dora``)."""
    if not is_lora(node):
        raise error(path, f"adapter {name!r} has a fully-trained leaf here (LoraConfig.train). "
                          f"An adapter set holds LoRA factors only",
                    "fold such leaves into the base params before building the set, or serve "
                    "this adapter alone with lj.apply")
    sa, sb = tuple(np.shape(node.a)), tuple(np.shape(node.b))
    if len(sa) < 2 or len(sa) != len(sb) or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
        raise error(path, f"adapter {name!r} has a {sa} and b {sb}, not a LoRA pair "
                          f"(*stacked, in, r) / (*stacked, r, out)",
                    "pass adapters made by lj.init, lj.restore or lj.truncate")
    if (getattr(node, "m", None) is not None) != config.use_dora:
        has = "has a DoRA magnitude m" if node.m is not None else "has no DoRA magnitude m"
        raise error(path, f"adapter {name!r} {has} here but its config has "
                          f"use_dora={config.use_dora}",
                    "pass the config the adapter was made with")
    if np.ndim(node.scale) != 0:
        raise error(path, f"adapter {name!r} has a scale of shape "
                          f"{tuple(np.shape(node.scale))}; one adapter has a scalar scale (is "
                          f"this already an adapter set?)",
                    "pass single adapters, e.g. lj.select_adapter(aset, name, trim=True)")
    if sa[-1] != config.rank_for(path):
        raise error(path, f"adapter {name!r} has rank {sa[-1]} but its config gives rank "
                          f"{config.rank_for(path)}",
                    "pass the config the adapter was made with (after lj.truncate, the config "
                    "it returned)")


def targets_config(config: LoraConfig, members, paths: list) -> LoraConfig:
    """``config`` whose targets are ``paths``: kept as is if every member adapts
    exactly these paths, else exact-path targets (with the members' layouts)."""
    if all({p for p, _ in m.ranks} == set(paths) for m in members):
        return config.replace(train=())
    layouts = {}
    for m in members:
        for p, _ in m.ranks:
            lay = m.config.layout_for(p)
            if lay is not None:
                layouts.setdefault(p, lay)
    return config.replace(targets=tuple(re.escape(p) for p in paths), exclude=(), train=(),
                          layouts=tuple((re.escape(p), lay) for p, lay in layouts.items()))


def _build(items, where: str) -> AdapterSet:
    """An `AdapterSet` from ``[(name, adapters, config), ...]``; errors name ``where``."""
    if not items:
        raise error(where, "an adapter set needs at least one adapter",
                    "pass {'name': (adapters, config), ...}")
    names = [_check_name(n, where) for n, _, _ in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise error(where, f"adapter names must be unique; {dup} appear more than once",
                    "give every adapter its own name")
    checked = [(n, cfg, *_check_member(n, ad, cfg, where)) for n, ad, cfg in items]
    name0, _, flat0, treedef0, _ = checked[0]
    for name, _, flat, treedef, _ in checked[1:]:
        if treedef != treedef0:
            p0, p1 = {p for p, _ in flat0}, {p for p, _ in flat}
            raise error(where, f"adapter {name!r} does not have the tree structure of "
                               f"{name0!r}: adapters in a set must be for the same base.\n"
                               f"  only in {name0!r}: {sorted(p0 - p1)[:5]}\n"
                               f"  only in {name!r}: {sorted(p1 - p0)[:5]}",
                        "build every adapter with lj.init from the same params")
    members = tuple(Member(n, cfg, ranks) for n, cfg, _, _, ranks in checked)
    _check_one_kind(members, where)
    nodes, padded = [], {}
    for k, (path, _) in enumerate(flat0):
        here = [(m, flat[k][1]) for m, (_, _, flat, _, _) in zip(members, checked, strict=True)]
        node = _stack_path(path, here, members[0].config.use_dora)
        if node is not None:
            padded[path] = node.a.shape[-1]
        nodes.append(node)
    paths = list(padded)
    # Each member keeps its own scale (alpha / rank of its config): the stored ones win.
    config = targets_config(members[0].config, members, paths).with_ranks(padded).replace(
        scale_from="adapters")
    adapters = jax.tree_util.tree_unflatten(treedef0, nodes)
    return AdapterSet(adapters, config, members)


def _check_one_kind(members, where: str) -> None:
    """A set holds DoRA adapters only, or plain LoRA adapters only."""
    dora = [m.name for m in members if m.config.use_dora]
    if dora and len(dora) < len(members):
        plain = [m.name for m in members if not m.config.use_dora]
        raise error(where, f"adapters {dora} are DoRA adapters and {plain} are not; a set "
                           f"holds one kind (a DoRA weight is (W + s a b) scaled to the "
                           f"magnitudes m, a plain LoRA weight is not scaled)",
                    "build one set per kind, or merge the DoRA adapters into the base first")


def _stack_path(path: str, here: list, dora: bool):
    """The set's `LoraWeights` at ``path`` from ``[(member, node or None)]``: ranks
    zero-padded to the largest, scales kept (and DoRA magnitudes stacked); None
    when no member adapts it."""
    loras = [(m, x) for m, x in here if x is not None]
    if not loras:
        return None
    m0, x0 = loras[0]
    lead, n_in, n_out = np.shape(x0.a)[:-2], np.shape(x0.a)[-2], np.shape(x0.b)[-1]
    dtype = (jnp.dtype(x0.a.dtype), jnp.dtype(x0.b.dtype))
    for m, x in loras[1:]:
        got = (np.shape(x.a)[:-2], np.shape(x.a)[-2], np.shape(x.b)[-1])
        if got != (lead, n_in, n_out):
            raise error(path, f"adapter {m.name!r} has (stacked, in, out) = {got}, adapter "
                              f"{m0.name!r} has {(lead, n_in, n_out)}",
                        "the adapters must be for the same base weights with the same "
                        "LoraConfig.layouts")
        if (jnp.dtype(x.a.dtype), jnp.dtype(x.b.dtype)) != dtype:
            raise error(path, f"adapter {m.name!r} has a/b dtypes "
                              f"{jnp.dtype(x.a.dtype).name}/{jnp.dtype(x.b.dtype).name}, "
                              f"adapter {m0.name!r} has {dtype[0].name}/{dtype[1].name}",
                        "cast them to one dtype first, e.g. "
                        "jax.tree.map(lambda x: x.astype(jnp.float32), adapters)")
    if dora and len(loras) < len(here):
        raise error(path, f"DoRA adapters {[m.name for m, x in here if x is None]} leave "
                          f"this weight alone while {[m.name for m, _ in loras]} adapt it; "
                          f"a DoRA set needs every adapter on the same weights (the "
                          f"magnitude that leaves a weight unchanged depends on the base)",
                    "give every DoRA adapter of the set the same targets")
    r_max = max(np.shape(x.a)[-1] for _, x in loras)
    a = np.zeros((len(here), *lead, n_in, r_max), dtype[0])
    b = np.zeros((len(here), *lead, r_max, n_out), dtype[1])
    scale = np.zeros((len(here),), np.float32)
    for i, (_, x) in enumerate(here):
        if x is None:
            continue  # this adapter leaves the weight alone: zero factors
        r = np.shape(x.a)[-1]
        a[i, ..., :r] = np.asarray(x.a)
        b[i, ..., :r, :] = np.asarray(x.b)
        scale[i] = float(x.scale)
    m = jnp.asarray(np.stack([np.asarray(x.m) for _, x in loras])) if dora else None
    return LoraWeights(jnp.asarray(a), jnp.asarray(b), jnp.asarray(scale), m)


def _items(members) -> list:
    if isinstance(members, Mapping):
        out = []
        for name, pair in members.items():
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise error("lj.adapter_set", f"adapter {name!r}: expected an (adapters, config) "
                                              f"pair, got {type(pair).__name__}",
                            f"pass {{{name!r}: (adapters, config)}}", kind=TypeError)
            out.append((name, *pair))
        return out
    if isinstance(members, Sequence) and not isinstance(members, str):
        out = []
        for item in members:
            if not (isinstance(item, tuple) and len(item) == 3):
                raise error("lj.adapter_set",
                            f"expected (name, adapters, config) triples; got {item!r:.60}",
                            "pass [(name, adapters, config), ...]", kind=TypeError)
            out.append(item)
        return out
    raise error("lj.adapter_set", f"adapter_set takes {{name: (adapters, config)}} or a "
                                  f"sequence of (name, adapters, config); got "
                                  f"{type(members).__name__}",
                "pass {name: (adapters, config), ...}", kind=TypeError)


def adapter_set(members) -> AdapterSet:
    """Stacks named adapters for one base into an `AdapterSet`.

    Adapters of different ranks are zero-padded to the largest rank per
    path (exact). Adapters may adapt different weights: the set adapts the
    union, and an adapter holds zero factors where it adapts nothing. The
    set is built on the host (numpy) and placed on the default device.

    Args:
      members: ``{name: (adapters, config)}`` (insertion order is index
        order), or a sequence of ``(name, adapters, config)``. Each adapter
        tree is one adapter as `lj.init` / `lj.restore` return it, with its
        own `LoraConfig`; all must be for the same params.

    Returns:
      The `AdapterSet`.

    Raises:
      ValueError: a name is repeated or reserved (``"__base__"``); trees of
        different params; shapes or dtypes that differ at a path; fully
        trained (``LoraConfig.train``) leaves, which a set can't hold.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"q": jnp.zeros((8, 8)), "v": jnp.zeros((8, 8))}
      >>> cq = lj.LoraConfig(rank=2, targets="q")
      >>> cqv = lj.LoraConfig(rank=4, targets=("q", "v"))
      >>> aset = lj.adapter_set({"q-only": (lj.init(params, cq, key=jax.random.key(0)), cq),
      ...                        "qv": (lj.init(params, cqv, key=jax.random.key(1)), cqv)})
      >>> aset.names, aset.adapters["v"].a.shape, aset.adapters["v"].scale.tolist()
      (('q-only', 'qv'), (2, 8, 4), [0.0, 2.0])
    """
    return _build(_items(members), "lj.adapter_set")


def add_adapter(aset: AdapterSet, name: str, adapters, config: LoraConfig, *,
                replace: bool = False) -> AdapterSet:
    """A new set with one more adapter (the last index), or one replaced.

    The result has new shapes (one more adapter; a larger padded rank if the
    new adapter's rank is larger), so a function jitted on the old set
    compiles once for the new one. To change adapters without any
    recompilation, keep a set of fixed size and replace members
    (``replace=True`` keeps the index; same ranks keep the shapes).

    Args:
      aset: the set.
      name: the new adapter's name.
      adapters: the adapter tree (one adapter).
      config: its `LoraConfig`.
      replace: replace an existing adapter of that name in place (same
        index) instead of raising.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((8, 8))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> aset = lj.adapter_set({"a": (lj.init(params, cfg, key=jax.random.key(0)), cfg)})
      >>> aset = lj.add_adapter(aset, "b", lj.init(params, cfg, key=jax.random.key(1)), cfg)
      >>> aset.names, aset.adapters["w"].a.shape
      (('a', 'b'), (2, 8, 2))
    """
    check_set(aset, "add_adapter")
    _check_name(name, "lj.add_adapter")
    items = [(m.name, select_adapter(aset, m.name, trim=True), m.config) for m in aset.members]
    if name in aset.names:
        if not replace:
            raise error("lj.add_adapter", f"the set already holds an adapter called {name!r}",
                        "pass replace=True to replace it, or choose another name")
        items[aset.names.index(name)] = (name, adapters, config)
    else:
        items.append((name, adapters, config))
    return _build(items, "lj.add_adapter")


def remove_adapter(aset: AdapterSet, name: str) -> AdapterSet:
    """A new set without the adapter called ``name`` (later indices shift down).

    The padded ranks shrink if the removed adapter was the only one of the
    largest rank.

    Args:
      aset: the set.
      name: the adapter to remove.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((8, 8))}
      >>> c2, c4 = lj.LoraConfig(rank=2, targets="w"), lj.LoraConfig(rank=4, targets="w")
      >>> aset = lj.adapter_set({"a": (lj.init(params, c2, key=jax.random.key(0)), c2),
      ...                        "b": (lj.init(params, c4, key=jax.random.key(1)), c4)})
      >>> small = lj.remove_adapter(aset, "b")
      >>> small.names, small.config.rank
      (('a',), 2)
    """
    check_set(aset, "remove_adapter")
    i = index_of(aset, name, "lj.remove_adapter")
    if aset.n == 1:
        raise error("lj.remove_adapter", f"{name!r} is the set's only adapter; a set can't be "
                                         f"empty",
                    "keep it, or serve the base params without adapters")
    items = [(m.name, select_adapter(aset, m.name, trim=True), m.config)
             for k, m in enumerate(aset.members) if k != i]
    return _build(items, "lj.remove_adapter")


def check_set(aset, where: str) -> None:
    """Raises unless ``aset`` is an `AdapterSet`; ``where`` is the calling function's name."""
    if not isinstance(aset, AdapterSet):
        raise error(f"lj.{where}", f"expected an lj.AdapterSet, got {type(aset).__name__}",
                    "build one with lj.adapter_set({name: (adapters, config)})", kind=TypeError)


@jax.jit
def _take(adapters, i):
    def one(node):
        if node is None:
            return None
        return LoraWeights(*(None if x is None else lax.dynamic_index_in_dim(x, i, 0,
                                                                            keepdims=False)
                             for x in (node.a, node.b, node.scale, node.m)))
    return jax.tree.map(one, adapters, is_leaf=is_node)


def select_adapter(aset: AdapterSet, name, *, trim: bool = False):
    """One adapter of the set, as an ordinary adapter tree.

    By default the adapter keeps the set's padded ranks, so it goes with
    ``aset.config`` into `lj.apply` / `lj.merge` / `lj.save`, and every
    adapter of the set has the same shapes: a jitted
    ``lj.apply(fn, aset.config)`` never recompiles when it changes (hot
    swap). The selection is one compiled gather for every index, and
    ``name`` may also be a traced int (inside ``jit``).

    Args:
      aset: the set.
      name: the adapter's name, or its index (an int, or an int array under
        ``jit``).
      trim: return it at its own ranks, as it was added (pair it with
        ``aset.members[i].config``); None where it adapts nothing.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((8, 8))}
      >>> c2, c4 = lj.LoraConfig(rank=2, targets="w"), lj.LoraConfig(rank=4, targets="w")
      >>> a2 = lj.init(params, c2, key=jax.random.key(0))
      >>> a4 = lj.init(params, c4, key=jax.random.key(1))
      >>> aset = lj.adapter_set({"a": (a2, c2), "b": (a4, c4)})
      >>> lj.select_adapter(aset, "a")["w"].a.shape     # padded, for aset.config
      (8, 4)
      >>> back = lj.select_adapter(aset, "a", trim=True)
      >>> back["w"].a.shape, bool((back["w"].a == a2["w"].a).all())
      ((8, 2), True)
    """
    check_set(aset, "select_adapter")
    if isinstance(name, (jax.Array, np.ndarray)) and not trim:
        return _take(aset.adapters, jnp.asarray(name, jnp.int32))
    i = index_of(aset, name, "lj.select_adapter")
    out = _take(aset.adapters, jnp.int32(i))
    if not trim:
        return out
    member = aset.members[i]

    def cut(path, node):
        if node is None:
            return None
        r = member.rank_for(path)
        if r == 0:
            return None
        return LoraWeights(node.a[..., :r], node.b[..., :r, :], node.scale, node.m)
    return map_adapters(cut, out)


def adapter_ids(aset: AdapterSet, names: Sequence[str]):
    """Per-example adapter indices for `apply_mixed`: ``-1`` for ``"__base__"``.

    Args:
      aset: the set.
      names: one adapter name (or ``"__base__"``: no adapter) per example.

    Returns:
      An int32 array of shape ``(len(names),)``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((8, 8))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> aset = lj.adapter_set({n: (lj.init(params, cfg, key=jax.random.key(i)), cfg)
      ...                        for i, n in enumerate(["de", "fr"])})
      >>> lj.adapter_ids(aset, ["fr", "__base__", "de", "fr"]).tolist()
      [1, -1, 0, 1]
    """
    check_set(aset, "adapter_ids")
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise error("lj.adapter_ids", f"names must be a sequence of adapter names, one per "
                                      f"example; got {type(names).__name__}",
                    "e.g. ['fr', '__base__', 'de']", kind=TypeError)
    lookup = {n: i for i, n in enumerate(aset.names)}
    out = []
    for k, n in enumerate(names):
        if n == BASE:
            out.append(-1)
        elif n in lookup:
            out.append(lookup[n])
        else:
            raise error("lj.adapter_ids", f"example {k}: no adapter called {n!r}; the set "
                                          f"holds {list(aset.names)} (and {BASE!r} means none)",
                        "use one of these names per example")
    return jnp.asarray(np.asarray(out, np.int32).reshape(len(out)))
