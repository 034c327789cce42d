"""Sharding rules: where adapters and their optimizer state live on a mesh.

The base params are sharded by the user (FSDP, tensor parallel, both); the
adapters follow them, so ``x @ a`` and ``(x @ a) @ b`` are partitioned the
way ``x @ W`` already is and nothing new has to move:

* ``a: (*stacked, in, r)`` takes W's specs of its stacked axes and of its
  input axes, and replicates the rank axis;
* ``b: (*stacked, r, out)`` takes W's specs of its stacked axes and of its
  output axes, and replicates the rank axis;
* ``scale`` (a scalar) is replicated; a fully-trained leaf takes its param's
  sharding; optimizer state takes the sharding of the adapter leaf it
  mirrors, and everything else in it (step counts) is replicated.

A weight with several input (or output) axes, e.g. an out-projection
``(heads, head_dim, d)`` with layout ``(0, 2, 1)``, gives ``a`` one
flattened input axis of size ``heads * head_dim``. That axis gets the spec
of the *first sharded* of the merged axes, provided the flattened size is
divisible by that spec's device count (always, when W's own split is even);
otherwise it is replicated. When the
first sharded axis is the outermost merged axis (the usual case: heads
sharded), the blocks of ``a`` line up exactly with W's blocks; a split of an
inner axis is strided in W and becomes a contiguous split in ``a``, which is
still balanced but no longer aligned (XLA inserts what it needs). Adapters
are small; ``overrides`` fixes any leaf whose rule does not suit.

Everything here is pure: it reads shapes and shardings, never data, so it
works on ``jax.ShapeDtypeStruct`` trees (plan before allocating) and in a
multi-process program where no process holds whole arrays.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import jax
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.leaf import is_container
from lora_jax._core.paths import LeafSpec, leaves_with_paths, map_params, mirror, resolve
from lora_jax._core.weights import LoraWeights

__all__ = ["param_shardings", "adapter_shardings", "opt_state_shardings", "replicated",
           "spec_axes_size"]

P = PartitionSpec
_REPLICATED = P()   # `param_shardings`' default spec (a module constant, not a call per default)


# ----------------------------------------------------------------------------- spec helpers


def spec_axes_size(mesh, entry) -> int:
    """Devices one ``PartitionSpec`` entry splits an axis over (1 for None)."""
    if entry is None or entry is P.UNCONSTRAINED:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def _padded(spec: PartitionSpec, ndim: int) -> tuple:
    entries = tuple(spec)
    return entries + (None,) * (ndim - len(entries))


def replicated(sharding: Sharding) -> Sharding:
    """The fully replicated sharding on the devices of ``sharding``.

    Example:
      >>> import jax
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("data",))
      >>> replicated(NamedSharding(mesh, P("data"))).spec
      P()
    """
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(), memory_kind=sharding.memory_kind)
    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    raise error("replicated",
                f"can't build a replicated sharding from a {type(sharding).__name__}",
                "shard the params with jax.sharding.NamedSharding(mesh, PartitionSpec(...))",
                kind=TypeError)


def _merged_entry(mesh, entries: tuple, shape: tuple):
    """Spec of one flattened axis made of ``shape`` axes with ``entries`` specs."""
    size = math.prod(shape)
    for e in entries:
        if e is None or e is P.UNCONSTRAINED:
            continue
        return e if size % spec_axes_size(mesh, e) == 0 else None
    return None


def _check_spec(path: str, mesh, spec: PartitionSpec, shape: tuple, what: str) -> None:
    entries = tuple(spec)
    if len(entries) > len(shape):
        raise error(
            path, f"{what} {spec} has {len(entries)} entries but the array has shape {shape}",
            f"give at most {len(shape)} entries, e.g. {P(*([None] * len(shape)))}")
    used = []
    # Axes past the spec's last entry are replicated: nothing to check there.
    for axis, (e, n) in enumerate(zip(entries, shape[: len(entries)], strict=True)):
        if e is None or e is P.UNCONSTRAINED:
            continue
        names = e if isinstance(e, tuple) else (e,)
        for name in names:
            if name not in mesh.shape:
                raise error(
                    path, f"{what} {spec} names mesh axis {name!r}, but the mesh has axes "
                    f"{tuple(mesh.shape)}", "use one of those names")
            if name in used:
                raise error(path, f"{what} {spec} uses mesh axis {name!r} twice",
                            "shard each array axis over different mesh axes")
            used.append(name)
        k = spec_axes_size(mesh, e)
        if n % k:
            raise error(
                path, f"{what} {spec} splits axis {axis} (size {n}) over {k} devices, "
                f"which does not divide it",
                "replicate that axis (None) or shard it over fewer devices")


# ----------------------------------------------------------------------------- params


def _compile_rules(rules, where: str, what: str) -> list:
    """``[[compiled, value, used], ...]`` of ``where``'s argument ``what`` (``rules``)."""
    if rules is None:
        return []
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    try:
        items = list(items)
    except TypeError:
        raise error(where, f"{what} must be a mapping {{regex: PartitionSpec}} or a sequence "
                    f"of (regex, PartitionSpec) pairs; got {type(rules).__name__}",
                    f"pass e.g. {what}={{r'.*/fc2/kernel/b': P(None, 'model')}}",
                    kind=TypeError) from None
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise error(where, f"{what}: entry {item!r} is not a (regex, PartitionSpec) pair",
                        f"pass e.g. {what}={{r'.*/fc2/kernel/b': P(None, 'model')}}",
                        kind=TypeError)
        pattern, value = item
        if not isinstance(value, (PartitionSpec, Sharding)):
            raise error(where, f"{what}[{pattern!r}] is a {type(value).__name__}",
                        "use a jax.sharding.PartitionSpec (or a full Sharding)", kind=TypeError)
        try:
            out.append([re.compile(pattern), value, False])
        except re.error as e:
            raise error(where, f"{what}: {pattern!r} is not a valid regex ({e})",
                        "escape special characters, e.g. re.escape(name)") from None
    return out


