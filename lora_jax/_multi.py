"""Many adapters on one base: adapter sets, hot swap, mixed batches, composition.

An `AdapterSet` holds several named adapters for the same base as *one*
pytree. Every `LoraWeights` of it has a leading adapter axis::

    a: (n, *stacked, in, R)    b: (n, *stacked, R, out)    scale: (n,)

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
* **mixed batches** -- `apply_mixed` runs one forward pass in which every
  example uses its own adapter, or none (``"__base__"``). It maps the
  low-rank apply over the examples with `jax.vmap`, each example's adapter
  gathered from the set by its index: under ``vmap`` the frozen products
  ``x @ W`` stay single matmuls over the whole batch, while the low-rank
  products become batched matmuls over the gathered per-example factors,
  ``(x_e @ a[i_e]) @ b[i_e]`` -- the gather-batched form of Punica's BGMV /
  S-LoRA. No Python loop over adapters, and the indices are data: a new
  assignment of adapters to examples reuses the compiled program.
* **composition** -- `combine` builds one adapter from weighted adapters of
  a set, as PEFT's ``add_weighted_adapter`` (``"cat"``, ``"svd"``,
  ``"linear"``); `merge_weighted` folds a weighted sum of adapters into the
  base weights at once.
* **checkpoints** -- `save_set` / `restore_set`: `lj.save` / `lj.restore`
  of the stacked tree, with the names and per-adapter configs in the step's
  metadata.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax._analysis import Analysis, Spectrum, _factor_svd
from lora_jax._apply import apply
from lora_jax._config import LoraConfig
from lora_jax._merge import _check_merged
from lora_jax._paths import path_str
from lora_jax._weights import LoraWeights, check_adapters, is_lora

__all__ = ["BASE", "AdapterSet", "Member", "Combination", "adapter_set", "add_adapter",
           "remove_adapter", "select_adapter", "adapter_ids", "apply_mixed", "combine",
           "merge_weighted", "save_set", "restore_set"]

BASE = "__base__"
"""The name that means "no adapter" in `adapter_ids` / `apply_mixed` (as PEFT)."""

_METADATA_KEY = "lora_jax.adapter_set"
_METHODS = ("cat", "svd", "linear")


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
        return _index(self, name)

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        ranks = [r for m in self.members for _, r in m.ranks]
        paths = {p for m in self.members for p, _ in m.ranks}
        return (f"AdapterSet(n={self.n}, names={self.names}, paths={len(paths)}, "
                f"max rank={max(ranks) if ranks else 0})")


jax.tree_util.register_dataclass(AdapterSet, data_fields=["adapters"],
                                 meta_fields=["config", "members"])


def _is_node(x) -> bool:
    return x is None or is_lora(x)


def _flat(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node)
    return [(path_str(p), n) for p, n in flat], treedef


def _index(aset: AdapterSet, name) -> int:
    if isinstance(name, str):
        if name in aset.names:
            return aset.names.index(name)
        raise ValueError(
            f"no adapter called {name!r} in this set; it holds {list(aset.names)}. Fix: use "
            f"one of these names (or add it with lj.add_adapter).")
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if -aset.n <= int(name) < aset.n:
            return int(name) % aset.n
        raise ValueError(f"adapter index {int(name)} is out of range for a set of {aset.n} "
                         f"adapters {list(aset.names)}.")
    raise TypeError(f"an adapter is named by a str (or an int index); got "
                    f"{type(name).__name__} {name!r}.")


def _check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"adapter names must be non-empty strs; got {name!r}.")
    if name == BASE:
        raise ValueError(f"{BASE!r} is reserved: it means 'no adapter' in adapter_ids. Fix: "
                         f"name the adapter something else.")
    return name


def _check_member(name, adapters, config):
    """``(flat nodes, treedef, ranks)`` of one adapter, validated."""
    if isinstance(adapters, AdapterSet):
        raise TypeError(f"adapter {name!r}: got an AdapterSet where one adapter tree was "
                        f"expected. Fix: pass lj.select_adapter(aset, name, trim=True) (with "
                        f"aset.members[i].config), or combine the sets member by member.")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"adapter {name!r}: expected its lj.LoraConfig, got "
                        f"{type(config).__name__}. Fix: pass (adapters, config) pairs.")
    flat, treedef = _flat(adapters)
    ranks = []
    for path, node in flat:
        if node is None:
            continue
        if not is_lora(node):
            raise ValueError(
                f"adapter {name!r}: {path} is a fully-trained leaf (LoraConfig.train). An "
                f"adapter set holds LoRA factors only. Fix: fold such leaves into the base "
                f"params before building the set, or serve this adapter alone with lj.apply.")
        sa, sb = tuple(np.shape(node.a)), tuple(np.shape(node.b))
        if len(sa) < 2 or len(sa) != len(sb) or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
            raise ValueError(
                f"adapter {name!r}: {path} has a {sa} and b {sb}, not a LoRA pair "
                f"(*stacked, in, r) / (*stacked, r, out). Fix: pass adapters made by lj.init, "
                f"lj.restore or lj.truncate.")
        if getattr(node, "m", None) is not None:
            raise ValueError(
                f"adapter {name!r}: {path} is a DoRA adapter (it has a magnitude m). Adapter "
                f"sets hold plain LoRA adapters (as PEFT, mixed batches exclude DoRA). Fix: "
                f"serve DoRA adapters alone with lj.apply, or merge them into the base.")
        if np.ndim(node.scale) != 0:
            raise ValueError(
                f"adapter {name!r}: {path} has a scale of shape {tuple(np.shape(node.scale))}; "
                f"one adapter has a scalar scale (is this already an adapter set?). Fix: pass "
                f"single adapters, e.g. lj.select_adapter(aset, name, trim=True).")
        if sa[-1] != config.rank_for(path):
            raise ValueError(
                f"adapter {name!r}: {path} has rank {sa[-1]} but its config gives rank "
                f"{config.rank_for(path)}. Fix: pass the config the adapter was made with "
                f"(after lj.truncate, the config it returned).")
        ranks.append((path, int(sa[-1])))
    if not ranks:
        raise ValueError(f"adapter {name!r} holds no LoraWeights. Fix: pass the tree returned "
                         f"by lj.init / lj.restore.")
    return flat, treedef, tuple(ranks)


def _host(x) -> np.ndarray:
    return np.asarray(x)


def _with_ranks(config: LoraConfig, ranks: dict, *, unit_scale: bool = False) -> LoraConfig:
    """``config`` giving exactly ``ranks[path]`` at each path (scale 1 if asked)."""
    values = set(ranks.values())
    changes: dict = {}
    if len(values) == 1:
        changes.update(rank=values.pop(), rank_pattern=())
    else:
        changes.update(rank_pattern=tuple((re.escape(p), r) for p, r in ranks.items()))
    if unit_scale:  # alpha = rank: scale_for(path) == 1, as PEFT's combined adapters
        changes.update(use_rslora=False, alpha_pattern=())
        if "rank" in changes:
            changes.update(alpha=float(changes["rank"]))
        else:
            changes.update(alpha_pattern=tuple((re.escape(p), float(r))
                                               for p, r in ranks.items()))
    return config.replace(**changes)


def _targets_config(config: LoraConfig, members, paths: list) -> LoraConfig:
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


def _build(items) -> AdapterSet:
    """An `AdapterSet` from ``[(name, adapters, config), ...]``."""
    if not items:
        raise ValueError("an adapter set needs at least one adapter. Fix: pass "
                         "{'name': (adapters, config), ...}.")
    names = [_check_name(n) for n, _, _ in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"adapter names must be unique; {dup} appear more than once.")
    checked = [(n, cfg, *_check_member(n, ad, cfg)) for n, ad, cfg in items]
    name0, _, flat0, treedef0, _ = checked[0]
    for name, _, flat, treedef, _ in checked[1:]:
        if treedef != treedef0:
            p0, p1 = {p for p, _ in flat0}, {p for p, _ in flat}
            raise ValueError(
                f"adapter {name!r} does not have the tree structure of {name0!r}: adapters in a "
                f"set must be for the same base.\n"
                f"  only in {name0!r}: {sorted(p0 - p1)[:5]}\n  only in {name!r}: "
                f"{sorted(p1 - p0)[:5]}\n"
                f"Fix: build every adapter with lj.init from the same params.")
    members = tuple(Member(n, cfg, ranks) for n, cfg, _, _, ranks in checked)
    nodes, padded = [], {}
    for k, (path, _) in enumerate(flat0):
        here = [(m, flat[k][1]) for m, (_, _, flat, _, _) in zip(members, checked)]
        loras = [(m, x) for m, x in here if x is not None]
        if not loras:
            nodes.append(None)
            continue
        m0, x0 = loras[0]
        lead, n_in, n_out = np.shape(x0.a)[:-2], np.shape(x0.a)[-2], np.shape(x0.b)[-1]
        dtype = (jnp.dtype(x0.a.dtype), jnp.dtype(x0.b.dtype))
        for m, x in loras[1:]:
            got = (np.shape(x.a)[:-2], np.shape(x.a)[-2], np.shape(x.b)[-1])
            if got != (lead, n_in, n_out):
                raise ValueError(
                    f"{path}: adapter {m.name!r} has (stacked, in, out) = {got}, adapter "
                    f"{m0.name!r} has {(lead, n_in, n_out)}. Fix: the adapters must be for the "
                    f"same base weights with the same LoraConfig.layouts.")
            if (jnp.dtype(x.a.dtype), jnp.dtype(x.b.dtype)) != dtype:
                raise ValueError(
                    f"{path}: adapter {m.name!r} has a/b dtypes "
                    f"{jnp.dtype(x.a.dtype).name}/{jnp.dtype(x.b.dtype).name}, adapter "
                    f"{m0.name!r} has {dtype[0].name}/{dtype[1].name}. Fix: cast them to one "
                    f"dtype first, e.g. jax.tree.map(lambda x: x.astype(jnp.float32), adapters).")
        r_max = max(np.shape(x.a)[-1] for _, x in loras)
        padded[path] = r_max
        a = np.zeros((len(here), *lead, n_in, r_max), dtype[0])
        b = np.zeros((len(here), *lead, r_max, n_out), dtype[1])
        scale = np.zeros((len(here),), np.float32)
        for i, (_, x) in enumerate(here):
            if x is None:
                continue  # this adapter leaves the weight alone: zero factors
            r = np.shape(x.a)[-1]
            a[i, ..., :r] = _host(x.a)
            b[i, ..., :r, :] = _host(x.b)
            scale[i] = float(x.scale)
        nodes.append(LoraWeights(jnp.asarray(a), jnp.asarray(b), jnp.asarray(scale)))
    paths = list(padded)
    config = _with_ranks(_targets_config(members[0].config, members, paths), padded)
    adapters = jax.tree_util.tree_unflatten(treedef0, nodes)
    return AdapterSet(adapters, config, members)


def _items(members) -> list:
    if isinstance(members, Mapping):
        out = []
        for name, pair in members.items():
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"adapter {name!r}: expected an (adapters, config) pair, got "
                                f"{type(pair).__name__}.")
            out.append((name, *pair))
        return out
    if isinstance(members, Sequence) and not isinstance(members, str):
        out = []
        for item in members:
            if not (isinstance(item, tuple) and len(item) == 3):
                raise TypeError(f"expected (name, adapters, config) triples; got {item!r:.60}.")
            out.append(item)
        return out
    raise TypeError(f"adapter_set takes {{name: (adapters, config)}} or a sequence of "
                    f"(name, adapters, config); got {type(members).__name__}.")


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
    return _build(_items(members))


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
    _check_set(aset, "add_adapter")
    _check_name(name)
    items = [(m.name, select_adapter(aset, m.name, trim=True), m.config) for m in aset.members]
    if name in aset.names:
        if not replace:
            raise ValueError(f"the set already holds an adapter called {name!r}. Fix: pass "
                             f"replace=True to replace it, or choose another name.")
        items[aset.names.index(name)] = (name, adapters, config)
    else:
        items.append((name, adapters, config))
    return _build(items)


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
    _check_set(aset, "remove_adapter")
    i = _index(aset, name)
    if aset.n == 1:
        raise ValueError(f"{name!r} is the set's only adapter; a set can't be empty. Fix: keep "
                         f"it, or serve the base params without adapters.")
    items = [(m.name, select_adapter(aset, m.name, trim=True), m.config)
             for k, m in enumerate(aset.members) if k != i]
    return _build(items)


def _check_set(aset, where):
    if not isinstance(aset, AdapterSet):
        raise TypeError(f"lj.{where}: expected an lj.AdapterSet, got {type(aset).__name__}. "
                        f"Fix: build one with lj.adapter_set({{name: (adapters, config)}}).")


@jax.jit
def _take(adapters, i):
    def one(node):
        if node is None:
            return None
        return LoraWeights(*(lax.dynamic_index_in_dim(x, i, 0, keepdims=False)
                             for x in (node.a, node.b, node.scale)))
    return jax.tree.map(one, adapters, is_leaf=_is_node)


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
      >>> aset = lj.adapter_set({"a": (a2, c2), "b": (lj.init(params, c4, key=jax.random.key(1)), c4)})
      >>> lj.select_adapter(aset, "a")["w"].a.shape     # padded, for aset.config
      (8, 4)
      >>> back = lj.select_adapter(aset, "a", trim=True)
      >>> back["w"].a.shape, bool((back["w"].a == a2["w"].a).all())
      ((8, 2), True)
    """
    _check_set(aset, "select_adapter")
    if isinstance(name, (jax.Array, np.ndarray)) and not trim:
        return _take(aset.adapters, jnp.asarray(name, jnp.int32))
    i = _index(aset, name)
    out = _take(aset.adapters, jnp.int32(i))
    if not trim:
        return out
    member = aset.members[i]

    def cut(keypath, node):
        if node is None:
            return None
        r = member.rank_for(path_str(keypath))
        if r == 0:
            return None
        return LoraWeights(node.a[..., :r], node.b[..., :r, :], node.scale)
    return jax.tree_util.tree_map_with_path(cut, out, is_leaf=_is_node)


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
    _check_set(aset, "adapter_ids")
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a sequence of adapter names, one per example; got "
                        f"{type(names).__name__}. Fix: e.g. ['fr', '__base__', 'de'].")
    lookup = {n: i for i, n in enumerate(aset.names)}
    out = []
    for k, n in enumerate(names):
        if n == BASE:
            out.append(-1)
        elif n in lookup:
            out.append(lookup[n])
        else:
            raise ValueError(f"example {k}: no adapter called {n!r}; the set holds "
                             f"{list(aset.names)} (and {BASE!r} means none).")
    return jnp.asarray(np.asarray(out, np.int32).reshape(len(out)))


