"""Restoring a step into a skeleton: slots, checks, verified arrays, the adapter tree.

The target slots come from ``params`` and the saved config, or from ``like=``;
they are checked against the record before any array is read; every array
read back is verified against its sha256; then the adapter tree (and the
optimizer state and PRNG key, when asked) is assembled.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._checkpoint.manager import ARRAYS_ITEM, STATE_ITEM, orbax_checkpoint
from lora_jax._checkpoint.record import (
    FACTOR_KINDS,
    KIND_NAMES,
    CheckpointError,
    array_record,
    build_node,
    check_finite_values,
    fields,
    kind_of,
    records,
)
from lora_jax._core.errors import error
from lora_jax._core.paths import flatten_params, path_str
from lora_jax._core.weights import flatten_adapters

__all__ = ["expected_nodes", "check_slots", "restore_arrays", "assemble", "abstract_opt_state",
           "state_abstract", "unpack_state"]


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _shardings_by_path(shardings) -> dict | jax.sharding.Sharding | None:
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings
    return dict(flatten_adapters(shardings, adalora=True)[0])


def _sharding(shardings, path, field, like_leaf):
    if isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if isinstance(shardings, dict) and shardings.get(path) is not None:
        node = shardings[path]
        return getattr(node, field) if field else node
    sh = getattr(like_leaf, "sharding", None)
    if isinstance(sh, jax.sharding.Sharding):
        return sh
    return _default_sharding()


def expected_nodes(rec, params, like) -> tuple[list[tuple[str, Any]], Any]:
    """``[(path, like_node)]`` for every slot of the target tree, and its treedef.

    The like nodes carry the shapes/dtypes the caller expects (None for a
    frozen slot). Without params or like, the flat ``{path: node}`` form.
    """
    entries = rec["entries"]
    if like is not None:
        return flatten_adapters(like, adalora=True)
    if params is not None:
        flat, treedef = flatten_params(params)
        paths = [path_str(p) for p, _ in flat]
        return [(p, None if entries.get(p) is None else _abstract_node(entries[p]))
                for p in paths], treedef
    return [(p, _abstract_node(e)) for p, e in entries.items()], None


def _abstract_node(e):
    """The node an entry restores to, its arrays as ``jax.ShapeDtypeStruct``."""
    if e["kind"] in FACTOR_KINDS:
        return build_node(e["kind"], {f: _sds(e[f]) for f in fields(e)})
    return _sds(e["array"])


def _sds(arec):
    return jax.ShapeDtypeStruct(tuple(arec["shape"]), jnp.dtype(arec["dtype"]))


def _shape_of(x):
    return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def _some(paths: list) -> str:
    """Up to 8 of ``paths``, and how many more there are."""
    return f"{paths[:8]}" + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")


def check_slots(rec, slots, where, dtype, used_like: bool):
    """Compares the target slots with what was saved, before any array is read."""
    entries = rec["entries"]
    want = {p: n for p, n in slots if n is not None}
    missing = sorted(set(entries) - set(want))
    extra = sorted(set(want) - set(entries))
    if missing or extra:
        src = "like=" if used_like else "params + the saved config"
        raise error(where, f"the checkpoint's entries and the target tree ({src}) differ.\n"
                           f"  saved but not in the target: {_some(missing)}\n"
                           f"  in the target but not saved: {_some(extra)}",
                    "restore with the params the adapter was trained for (the saved config "
                    "decides which leaves are adapted), or a like= tree with exactly these "
                    "paths", kind=CheckpointError)
    for path, node in want.items():
        e = entries[path]
        if e["kind"] != kind_of(node):
            raise error(where, f"{path} was saved as {KIND_NAMES[e['kind']]} but the target "
                               f"holds {type(node).__name__}",
                        "build the target for the saved config (lj.checkpoint_info shows it)",
                        kind=CheckpointError)
        pairs = ([(f, getattr(node, f), e[f]) for f in fields(e)] if e["kind"] in FACTOR_KINDS
                 else [("", node, e["array"])])
        for field, leaf, arec in pairs:
            name = f"{path}/{field}" if field else path
            if _shape_of(leaf) != tuple(arec["shape"]):
                raise error(where, f"{name} was saved with shape {tuple(arec['shape'])} but "
                                   f"the target expects {_shape_of(leaf)}",
                            "restore onto the base (and config) the adapter was trained for",
                            kind=CheckpointError)
            if not used_like or field == "scale":
                continue
            saved, asked = jnp.dtype(arec["dtype"]), jnp.dtype(leaf.dtype)
            target = saved if dtype is None or field == "" else jnp.dtype(dtype)
            if asked != target:
                raise error(where, f"{name} was saved as {saved.name} but like= asks for "
                                   f"{asked.name}; lora_jax never casts silently",
                            f"pass dtype=jnp.{asked.name} to convert a and b, or build like= "
                            f"with {target.name}", kind=CheckpointError)


def restore_arrays(mngr, step, rec, slots, shardings, where, check_finite, state_like=None):
    """Reads (and verifies) the arrays of the adapters item and, if asked, the state."""
    ocp = orbax_checkpoint()
    entries = rec["entries"]
    like = {p: n for p, n in slots if n is not None}
    sh = _shardings_by_path(shardings)
    abstract = {}
    for path, e in entries.items():
        node = like[path]
        if e["kind"] in FACTOR_KINDS:
            abstract[path] = {f: jax.ShapeDtypeStruct(
                tuple(e[f]["shape"]), jnp.dtype(e[f]["dtype"]),
                sharding=_sharding(sh, path, f, getattr(node, f))) for f in fields(e)}
        else:
            abstract[path] = jax.ShapeDtypeStruct(
                tuple(e["array"]["shape"]), jnp.dtype(e["array"]["dtype"]),
                sharding=_sharding(sh, path, "", node))
    args = {ARRAYS_ITEM: ocp.args.StandardRestore(abstract)}
    if state_like is not None:
        args[STATE_ITEM] = ocp.args.StandardRestore(state_like)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # truncated / missing / undecodable files
        raise error(where, f"reading the arrays failed ({type(e).__name__}: {e}). The step's "
                           f"files are truncated or corrupted",
                    "restore an earlier step (lj.checkpoint_info(directory).steps lists them)",
                    kind=CheckpointError) from e
    arrays = out[ARRAYS_ITEM]
    order = [(path, f, arrays[path][f] if f else arrays[path], e[f] if f else e["array"])
             for path, e in entries.items()
             for f in (fields(e) if e["kind"] in FACTOR_KINDS else ("",))]
    got = records([x for _, _, x, _ in order])
    for (path, f, x, arec), rec in zip(order, got, strict=True):
        _verify(rec, arec, f"{path}/{f}" if f else path, where)
        if check_finite:
            check_finite_values(path, f, x, f"in the checkpoint ({where})")
    return arrays, (out[STATE_ITEM] if state_like is not None else None)


def _verify(got, arec, name, where):
    """Compares a restored array's record (`array_record`) with the saved one."""
    if got["shape"] != list(arec["shape"]) or got["dtype"] != arec["dtype"]:
        raise error(where, f"{name} restored as {got['dtype']}{tuple(got['shape'])}, saved as "
                           f"{arec['dtype']}{tuple(arec['shape'])}",
                    "restore another step", kind=CheckpointError)
    if got["sha256"] != arec["sha256"]:
        raise error(where, f"{name} does not match the sha256 stored when it was saved: the "
                           f"array file is corrupted (Orbax reads such bytes without error)",
                    "restore an earlier step, or re-create this one", kind=CheckpointError)