def _first_rule(rules: list, path: str):
    for rule in rules:
        if rule[0].fullmatch(path):
            rule[2] = True
            return rule[1]
    return None


def _unused_rules_error(rules: list, paths: list[str], where: str, what: str):
    unused = [r[0].pattern for r in rules if not r[2]]
    if not unused:
        return None
    shown = "\n  ".join(paths[:8]) + (f"\n  ... ({len(paths) - 8} more)" if len(paths) > 8
                                        else "")
    return error(
        where, f"{what} patterns {unused} matched no path; some real paths are:\n  {shown}\n"
        f"(patterns are regexes fullmatched against '/'-joined paths)",
        "write the patterns against these")


def param_shardings(params, mesh, *, rules=None, default: PartitionSpec = _REPLICATED):
    """``NamedSharding``s for a params tree from ``{regex: PartitionSpec}`` rules.

    Each leaf takes the spec of the first rule whose regex fullmatches its
    ``'/'``-joined path, else ``default`` (replicated). A handy way to write
    FSDP or tensor-parallel layouts; any other way of producing
    ``NamedSharding``s works as well with `adapter_shardings`.

    Args:
      params: the params tree (arrays or ``jax.ShapeDtypeStruct``).
      mesh: a ``jax.sharding.Mesh``.
      rules: ``{regex: PartitionSpec}`` or a sequence of pairs; the first
        match wins. A pattern that matches nothing is an error.
      default: the spec of leaves no rule matches.

    Returns:
      A tree of ``NamedSharding`` mirroring ``params``.

    Raises:
      ValueError: a spec does not fit its leaf (too many entries, unknown
        mesh axis, or a size the devices don't divide), naming the path.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> params = {"q": {"kernel": jnp.ones((8, 8))}, "o": {"kernel": jnp.ones((8, 8))}}
      >>> sh = lj.param_shardings(params, mesh, rules={r"q/kernel": P(None, "model"),
      ...                                        r"o/kernel": P("model", None)})
      >>> sh["q"]["kernel"].spec, sh["o"]["kernel"].spec
      (P(None, 'model'), P('model', None))
    """
    compiled = _compile_rules(rules, "lj.param_shardings", "rules")
    paths = []

    def one(path, leaf):
        paths.append(path)
        spec = _first_rule(compiled, path)
        spec = default if spec is None else spec
        if isinstance(spec, Sharding):
            return spec
        _check_spec(path, mesh, spec, tuple(leaf.shape), "the rule's spec")
        if is_container(leaf) and any(e is not None for e in spec):
            raise error(
                path, f"a quantized weight ({type(leaf).__name__}) can't be sharded by "
                f"{spec}: its storage arrays do not have the weight's shape, and lora_jax "
                f"does not split them yet",
                "replicate it (a rule giving P(), or no rule with default=P()), or shard the "
                "float base and quantize per device")
        return NamedSharding(mesh, spec)

    out = map_params(one, params)
    err = _unused_rules_error(compiled, paths, "lj.param_shardings", "rules")
    if err:
        raise err
    return out


# ----------------------------------------------------------------------------- adapters


def _leaf_sharding(path: str, leaf):
    """A leaf's sharding; a quantized container's is its (replicated) storage's."""
    if not is_container(leaf):
        return getattr(leaf, "sharding", None)
    shs = {getattr(c, "sharding", None) for c in jax.tree.leaves(leaf)}
    if len(shs) == 1:
        sh = shs.pop()
        if sh is None or isinstance(sh, SingleDeviceSharding) or \
                (isinstance(sh, NamedSharding) and all(e is None for e in sh.spec)):
            return sh
    raise error(
        path, f"a quantized weight ({type(leaf).__name__}) whose storage arrays are not all "
        f"replicated alike ({sorted(map(str, shs))})",
        "replicate quantized weights (lj.param_shardings gives them P())")