# ----------------------------------------------------------------------------- mixed batches


def _ids_array(aset: AdapterSet, ids):
    if isinstance(ids, (list, tuple)) and ids and all(isinstance(n, str) for n in ids):
        return adapter_ids(aset, ids)
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"adapter_ids must be one int per example (shape (batch,)), got "
            f"{ids.dtype.name}{tuple(ids.shape)}. Fix: lj.adapter_ids(aset, names).")
    if not isinstance(ids, jax.core.Tracer):
        bad = np.asarray(ids)
        bad = bad[(bad < -1) | (bad >= aset.n)]
        if bad.size:
            raise ValueError(
                f"adapter_ids hold {sorted(set(bad.tolist()))[:5]}, outside [-1, {aset.n}) for a "
                f"set of {aset.n} adapters (-1 means the base). Fix: lj.adapter_ids(aset, names).")
    return ids.astype(jnp.int32)


def _example_adapters(aset: AdapterSet, i):
    """The adapter of one example (a vmapped index): zero scale for the base."""
    n = aset.n
    valid = (i >= 0) & (i < n)
    j = jnp.clip(i, 0, n - 1)

    def one(node):
        if node is None:
            return None
        a = lax.dynamic_index_in_dim(node.a, j, 0, keepdims=False)
        b = lax.dynamic_index_in_dim(node.b, j, 0, keepdims=False)
        s = lax.dynamic_index_in_dim(node.scale, j, 0, keepdims=False)
        return LoraWeights(a, b, jnp.where(valid, s, jnp.zeros_like(s)))
    return jax.tree.map(one, aset.adapters, is_leaf=_is_node)