def assemble(rec, slots, treedef, arrays, dtype):
    """The adapter tree from the slots and the restored arrays (the factors -- all but
    ``scale`` -- cast to ``dtype``)."""
    entries = rec["entries"]
    nodes = []
    for path, like_node in slots:
        e = entries.get(path) if like_node is not None else None
        if e is None:
            nodes.append(None)
        elif e["kind"] in FACTOR_KINDS:
            d = dict(arrays[path])
            if dtype is not None:
                d.update({f: d[f].astype(dtype) for f in fields(e) if f != "scale"})
            nodes.append(build_node(e["kind"], d))
        else:
            nodes.append(arrays[path])
    if treedef is None:
        return {p: n for (p, _), n in zip(slots, nodes, strict=True)}
    return jax.tree_util.tree_unflatten(treedef, nodes)


def abstract_opt_state(rec, slots, treedef, tx, opt_state_like, *, where):
    """The optimizer state's structure (abstract) for restoring it: ``opt_state_like``,
    else ``tx.init`` of the adapters as saved, in the target's structure."""
    if opt_state_like is not None or "opt_state" not in (rec.get("state") or {}):
        return opt_state_like
    if tx is None:
        raise error(where, "restoring optimizer state needs its structure",
                    "pass tx= (the optax transformation, e.g. lj.optimizer(optax.adam(1e-3))) "
                    "or opt_state_like=jax.eval_shape(tx.init, adapters)", kind=TypeError)
    # The adapters as saved (shapes and dtypes), in the target's structure.
    entries = rec["entries"]
    abstract = {}
    for p, node in slots:
        if node is not None:
            e = entries[p]
            abstract[p] = ({f: _sds(e[f]) for f in fields(e)} if e["kind"] in FACTOR_KINDS
                           else _sds(e["array"]))
    return jax.eval_shape(tx.init, assemble(rec, slots, treedef, abstract, None))