def _sharding_of(path: str, leaf, given):
    sh = given if given is not None else _leaf_sharding(path, leaf)
    if isinstance(sh, (NamedSharding, SingleDeviceSharding)):
        return sh
    if sh is None:
        raise error(
            path, f"this params leaf ({type(leaf).__name__}) carries no sharding, so the "
            f"adapter's can't be derived from it",
            "pass params as jax.Arrays placed with jax.device_put(params, "
            "lj.param_shardings(params, mesh, rules=rules)), or "
            "jax.ShapeDtypeStruct(..., sharding=...), or pass shardings=<tree of "
            "NamedSharding mirroring params>", kind=TypeError)
    raise error(
        path, f"params leaf has a {type(sh).__name__}; the rules need a NamedSharding "
        f"(axis names tell which mesh axes split W's input and output)",
        "place the params with jax.sharding.NamedSharding(mesh, PartitionSpec(...))",
        kind=TypeError)


def _lora_shardings(sh, spec: LeafSpec) -> LoraWeights:
    if isinstance(sh, SingleDeviceSharding):
        return LoraWeights(sh, sh, sh, sh)
    mesh = sh.mesh
    lay = spec.layout
    padded = _padded(sh.spec, lay.ndim)
    entries = tuple(padded[i] for i in spec.order)     # stacked, input, output axes
    stacked = entries[: lay.n_stacked]
    e_in = _merged_entry(mesh, entries[lay.n_stacked: lay.n_stacked + lay.n_in], spec.in_shape)
    e_out = _merged_entry(mesh, entries[lay.n_stacked + lay.n_in:], spec.out_shape)
    kind = sh.memory_kind
    return LoraWeights(NamedSharding(mesh, P(*stacked, e_in, None), memory_kind=kind),
                       NamedSharding(mesh, P(*stacked, None, e_out), memory_kind=kind),
                       NamedSharding(mesh, P(), memory_kind=kind),
                       NamedSharding(mesh, P(*stacked, e_out), memory_kind=kind))  # DoRA's m


def _override(path: str, base: Sharding, value, shape: tuple) -> Sharding:
    if isinstance(value, Sharding):
        return value
    if not isinstance(base, NamedSharding):
        raise error(
            path, f"an override PartitionSpec needs a mesh, but the param is on a "
            f"{type(base).__name__}", "give the override as a full NamedSharding",
            kind=TypeError)
    _check_spec(path, base.mesh, value, shape, "override")
    return NamedSharding(base.mesh, value, memory_kind=base.memory_kind)