def _arg_axes(in_axes, args) -> list:
    if in_axes is None or (isinstance(in_axes, int) and not isinstance(in_axes, bool)):
        return [in_axes] * len(args)
    if isinstance(in_axes, (tuple, list)) and len(in_axes) == len(args) and all(
            a is None or (isinstance(a, int) and not isinstance(a, bool)) for a in in_axes):
        return list(in_axes)
    raise ValueError(
        f"in_axes={in_axes!r} must be an int, None, or a tuple with one int/None per "
        f"positional argument of fn after params ({len(args)} given). Fix: e.g. in_axes=0 "
        f"when every array argument has the examples on axis 0.")


def apply_mixed(fn: Callable, *, in_axes=0, out_axes: int = 0,
                strict: bool = False) -> Callable:
    """Returns ``f(params, adapter_set, adapter_ids, *args, **kwargs)``: one adapter per example.

    ``f`` runs ``fn`` on a batch in which example ``e`` uses adapter
    ``adapter_ids[e]`` of the set (``-1``: none, the base model), all in one
    call: output ``e`` equals ``lj.apply(fn, aset.config)(params,
    lj.select_adapter(aset, adapter_ids[e]), *args_e)`` for that example
    alone. ``fn`` is mapped over the examples with `jax.vmap` (each example
    sees a batch of one), every example's factors gathered from the set by
    its index: the frozen matmuls stay whole-batch matmuls, and the
    low-rank ones become batched matmuls over the gathered factors (no loop
    over adapters). ``adapter_ids`` is data: jit ``f`` once and any
    assignment of adapters runs without recompiling.

    Cost: the gathered factors take batch x the adapter's size of temporary
    memory. On the reference decoder (2 CPU cores, ``benchmarks/RESULTS.md``)
    a mixed batch of 64 x 128 tokens runs at the single-adapter speed; at one
    token per example the gathers dominate (0.65x a single adapter, still 3x
    a loop over the adapters).

    ``fn`` must treat examples independently (inference: no batch
    statistics, no cross-example ops). Array leaves of ``args`` carry the
    examples on axis ``in_axes``; ``kwargs`` are the same for every example.

    Args:
      fn: ``fn(params, *args, **kwargs)`` as for `lj.apply`.
      in_axes: the example axis of the array leaves of ``args``: an int for
        all, or a tuple with one int (or None: shared by all examples) per
        positional argument.
      out_axes: the example axis of every output leaf.
      strict: as for `lj.apply`: raise instead of materializing a weight at
        a use with no low-rank rule.

    The returned ``f`` takes the base ``params``, an `AdapterSet`, the
    per-example indices (an int array from `adapter_ids`, or a list of names
    outside ``jit``), then ``fn``'s arguments.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
      >>> fn = lambda p, x: x @ p["w"]
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> def adapter(seed):
      ...     ad = lj.init(params, cfg, key=jax.random.key(seed))
      ...     return {"w": ad["w"]._replace(b=jnp.ones((2, 4)))}, cfg
      >>> aset = lj.adapter_set({"x": adapter(1), "y": adapter(2)})
      >>> xs = jax.random.normal(jax.random.key(3), (3, 5, 8))     # 3 examples
      >>> ids = lj.adapter_ids(aset, ["y", "__base__", "x"])
      >>> out = jax.jit(lj.apply_mixed(fn))(params, aset, ids, xs)
      >>> alone = lj.apply(fn, aset.config)(params, lj.select_adapter(aset, "y"), xs[:1])
      >>> bool(jnp.allclose(out[0], alone[0], atol=1e-5)), bool(jnp.allclose(out[1], fn(params, xs[1])))
      (True, True)
    """
    if not callable(fn):
        raise TypeError(f"lj.apply_mixed: fn must be callable (e.g. model.apply); got "
                        f"{type(fn).__name__}.")
    if isinstance(out_axes, bool) or not isinstance(out_axes, int) or out_axes < 0:
        raise ValueError(f"lj.apply_mixed: out_axes={out_axes!r} must be an int >= 0.")
    if not isinstance(strict, bool):
        raise TypeError(f"lj.apply_mixed: strict must be a bool; got {strict!r}.")
    if not (in_axes is None or isinstance(in_axes, (int, tuple, list))) or isinstance(in_axes, bool):
        _arg_axes(in_axes, ())  # raises, naming the accepted forms

    def mixed(params, adapter_set, adapter_ids, *args, **kwargs):
        _check_set(adapter_set, "apply_mixed")
        check_adapters(params, adapter_set.adapters, adapter_set.config)
        ids = _ids_array(adapter_set, adapter_ids)
        n_ex = ids.shape[0]
        axes = _arg_axes(in_axes, args)
        leaves, where = [], []           # all leaves of args; (position, axis) of batched ones
        per_arg = [jax.tree.flatten(a) for a in args]
        for j, ((flat, _), ax) in enumerate(zip(per_arg, axes)):
            for leaf in flat:
                if ax is not None and hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
                    if leaf.ndim <= ax or leaf.shape[ax] != n_ex:
                        raise ValueError(
                            f"lj.apply_mixed: argument {j} has a leaf of shape "
                            f"{tuple(leaf.shape)} whose axis {ax} should hold the {n_ex} "
                            f"examples that adapter_ids names. Fix: one id per example, or "
                            f"in_axes=(...) with None for arguments shared by all examples.")
                    where.append((len(leaves), ax))
                leaves.append(leaf)
        inner = apply(fn, adapter_set.config, strict=strict)

        def one(i, batched):
            full = list(leaves)
            for (pos, ax), x in zip(where, batched):
                full[pos] = jnp.expand_dims(x, ax)     # each example is a batch of one
            it = iter(full)
            ex_args = [jax.tree.unflatten(td, [next(it) for _ in flat]) for flat, td in per_arg]
            out = inner(params, _example_adapters(adapter_set, i), *ex_args, **kwargs)

            def squeeze(y):
                if jnp.ndim(y) <= out_axes or jnp.shape(y)[out_axes] != 1:
                    raise ValueError(
                        f"lj.apply_mixed: fn's output for one example has shape "
                        f"{tuple(jnp.shape(y))}, with no example axis {out_axes} of size 1. "
                        f"Fix: set out_axes to the outputs' batch axis; fn must keep one "
                        f"output per example.")
                return jnp.squeeze(y, out_axes)
            return jax.tree.map(squeeze, out)

        batched = [leaves[pos] for pos, _ in where]
        return jax.vmap(one, in_axes=(0, [ax for _, ax in where]), out_axes=out_axes)(
            ids, batched)

    return mixed