def state_abstract(rec, where, opt_like, shardings):
    """The abstract arrays (shape, dtype, sharding) of the step's training state."""
    state = rec.get("state") or {}
    if not state:
        raise error(where, "this step holds no training state (it was saved without "
                           "opt_state= / rng=)",
                    "use lj.restore for the adapters alone", kind=CheckpointError)
    out = {}
    default = shardings if isinstance(shardings, jax.sharding.Sharding) else None
    if "opt_state" in state:
        flat_like = {path_str(p): x for p, x in
                     jax.tree_util.tree_flatten_with_path(opt_like)[0]}
        saved = state["opt_state"]
        if set(flat_like) != set(saved):
            missing = sorted(set(saved) - set(flat_like))[:6]
            extra = sorted(set(flat_like) - set(saved))[:6]
            raise error(where, f"the saved optimizer state and the target differ.\n"
                               f"  saved only: {missing}\n  target only: {extra}",
                        "pass the optimizer (tx=) the state was saved with",
                        kind=CheckpointError)
        ab = {}
        for p, arec in saved.items():
            x = flat_like[p]
            if _shape_of(x) != tuple(arec["shape"]):
                raise error(where, f"optimizer state {p} was saved with shape "
                                   f"{tuple(arec['shape'])}, the target has {_shape_of(x)}",
                            "pass the optimizer the state was saved with",
                            kind=CheckpointError)
            sh = default or getattr(x, "sharding", None)
            if not isinstance(sh, jax.sharding.Sharding):
                sh = _default_sharding()
            ab[p] = jax.ShapeDtypeStruct(tuple(arec["shape"]), jnp.dtype(arec["dtype"]),
                                         sharding=sh)
        out["opt_state"] = ab
    if "rng" in state:
        arec = state["rng"]["array"]
        out["rng"] = jax.ShapeDtypeStruct(tuple(arec["shape"]), jnp.dtype(arec["dtype"]),
                                          sharding=default or _default_sharding())
    return out


def unpack_state(rec, st, where, opt_like):
    """``(opt_state, rng)`` from the restored state item, each verified against its sha256."""
    state = rec["state"]
    opt_state = rng = None
    if "opt_state" in state:
        saved = state["opt_state"]
        got = records([st["opt_state"][p] for p in saved])
        for (p, arec), rec in zip(saved.items(), got, strict=True):
            _verify(rec, arec, f"opt_state/{p}", where)
        flat, treedef = jax.tree_util.tree_flatten_with_path(opt_like)
        opt_state = jax.tree_util.tree_unflatten(
            treedef, [st["opt_state"][path_str(p)] for p, _ in flat])
    if "rng" in state:
        _verify(array_record(st["rng"]), state["rng"]["array"], "rng", where)
        impl = state["rng"]["impl"]
        rng = st["rng"] if impl is None else jax.random.wrap_key_data(st["rng"], impl=impl)
    return opt_state, rng