def adapter_shardings(params, config: LoraConfig, *, shardings=None, overrides=None):
    """Shardings of the adapter tree, derived from the base params' shardings.

    The result mirrors ``lj.init(params, config, ...)``: a `LoraWeights` of
    three shardings at each adapted leaf, the param's sharding at each
    fully-trained leaf, ``None`` elsewhere; it can be given as is to
    ``jax.device_put``, ``jax.jit(..., in_shardings=, out_shardings=)`` and
    ``lj.restore(..., shardings=)``.

    Rules (W's spec padded with ``None`` to W's rank):

    * ``a``: ``P(*W_stacked, W_in, None)``; ``b``: ``P(*W_stacked, None, W_out)``;
    * a flattened input/output axis (several W axes, see the leaf's
      `Layout`) takes the spec of the first sharded of them if its size is
      divisible by that spec's device count, else ``None``;
    * ``scale``: replicated; DoRA's ``m``: ``P(*W_stacked, W_out)``;
      fully-trained leaves: the param's sharding.

    Args:
      params: the base params: ``jax.Array``s with ``NamedSharding``s, or
        ``jax.ShapeDtypeStruct``s with ``sharding=`` (or any leaves with a
        shape and dtype when ``shardings`` is given).
      config: the `LoraConfig`.
      shardings: a tree of ``NamedSharding`` mirroring ``params``, used
        instead of the leaves' own shardings.
      overrides: ``{regex: PartitionSpec or Sharding}`` fullmatched against
        adapter leaf paths (``'params/block_0/mlp/fc2/kernel/b'``, or the
        param's path for a fully-trained leaf); the first match wins. A
        pattern that matches nothing is an error.

    Raises:
      TypeError: a targeted or trained params leaf has no sharding, or one
        that is not a ``NamedSharding``/``SingleDeviceSharding``.
      ValueError: an override does not fit its leaf, or matches nothing.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> params = {"fc1": jax.device_put(jnp.ones((16, 32)),
      ...                                 NamedSharding(mesh, P("data", "model"))),
      ...           "fc2": jax.device_put(jnp.ones((32, 16)),
      ...                                 NamedSharding(mesh, P("model", "data")))}
      >>> cfg = lj.LoraConfig(rank=4, targets="fc1|fc2")
      >>> sh = lj.adapter_shardings(params, cfg)
      >>> sh["fc1"].a.spec, sh["fc1"].b.spec, sh["fc1"].scale.spec
      (P('data', None), P(None, 'model'), P())
      >>> sh["fc2"].a.spec, sh["fc2"].b.spec
      (P('model', None), P(None, 'data'))
      >>> lj.adapter_shardings(params, cfg, overrides={"fc2/b": P()})["fc2"].b.spec
      P()
    """
    resolved = resolve(params, config)
    train = set(resolved.train)
    given = {}
    if shardings is not None:
        sh_leaves = mirror(params, shardings, what="shardings=",
                           fix="pass one Sharding per params leaf, e.g. "
                               "lj.param_shardings(params, mesh, rules=rules).")
        given = {path: sh for (path, _), sh in
                 zip(leaves_with_paths(params), sh_leaves, strict=True)}
    rules = _compile_rules(overrides, "lj.adapter_shardings", "overrides")
    paths = []

    def one(path, leaf):
        spec = resolved.targets.get(path)
        if spec is None and path not in train:
            return None
        sh = _sharding_of(path, leaf, given.get(path))
        if spec is None:
            paths.append(path)
            value = _first_rule(rules, path)
            return sh if value is None else _override(path, sh, value, tuple(leaf.shape))
        node = _lora_shardings(sh, spec)
        fields = {}
        dora = (("m", (*spec.stacked_shape, spec.out_size)),) if config.use_dora else ()
        for field, shape in (("a", spec.a_shape), ("b", spec.b_shape), ("scale", ()), *dora):
            fpath = f"{path}/{field}"
            paths.append(fpath)
            value = _first_rule(rules, fpath)
            fields[field] = (getattr(node, field) if value is None
                             else _override(fpath, sh, value, shape))
        return LoraWeights(**fields)

    out = map_params(one, params)
    err = _unused_rules_error(rules, paths, "lj.adapter_shardings", "overrides")
    if err:
        raise err
    return out


# ----------------------------------------------------------------------------- optimizer state


def _keys(keypath) -> tuple:
    """A hashable form of a KeyPath (the key objects themselves compare by value)."""
    return tuple(keypath)


def opt_state_shardings(opt_state, adapters, shardings):
    """Shardings of an optimizer state, following the adapter leaves it mirrors.

    Works on the state's structure alone, so any optax transformation does:
    a state leaf whose key path ends with an adapter leaf's key path and
    whose shape equals that leaf's (Adam's ``mu``/``nu``, momentum, ...)
    gets that leaf's sharding; every other leaf (step counts, factored
    statistics of another shape) is replicated on the adapters' devices.

    Args:
      opt_state: the state, or its abstract form
        ``jax.eval_shape(tx.init, adapters)``.
      adapters: the adapter tree (arrays or ``jax.ShapeDtypeStruct``), for
        key paths and shapes.
      shardings: the adapter shardings (see `adapter_shardings`).

    Returns:
      A tree of shardings mirroring ``opt_state``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> params = {"w": jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P(None, "model")))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(0))
      >>> tx = lj.optimizer(optax.adam(1e-3))
      >>> sh = lj.opt_state_shardings(jax.eval_shape(tx.init, ad), ad,
      ...                             lj.adapter_shardings(params, cfg))
      >>> adam = sh.inner_states["train"].inner_state[0]
      >>> adam.count.spec, adam.mu["w"].b.spec
      (P(), P(None, 'model'))
    """
    flat_ad, ad_def = jax.tree_util.tree_flatten_with_path(adapters)
    try:
        sh_leaves = ad_def.flatten_up_to(shardings)
    except (ValueError, TypeError) as e:
        raise error(
            "lj.opt_state_shardings", f"shardings do not mirror adapters ({e})",
            "pass lj.adapter_shardings(params, config) for the same params and config"
        ) from None
    by_keys = {_keys(p): (tuple(x.shape), s)
               for (p, x), s in zip(flat_ad, sh_leaves, strict=True)}
    if not by_keys:
        raise error("lj.opt_state_shardings", "adapters hold no arrays",
                    "pass the tree lj.init returned")
    first = next(iter(by_keys.values()))[1]
    default = replicated(first)
    longest = max(len(k) for k in by_keys)

    def one(keypath, leaf):
        keys = _keys(keypath)
        shape = tuple(getattr(leaf, "shape", ()))
        for n in range(min(longest, len(keys)), 0, -1):
            hit = by_keys.get(keys[-n:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(one, opt_state)