# ----------------------------------------------------------------------------- composition


class Combination(NamedTuple):
    """What `combine` returns: ``adapters, config, report = lj.combine(...)``.

    Attributes:
      adapters: the combined adapter (one adapter tree; scale 1).
      config: its `LoraConfig` (``alpha = rank`` per path, so scale 1).
      report: an `Analysis` with, per layer, the singular values of the exact
        weighted sum ``sum_i w_i * scale_i * a_i @ b_i`` and ``error``, the
        relative Frobenius distance of the result to it (0 for ``"cat"``;
        with ``"svd"`` also ``rank_kept``, so its table shows the energy
        kept).
    """

    adapters: Any
    config: LoraConfig
    report: Analysis


def _weights(aset: AdapterSet, weights) -> list:
    """``[(member index, weight), ...]`` validated."""
    if isinstance(weights, Mapping):
        pairs = [(_index(aset, n) if n != BASE else None, w) for n, w in weights.items()]
        if any(i is None for i, _ in pairs):
            raise ValueError(f"{BASE!r} is not an adapter and can't be weighted.")
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        if len(weights) != aset.n:
            raise ValueError(
                f"{len(weights)} weights for a set of {aset.n} adapters {list(aset.names)}. "
                f"Fix: one weight per adapter, or a {{name: weight}} dict for some of them.")
        pairs = list(enumerate(weights))
    else:
        raise TypeError(f"weights must be {{name: weight}} or a sequence with one weight per "
                        f"adapter; got {type(weights).__name__}.")
    for i, w in pairs:
        if isinstance(w, bool) or not isinstance(w, (int, float, np.number)) \
                or not math.isfinite(float(w)):
            raise ValueError(f"the weight of {aset.names[i]!r} is {w!r}; weights must be "
                             f"finite numbers (negative subtracts the adapter).")
    if not pairs:
        raise ValueError("no adapters to combine: weights is empty.")
    return [(i, float(w)) for i, w in pairs]


def _gram_error(a_new, b_new, a_ref, b_ref) -> np.ndarray:
    """``||a_new b_new - a_ref b_ref||_F / ||a_ref b_ref||_F`` per leading index,
    from the factors' Gram matrices (the in x out matrices are never formed)."""
    x = np.concatenate([a_new, -a_ref], -1)
    y = np.concatenate([b_new, b_ref], -2)
    t = np.swapaxes

    def sq(p, q):
        return np.maximum(np.einsum("...ij,...ji->...", t(p, -1, -2) @ p, q @ t(q, -1, -2)), 0.0)
    ref = sq(a_ref, b_ref)
    return np.sqrt(sq(x, y) / np.where(ref > 0, ref, 1.0))


def _refactor(a, b, k):
    """Best rank-``k`` factors (scale 1) of ``a @ b`` from the factors, zero-padded to k."""
    left, s, right = _factor_svd(LoraWeights(a, b, np.float64(1.0)))
    kk = min(k, s.shape[-1])
    root = np.sqrt(s[..., :kk])
    a2 = left[..., :, :kk] * root[..., None, :]
    b2 = root[..., :, None] * right[..., :kk, :]
    if kk < k:
        pad = k - kk
        a2 = np.concatenate([a2, np.zeros((*a2.shape[:-1], pad))], -1)
        b2 = np.concatenate([b2, np.zeros((*b2.shape[:-2], pad, b2.shape[-1]))], -2)
    return a2, b2, s


def combine(aset: AdapterSet, weights, *, method: str = "svd",
            rank: int | None = None) -> Combination:
    """One adapter from a weighted combination of a set's adapters (PEFT's
    ``add_weighted_adapter``).

    Each adapter ``i`` contributes ``w_i * scale_i * a_i @ b_i``; weights may
    be negative (subtract an adapter). The result has scale 1 (its config has
    ``alpha = rank``), as in PEFT. Methods:

    * ``"cat"``: exact. ``a = [w_i s_i a_i]`` and ``b = [b_i]`` concatenated
      along the rank: rank ``sum r_i``. Where that exceeds ``min(in, out)``
      the factors are re-factorized (still exactly) at ``min(in, out)``.
    * ``"svd"``: the weighted sum truncated to ``rank`` (default: the largest
      member rank, PEFT's default) -- its best rank-k approximation, taken
      from the factors: QR of the concatenated factors and the SVD of a
      small ``sum r_i``-square core, never the dense ``in x out`` update.
      The report gives the energy kept per layer.
    * ``"linear"``: PEFT's ``linear``: ``a = sum_i sign(w_i s_i)
      sqrt|w_i s_i| a_i``, ``b = sum_i sqrt|w_i s_i| b_i`` (all ranks
      equal). Cheap, but **not** the weighted sum of the updates (cross
      terms ``a_i b_j`` appear); the report measures how far off it is.

    Factors are combined in float64 on the host and cast to the set's dtype.

    Args:
      aset: the set.
      weights: ``{name: weight}`` for the adapters to combine, or a sequence
        with one weight per adapter of the set.
      method: ``"cat"``, ``"svd"`` or ``"linear"``.
      rank: the target rank for ``"svd"`` (capped at ``min(in, out)``).

    Returns:
      ``Combination(adapters, config, report)``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((16, 12))}
      >>> cfg = lj.LoraConfig(rank=4, alpha=8, targets="w")
      >>> def adapter(seed):
      ...     ad = lj.init(params, cfg, key=jax.random.key(seed))
      ...     b = jax.random.normal(jax.random.key(seed + 100), (4, 12))
      ...     return {"w": ad["w"]._replace(b=b)}, cfg
      >>> aset = lj.adapter_set({"x": adapter(0), "y": adapter(1)})
      >>> exact = lj.merge_weighted(params, aset, {"x": 1.0, "y": -0.5})["w"]
      >>> cat = lj.combine(aset, {"x": 1.0, "y": -0.5}, method="cat")
      >>> cat.config.rank, bool(jnp.allclose(lj.merge(params, cat.adapters, cat.config)["w"], exact, atol=1e-5))
      (8, True)
      >>> svd = lj.combine(aset, {"x": 1.0, "y": -0.5}, method="svd", rank=8)   # full rank: exact
      >>> float(svd.report.spectra[0].error) < 1e-6
      True
      >>> lj.combine(aset, {"x": 1.0, "y": -0.5}, method="svd").config.rank    # default: max rank
      4
    """
    _check_set(aset, "combine")
    if method not in _METHODS:
        raise ValueError(f"combine: method={method!r}; use one of {_METHODS} ('cat' is exact, "
                         f"'svd' truncates, 'linear' is PEFT's approximate one).")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer))
                             or rank < 1):
        raise ValueError(f"combine: rank={rank!r} must be a positive int.")
    if rank is not None and method != "svd":
        raise ValueError(f"combine: rank= applies to method='svd' only (cat's rank is the sum "
                         f"of the ranks, linear's the common rank); got method={method!r}.")
    pairs = _weights(aset, weights)
    flat, treedef = _flat(aset.adapters)
    nodes, ranks, rows = [], {}, []
    for path, node in flat:
        parts = [(i, w, aset.members[i].rank_for(path)) for i, w in pairs]
        parts = [(i, w, r) for i, w, r in parts if r > 0]
        if node is None or not parts:
            nodes.append(None)
            continue
        a_all, b_all, s_all = _host(node.a), _host(node.b), _host(node.scale)
        dtype = node.a.dtype
        f64 = np.float64
        # the exact weighted sum, as concatenated factors (PEFT's cat: weights on a)
        a_cat = np.concatenate([w * f64(s_all[i]) * a_all[i, ..., :r].astype(f64)
                                for i, w, r in parts], -1)
        b_cat = np.concatenate([b_all[i, ..., :r, :].astype(f64) for i, _, r in parts], -2)
        n_in, n_out = a_cat.shape[-2], b_cat.shape[-1]
        _, sv, _ = _factor_svd(LoraWeights(a_cat, b_cat, f64(1.0)))
        lead = a_cat.shape[:-2]
        if method == "cat":
            k = min(a_cat.shape[-1], n_in, n_out)
            a_new, b_new = (a_cat, b_cat) if k == a_cat.shape[-1] else _refactor(a_cat, b_cat, k)[:2]
            err = np.zeros(lead)
        elif method == "svd":
            k = min(rank or max(r for _, _, r in parts), n_in, n_out)
            a_new, b_new, _ = _refactor(a_cat, b_cat, k)
            err = None
        else:
            rs = {aset.names[i]: r for i, _, r in parts}
            if len(set(rs.values())) > 1:
                raise ValueError(
                    f"combine(method='linear'): {path} has adapters of different ranks {rs}; "
                    f"'linear' adds the factors themselves, so it needs one rank. Fix: use "
                    f"method='cat' (exact) or 'svd'.")
            k = next(iter(rs.values()))
            a_new = sum(math.copysign(math.sqrt(abs(w * float(s_all[i]))), w * float(s_all[i]))
                        * a_all[i, ..., :r].astype(f64) for i, w, r in parts)
            b_new = sum(math.sqrt(abs(w * float(s_all[i]))) * b_all[i, ..., :r, :].astype(f64)
                        for i, w, r in parts)
            err = _gram_error(a_new, b_new, a_cat, b_cat)
        ranks[path] = k
        for idx in np.ndindex(*lead):
            sp = Spectrum(path, tuple(int(j) for j in idx), (n_in, n_out), sv[idx])
            if method == "svd":
                sp = dataclasses.replace(sp, rank_kept=k, error=sp.error_at(k))
            else:
                sp = dataclasses.replace(sp, error=float(err[idx]))
            rows.append(sp)
        nodes.append(LoraWeights(jnp.asarray(a_new.astype(dtype)),
                                 jnp.asarray(b_new.astype(node.b.dtype)),
                                 jnp.asarray(1.0, jnp.float32)))
    members = [aset.members[i] for i, _ in pairs]
    config = _with_ranks(_targets_config(aset.config, members, list(ranks)), ranks,
                         unit_scale=True)
    adapters = jax.tree_util.tree_unflatten(treedef, nodes)
    return Combination(adapters, config, Analysis(tuple(rows)))


def merge_weighted(params, aset: AdapterSet, weights):
    """Folds a weighted sum of a set's adapters into the base weights at once.

    Each adapted weight becomes ``W + sum_i w_i * scale_i * a_i @ b_i``,
    computed in float32 (as `lj.merge`) and cast back to ``W``'s dtype;
    weights may be negative. Outside ``jit`` it raises on NaN/Inf updates and
    warns when the cast erases most of an update, like `lj.merge`.

    Args:
      params: the base params the set is for.
      aset: the set.
      weights: ``{name: weight}`` or one weight per adapter of the set.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((4, 4))}
      >>> cfg = lj.LoraConfig(rank=1, alpha=1, targets="w")
      >>> ones = {"w": lj.LoraWeights(jnp.ones((4, 1)), jnp.ones((1, 4)), jnp.float32(1.0))}
      >>> aset = lj.adapter_set({"x": (ones, cfg), "y": (ones, cfg)})
      >>> float(lj.merge_weighted(params, aset, {"x": 2.0, "y": -0.5})["w"][0, 0])
      1.5
    """
    _check_set(aset, "merge_weighted")
    pairs = _weights(aset, weights)
    w = np.zeros((aset.n,), np.float32)
    for i, x in pairs:
        w[i] += x
    w = jnp.asarray(w)
    leaves = []
    for path, leaf, node, spec in check_adapters(params, aset.adapters, aset.config):
        if spec is None:
            leaves.append(leaf)
            continue
        coef = w * jnp.asarray(node.scale, jnp.float32)
        a = jnp.asarray(node.a, jnp.float32) * coef.reshape((-1,) + (1,) * (node.a.ndim - 1))
        d = jnp.einsum("n...ir,n...ro->...io", a, jnp.asarray(node.b, jnp.float32),
                       precision=lax.Precision.HIGHEST).reshape(spec.shape)
        new = (jnp.asarray(leaf, jnp.float32) + d).astype(leaf.dtype)
        _check_merged(path, leaf, new, d)
        leaves.append(new)
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


# ----------------------------------------------------------------------------- checkpoints


def save_set(directory, aset: AdapterSet, *, params=None, step: int | None = None,
             metadata: Mapping | None = None) -> int:
    """Saves an `AdapterSet` as one checkpoint step (see `lj.save`).

    The stacked tree is saved with ``aset.config`` (every array hashed, base
    fingerprinted when ``params`` are given); the names and each adapter's
    own config go in the step's metadata.

    Args:
      directory: the checkpoint root.
      aset: the set.
      params: the base params: checks the set against them and stores a
        base fingerprint that `restore_set` verifies.
      step: the step number (default: one after the latest, or 0).
      metadata: extra JSON-able user data stored with the step.

    Returns:
      The step written.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> c2, c4 = lj.LoraConfig(rank=2, targets="w"), lj.LoraConfig(rank=4, targets="w")
      >>> aset = lj.adapter_set({"a": (lj.init(params, c2, key=jax.random.key(1)), c2),
      ...                        "b": (lj.init(params, c4, key=jax.random.key(2)), c4)})
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = lj.save_set(d, aset, params=params)
      ...     back = lj.restore_set(d, params)
      >>> back.names, back.members[0].config == c2, bool((back.adapters["w"].b == aset.adapters["w"].b).all())
      (('a', 'b'), True, True)
    """
    from lora_jax._checkpoint import save

    _check_set(aset, "save_set")
    meta = dict(metadata or {})
    if _METADATA_KEY in meta:
        raise ValueError(f"metadata key {_METADATA_KEY!r} is reserved for the set's names.")
    meta[_METADATA_KEY] = {
        "names": list(aset.names),
        "configs": [m.config.to_dict() for m in aset.members],
        "ranks": [[[p, r] for p, r in m.ranks] for m in aset.members],
    }
    return save(directory, aset.adapters, aset.config, step=step, params=params, metadata=meta)


def restore_set(directory, params=None, *, step: int | None = None,
                on_base_mismatch: str = "error") -> AdapterSet:
    """Restores an `AdapterSet` written by `save_set` (verified as `lj.restore`).

    Args:
      directory: the checkpoint root.
      params: the base params: the set comes back as a tree mirroring them
        (needed by `apply_mixed` and `merge_weighted`), checked against the
        stored fingerprint. Without params, ``adapters`` is a flat
        ``{path: LoraWeights}`` dict (enough for `select_adapter`/`combine`).
      step: which step (default: the latest).
      on_base_mismatch: ``"error"``, ``"warn"`` or ``"ignore"`` when
        ``params`` differ from the fingerprinted base.

    Returns:
      The `AdapterSet`.

    Raises:
      lj.CheckpointError: the step holds a single adapter, not a set (use
        `lj.restore`), or is corrupted.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.ones((8, 8))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> aset = lj.adapter_set({"a": (lj.init(params, cfg, key=jax.random.key(1)), cfg)})
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = lj.save_set(d, aset)
      ...     lj.restore_set(d).names
      ('a',)
    """
    from lora_jax._checkpoint import CheckpointError, Checkpointer

    with Checkpointer(directory, read_only=True) as ck:
        info = ck.inspect(step)
        meta = (info.metadata or {}).get(_METADATA_KEY)
        where = f"{ck.directory}/{info.step}"
        if meta is None:
            raise CheckpointError(
                f"{where}: this step holds a single adapter, not an adapter set. Fix: restore "
                f"it with lj.restore, or save sets with lj.save_set.")
        adapters, config = ck.restore(params, step=info.step, on_base_mismatch=on_base_mismatch)
    try:
        members = tuple(Member(n, LoraConfig.from_dict(c), tuple((p, int(r)) for p, r in rk))
                        for n, c, rk in zip(meta["names"], meta["configs"], meta["ranks"],
                                            strict=True))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: the adapter-set metadata can't be read ({e}).") from e
    for _, node in _flat(adapters)[0]:
        if is_lora(node) and np.shape(node.scale) != (len(members),):
            raise CheckpointError(
                f"{where}: the metadata names {len(members)} adapters but the arrays hold "
                f"{np.shape(node.scale)}; the step is inconsistent. Fix: restore another step.")
    return AdapterSet(adapters, config, members)
