"""Adapter checkpoints on Orbax: `save`, `restore`, `restore_state`, `inspect`.

A checkpoint directory is an Orbax ``CheckpointManager`` root; each step is
one sub-directory holding three Composite items::

    <directory>/<step>/
      adapters/          StandardSave: {path: {"a", "b", "scale"} | array}
      state/             StandardSave (optional): {"opt_state": {path: array}, "rng": key data}
      lora_jax/metadata  JsonSave: format + version, the LoraConfig, shape, dtype and
                         sha256 of every array, the base fingerprint, user metadata,
                         and a sha256 of the record itself

Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it when
complete, so a process killed during a save leaves the previous steps intact
and the partial one invisible (and removed by the next save). What Orbax does
not do, this module adds: it verifies every array against its sha256 (Orbax
restores a flipped byte silently), restores each array as it was saved and
converts only when asked (Orbax casts silently), checks the base the adapter
was trained on (`lj.check_base`), and always keeps the latest step when a
best-metric policy prunes the others.

Paths are the '/'-joined key paths of `lj.path_str`; arrays are restored into
a skeleton built from ``params`` and the saved config, or from ``like=``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._core.config import LoraConfig
from lora_jax._checkpoint.fingerprint import base_fingerprint, check_base, fingerprint_summary
from lora_jax._core.paths import flatten_params, path_str
from lora_jax._checkpoint.record import (FORMAT_VERSION, CheckpointError, array_record, build_record,
                              canonical, check_finite_values, check_record, fields,
                              adapter_arrays, state_arrays, records)
from lora_jax._core.fmt import table
from lora_jax._core.weights import LoraWeights, check_adapters, flatten_adapters, is_lora

__all__ = ["save", "restore", "restore_state", "inspect", "Checkpointer", "TrainState",
           "CheckpointInfo", "CheckpointError", "FORMAT_VERSION"]

_ARRAYS, _STATE, _META = "adapters", "state", "lora_jax"
# Steps pruned by max_to_keep are first renamed here (atomic), then deleted:
# deleting in place could be killed midway and leave a listed, half-deleted step.
_TRASH = ".lora_jax-deleted"
_ITEMS = (_ARRAYS, _STATE, _META)
class TrainState(NamedTuple):
    """What a training loop needs to resume.

    Attributes:
      step: the step the state was saved at.
      adapters: the adapter tree.
      opt_state: the optimizer state (None if not saved).
      rng: the PRNG key (None if not saved).
    """

    step: int
    adapters: Any
    opt_state: Any = None
    rng: Any = None


# ----------------------------------------------------------------------------- Orbax


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


def _preservation(max_to_keep, best_fn, best_mode):
    cm = _ocp().checkpoint_managers
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or
                                    not isinstance(max_to_keep, int) or max_to_keep < 1):
        raise ValueError(f"max_to_keep={max_to_keep!r}; use an int >= 1, or None to keep all.")
    if best_fn is None:
        return cm.LatestN(n=max_to_keep)
    if best_mode not in ("min", "max"):
        raise ValueError(f"best_mode={best_mode!r}; use 'min' or 'max'.")
    # Orbax's best-N alone can delete the latest step; resuming needs it.
    return cm.AnyPreservationPolicy([
        cm.LatestN(n=1),
        cm.BestN(get_metric_fn=best_fn, reverse=(best_mode == "min"), n=max_to_keep)])


def _manager(directory, *, read_only: bool, async_save: bool = False, max_to_keep=None,
             best_fn=None, best_mode="min"):
    ocp = _ocp()
    directory = os.path.abspath(os.fspath(directory))
    if read_only and not os.path.isdir(directory):
        raise CheckpointError(
            f"{directory}: no such checkpoint directory. Fix: check the path (it is the "
            f"directory given to lj.save, holding one sub-directory per step).")
    if read_only:
        opts = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                            enable_async_checkpointing=False)
    else:
        opts = ocp.CheckpointManagerOptions(
            create=True, cleanup_tmp_directories=True, todelete_subdir=_TRASH,
            enable_async_checkpointing=async_save,
            preservation_policy=_preservation(max_to_keep, best_fn, best_mode))
    return ocp.CheckpointManager(directory, options=opts, item_names=_ITEMS)


def _empty_trash(directory) -> None:
    """Deletes steps that retention already renamed out of sight."""
    trash = os.path.join(directory, _TRASH)
    if os.path.isdir(trash):
        for name in os.listdir(trash):
            shutil.rmtree(os.path.join(trash, name), ignore_errors=True)


def _pick_step(mngr, step, directory) -> int:
    steps = list(mngr.all_steps())
    if step is None:
        if not steps:
            leftovers = sorted(n for n in os.listdir(directory) if "orbax-checkpoint-tmp" in n)
            extra = (f" (only unfinished saves: {leftovers}, e.g. a killed process)"
                     if leftovers else "")
            raise CheckpointError(
                f"{directory}: no complete checkpoint{extra}. Fix: check the path, or save "
                f"one with lj.save.")
        return max(steps)
    if step not in steps:
        raise CheckpointError(
            f"{directory}: no complete checkpoint for step {step}; steps present: {steps}. "
            f"Fix: pass one of those, or step=None for the latest.")
    return int(step)


def _read_record(mngr, step, where) -> dict:
    ocp = _ocp()
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
        rec = out[_META]
    except Exception as e:  # orbax/json raise many types; name the file either way
        raise CheckpointError(
            f"{where}: reading the checkpoint metadata ({_META}/metadata) failed: "
            f"{type(e).__name__}: {e}. Fix: restore another step.") from e
    return check_record(rec, where)


# ----------------------------------------------------------------------------- skeletons


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _shardings_by_path(shardings) -> dict | jax.sharding.Sharding | None:
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings
    return dict(flatten_adapters(shardings)[0])


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


def _expected_nodes(rec, params, like) -> tuple[list[tuple[str, Any]], Any]:
    """``[(path, like_node)]`` for every slot of the target tree, and its treedef.

    The like nodes carry the shapes/dtypes the caller expects (None for a
    frozen slot). Without params or like, the flat ``{path: node}`` form.
    """
    entries = rec["entries"]
    if like is not None:
        return flatten_adapters(like)
    if params is not None:
        flat, treedef = flatten_params(params)
        out = []
        for p, _ in flat:
            path = path_str(p)
            e = entries.get(path)
            if e is None:
                out.append((path, None))
            elif e["kind"] == "lora":
                out.append((path, LoraWeights(*(_sds(e[f]) for f in fields(e)))))
            else:
                out.append((path, _sds(e["array"])))
        return out, treedef
    nodes = []
    for path, e in entries.items():
        if e["kind"] == "lora":
            nodes.append((path, LoraWeights(*(_sds(e[f]) for f in fields(e)))))
        else:
            nodes.append((path, _sds(e["array"])))
    return nodes, None


def _sds(arec):
    return jax.ShapeDtypeStruct(tuple(arec["shape"]), jnp.dtype(arec["dtype"]))


def _shape_of(x):
    return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def _check_slots(rec, slots, where, dtype, used_like: bool):
    """Compares the target slots with what was saved, before any array is read."""
    entries = rec["entries"]
    want = {p: n for p, n in slots if n is not None}
    missing = sorted(set(entries) - set(want))
    extra = sorted(set(want) - set(entries))
    if missing or extra:
        src = "like=" if used_like else "params + the saved config"
        raise CheckpointError(
            f"{where}: the checkpoint's entries and the target tree ({src}) differ.\n"
            f"  saved but not in the target: {missing[:8]}{' ...' if len(missing) > 8 else ''}\n"
            f"  in the target but not saved: {extra[:8]}{' ...' if len(extra) > 8 else ''}\n"
            f"Fix: restore with the params the adapter was trained for (the saved config "
            f"decides which leaves are adapted), or a like= tree with exactly these paths.")
    for path, node in want.items():
        e = entries[path]
        pairs = ([(f, getattr(node, f), e[f]) for f in fields(e)] if e["kind"] == "lora"
                 else [("", node, e["array"])])
        if (e["kind"] == "lora") != is_lora(node):
            raise CheckpointError(
                f"{where}: {path} was saved as {'LoraWeights' if e['kind'] == 'lora' else 'a fully-trained array'}"
                f" but the target holds {type(node).__name__}. Fix: build the target for the "
                f"saved config (lj.inspect shows it).")
        for field, leaf, arec in pairs:
            name = f"{path}/{field}" if field else path
            if _shape_of(leaf) != tuple(arec["shape"]):
                raise CheckpointError(
                    f"{where}: {name} was saved with shape {tuple(arec['shape'])} but the "
                    f"target expects {_shape_of(leaf)}. Fix: restore onto the base (and "
                    f"config) the adapter was trained for.")
            if not used_like or field == "scale":
                continue
            saved, asked = jnp.dtype(arec["dtype"]), jnp.dtype(leaf.dtype)
            target = saved if dtype is None or field == "" else jnp.dtype(dtype)
            if asked != target:
                raise CheckpointError(
                    f"{where}: {name} was saved as {saved.name} but like= asks for "
                    f"{asked.name}; lora_jax never casts silently. Fix: pass "
                    f"dtype=jnp.{asked.name} to convert a and b, or build like= with "
                    f"{target.name}.")


def _restore_arrays(mngr, step, rec, slots, shardings, where, check_finite, state_like=None):
    """Reads (and verifies) the arrays of the adapters item and, if asked, the state."""
    ocp = _ocp()
    entries = rec["entries"]
    like = {p: n for p, n in slots if n is not None}
    sh = _shardings_by_path(shardings)
    abstract = {}
    for path, e in entries.items():
        node = like[path]
        if e["kind"] == "lora":
            abstract[path] = {f: jax.ShapeDtypeStruct(
                tuple(e[f]["shape"]), jnp.dtype(e[f]["dtype"]),
                sharding=_sharding(sh, path, f, getattr(node, f))) for f in fields(e)}
        else:
            abstract[path] = jax.ShapeDtypeStruct(
                tuple(e["array"]["shape"]), jnp.dtype(e["array"]["dtype"]),
                sharding=_sharding(sh, path, "", node))
    args = {_ARRAYS: ocp.args.StandardRestore(abstract)}
    if state_like is not None:
        args[_STATE] = ocp.args.StandardRestore(state_like)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # truncated / missing / undecodable files
        raise CheckpointError(
            f"{where}: reading the arrays failed ({type(e).__name__}: {e}). The step's files "
            f"are truncated or corrupted. Fix: restore an earlier step "
            f"(lj.inspect(directory).steps lists them).") from e
    arrays = out[_ARRAYS]
    order = [(path, f, arrays[path][f] if f else arrays[path], e[f] if f else e["array"])
             for path, e in entries.items()
             for f in (fields(e) if e["kind"] == "lora" else ("",))]
    got = records([x for _, _, x, _ in order])
    for (path, f, x, arec), rec in zip(order, got):
        _verify(rec, arec, f"{path}/{f}" if f else path, where)
        if check_finite:
            check_finite_values(path, f, x, f"in the checkpoint ({where})")
    return arrays, (out[_STATE] if state_like is not None else None)


def _verify(got, arec, name, where):
    """Compares a restored array's record (`array_record`) with the saved one."""
    if got["shape"] != list(arec["shape"]) or got["dtype"] != arec["dtype"]:
        raise CheckpointError(
            f"{where}: {name} restored as {got['dtype']}{tuple(got['shape'])}, saved as "
            f"{arec['dtype']}{tuple(arec['shape'])}. Fix: restore another step.")
    if got["sha256"] != arec["sha256"]:
        raise CheckpointError(
            f"{where}: {name} does not match the sha256 stored when it was saved: the array "
            f"file is corrupted (Orbax reads such bytes without error). Fix: restore an "
            f"earlier step, or re-create this one.")


def _assemble(rec, slots, treedef, arrays, dtype):
    entries = rec["entries"]
    nodes = []
    for path, like_node in slots:
        e = entries.get(path) if like_node is not None else None
        if e is None:
            nodes.append(None)
        elif e["kind"] == "lora":
            d = arrays[path]
            a, b, m = d["a"], d["b"], d.get("m")
            if dtype is not None:
                a, b = a.astype(dtype), b.astype(dtype)
                m = None if m is None else m.astype(dtype)
            nodes.append(LoraWeights(a, b, d["scale"], m))
        else:
            nodes.append(arrays[path])
    if treedef is None:
        return {p: n for (p, _), n in zip(slots, nodes)}
    return jax.tree_util.tree_unflatten(treedef, nodes)


def _config_of(rec, where) -> LoraConfig:
    try:
        return LoraConfig.from_dict(rec["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: the saved LoraConfig can't be read: {e}") from e


# ----------------------------------------------------------------------------- Checkpointer


class Checkpointer:
    """A directory of adapter checkpoints, one per step (an Orbax CheckpointManager).

    Use one for a training run: ``save`` every so often (asynchronously by
    default: it returns once the arrays are copied off the device), then
    ``close`` (or use it as a context manager) so pending writes finish.

    Args:
      directory: the root directory (created on the first save).
      max_to_keep: keep at most this many steps (None: keep all). With
        ``best_fn``, the best ``max_to_keep`` by metric *plus* the latest.
      best_fn: ``metrics -> float`` ranking steps (``metrics`` as given to
        ``save``); None ranks by recency.
      best_mode: ``"min"`` or ``"max"``: which ``best_fn`` values are best.
      async_save: write in a background thread (call ``wait``/``close``).
      read_only: only restore and inspect (never create, clean up or write);
        the directory must exist. Safe while another process is saving.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(1))
      >>> tx = lj.optimizer(optax.adam(1e-3))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     with lj.Checkpointer(d, max_to_keep=2) as ckpt:
      ...         for step in range(3):
      ...             _ = ckpt.save(step, ad, cfg, opt_state=tx.init(ad), rng=jax.random.key(step))
      ...         ckpt.wait()
      ...         state, cfg2 = ckpt.restore_state(params, tx=tx)
      ...         print(ckpt.steps, state.step, cfg2 == cfg)
      [1, 2] 2 True
    """

    def __init__(self, directory, *, max_to_keep: int | None = None,
                 best_fn: Callable[[Any], float] | None = None, best_mode: str = "min",
                 async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        self._best_fn = best_fn
        self._read_only = read_only
        self._mngr = _manager(self.directory, read_only=read_only, async_save=async_save,
                              max_to_keep=max_to_keep, best_fn=best_fn, best_mode=best_mode)
        self._fp_cache: tuple[int, LoraConfig, dict] | None = None
        if not read_only:
            _empty_trash(self.directory)

    # -- context manager / lifecycle
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def wait(self) -> None:
        """Blocks until every pending (asynchronous) save is on disk."""
        self._mngr.wait_until_finished()
        if not self._read_only:
            _empty_trash(self.directory)

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._mngr.close()
        if not self._read_only:
            _empty_trash(self.directory)

    @property
    def steps(self) -> list[int]:
        """The complete steps on disk, ascending."""
        return sorted(self._mngr.all_steps())

    @property
    def latest_step(self) -> int | None:
        s = self.steps
        return s[-1] if s else None

    # -- save
    def _fingerprint(self, params, config):
        if params is None:
            return None
        if self._fp_cache is not None and self._fp_cache[0] == id(params) \
                and self._fp_cache[1] == config:
            return self._fp_cache[2]
        fp = base_fingerprint(params, config)
        self._fp_cache = (id(params), config, fp)
        return fp

    def save(self, step: int, adapters, config: LoraConfig, *, params=None, opt_state=None,
             rng=None, metrics: Mapping | None = None, metadata: Mapping | None = None,
             check_finite: bool = True) -> int:
        """Saves one step; returns the step.

        Args:
          step: a non-negative int larger than every step already saved.
          adapters: the adapter tree (from `lj.init` or training).
          config: its `LoraConfig` (regex targets: callables can't be saved).
          params: the base params; when given, the adapters are checked
            against them and a base fingerprint is stored.
          opt_state: optimizer state to save for resuming (any pytree).
          rng: a PRNG key to save for resuming.
          metrics: JSON-able metrics for ``best_fn``.
          metadata: JSON-able user data stored with the step.
          check_finite: refuse adapters with NaN/Inf values.

        Nothing is written if a check fails, and a save that dies midway
        never touches earlier steps. With ``async_save`` the call returns
        once the arrays are copied to host memory; the buffers may then be
        donated or overwritten.
        """
        if self._read_only:
            raise ValueError(f"{self.directory}: this Checkpointer is read_only; open one "
                             f"without read_only=True to save.")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step={step!r}; use a non-negative int.")
        step = int(step)
        if self._best_fn is not None and metrics is None:
            raise ValueError(
                "this Checkpointer ranks steps with best_fn, but save() got no metrics. "
                "Fix: pass metrics={...} (what best_fn reads).")
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a lj.LoraConfig, got {type(config).__name__}.")
        config.to_dict()  # fails early for configs that can't be written
        arrays, entries = adapter_arrays(adapters, config, params, check_finite)
        st_arrays, st_record = state_arrays(opt_state, rng)
        record = build_record(config, entries, st_record, self._fingerprint(params, config),
                               dict(metadata or {}), step)
        canonical(record)  # user metadata must be JSON-able before anything is written
        latest = self.latest_step
        if latest is not None and step <= latest:
            raise ValueError(
                f"{self.directory}: step {step} is not after the latest saved step {latest}. "
                f"Fix: save with a larger step, or to a new directory.")
        ocp = _ocp()
        items = {_ARRAYS: ocp.args.StandardSave(arrays), _META: ocp.args.JsonSave(record)}
        if st_arrays:
            items[_STATE] = ocp.args.StandardSave(st_arrays)
        self._mngr.save(step, args=ocp.args.Composite(**items),
                        metrics=dict(metrics) if metrics is not None else None, force=True)
        _empty_trash(self.directory)  # what earlier (finished) saves pruned
        return step

    # -- restore
    def restore(self, params=None, *, like=None, step: int | None = None, dtype=None,
                shardings=None, on_base_mismatch: str = "error", check_finite: bool = True):
        """Restores ``(adapters, config)``; see `lj.restore`."""
        state, config = self._restore(params, like, step, dtype, shardings, on_base_mismatch,
                                      check_finite, with_state=False, state_like=None)
        return state.adapters, config

    def restore_state(self, params=None, *, like=None, tx=None, opt_state_like=None,
                      step: int | None = None, dtype=None, shardings=None,
                      on_base_mismatch: str = "error", check_finite: bool = True):
        """Restores ``(TrainState, config)``; see `lj.restore_state`."""
        return self._restore(params, like, step, dtype, shardings, on_base_mismatch,
                             check_finite, with_state=True,
                             state_like=(tx, opt_state_like))

    def inspect(self, step: int | None = None) -> CheckpointInfo:
        """Metadata of one step without reading its arrays; see `lj.inspect`."""
        return _inspect(self._mngr, self.directory, step)

    def _restore(self, params, like, step, dtype, shardings, on_base_mismatch, check_finite,
                 with_state, state_like):
        if params is not None and like is not None:
            raise TypeError("pass params= or like=, not both (like= is the exact target tree).")
        if dtype is not None:
            dtype = jnp.dtype(dtype)
        step = _pick_step(self._mngr, step, self.directory)
        where = os.path.join(self.directory, str(step))
        rec = _read_record(self._mngr, step, where)
        config = _config_of(rec, where)
        slots, treedef = _expected_nodes(rec, params, like)
        _check_slots(rec, slots, where, dtype, used_like=like is not None)
        if params is not None:
            skeleton = jax.tree_util.tree_unflatten(treedef, [n for _, n in slots])
            try:
                check_adapters(params, skeleton, config)
            except ValueError as e:
                raise CheckpointError(f"{where}: {e}") from None
            check_base(params, rec.get("fingerprint"), on_mismatch=on_base_mismatch,
                       what=f"the adapter in {where}")
        st_abstract = opt_like = None
        if with_state:
            opt_like = self._opt_like(rec, slots, treedef, *state_like, where=where)
            st_abstract = _state_abstract(rec, where, opt_like, shardings)
        arrays, st = _restore_arrays(self._mngr, step, rec, slots, shardings, where,
                                     check_finite, st_abstract)
        adapters = _assemble(rec, slots, treedef, arrays, dtype)
        if dtype is not None:
            config = config.replace(dtype=dtype)
        opt_state = rng = None
        if st is not None:
            opt_state, rng = _unpack_state(rec, st, where, opt_like)
        return TrainState(step, adapters, opt_state, rng), config

    @staticmethod
    def _opt_like(rec, slots, treedef, tx, opt_state_like, *, where):
        if opt_state_like is not None or "opt_state" not in (rec.get("state") or {}):
            return opt_state_like
        if tx is None:
            raise TypeError(
                f"{where}: restoring optimizer state needs its structure. Fix: pass tx= (the "
                f"optax transformation, e.g. lj.optimizer(optax.adam(1e-3))) or "
                f"opt_state_like=jax.eval_shape(tx.init, adapters).")
        # The adapters as saved (shapes and dtypes), in the target's structure.
        entries = rec["entries"]
        abstract = {}
        for p, node in slots:
            if node is not None:
                e = entries[p]
                abstract[p] = ({f: _sds(e[f]) for f in fields(e)} if e["kind"] == "lora"
                               else _sds(e["array"]))
        return jax.eval_shape(tx.init, _assemble(rec, slots, treedef, abstract, None))


def _state_abstract(rec, where, opt_like, shardings):
    state = rec.get("state") or {}
    if not state:
        raise CheckpointError(
            f"{where}: this step holds no training state (it was saved without "
            f"opt_state= / rng=). Fix: use lj.restore for the adapters alone.")
    out = {}
    default = shardings if isinstance(shardings, jax.sharding.Sharding) else None
    if "opt_state" in state:
        flat_like = {path_str(p): x for p, x in
                     jax.tree_util.tree_flatten_with_path(opt_like)[0]}
        saved = state["opt_state"]
        if set(flat_like) != set(saved):
            missing = sorted(set(saved) - set(flat_like))[:6]
            extra = sorted(set(flat_like) - set(saved))[:6]
            raise CheckpointError(
                f"{where}: the saved optimizer state and the target differ.\n"
                f"  saved only: {missing}\n  target only: {extra}\n"
                f"Fix: pass the optimizer (tx=) the state was saved with.")
        ab = {}
        for p, arec in saved.items():
            x = flat_like[p]
            if _shape_of(x) != tuple(arec["shape"]):
                raise CheckpointError(
                    f"{where}: optimizer state {p} was saved with shape "
                    f"{tuple(arec['shape'])}, the target has {_shape_of(x)}. Fix: pass "
                    f"the optimizer the state was saved with.")
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


def _unpack_state(rec, st, where, opt_like):
    state = rec["state"]
    opt_state = rng = None
    if "opt_state" in state:
        saved = state["opt_state"]
        got = records([st["opt_state"][p] for p in saved])
        for (p, arec), rec in zip(saved.items(), got):
            _verify(rec, arec, f"opt_state/{p}", where)
        flat, treedef = jax.tree_util.tree_flatten_with_path(opt_like)
        opt_state = jax.tree_util.tree_unflatten(
            treedef, [st["opt_state"][path_str(p)] for p, _ in flat])
    if "rng" in state:
        _verify(array_record(st["rng"]), state["rng"]["array"], "rng", where)
        impl = state["rng"]["impl"]
        rng = st["rng"] if impl is None else jax.random.wrap_key_data(st["rng"], impl=impl)
    return opt_state, rng


# ----------------------------------------------------------------------------- inspect


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What `inspect` reads from a checkpoint without touching its arrays."""

    directory: str
    step: int
    steps: list             # every complete step in the directory
    config: LoraConfig
    rows: list              # (path, kind, a shape, b shape, rank, scale, params, bytes, dtype)
    fingerprint: dict | None
    has_opt_state: bool
    has_rng: bool
    metadata: dict
    format_version: int
    lora_jax_version: str
    disk_bytes: int         # bytes of the step's files on disk

    @property
    def n_params(self) -> int:
        return sum(r[6] for r in self.rows)

    @property
    def array_bytes(self) -> int:
        return sum(r[7] for r in self.rows)

    def __str__(self) -> str:
        cfg = self.config
        out = [f"checkpoint {self.directory} step {self.step} (steps: {self.steps}); "
               f"format v{self.format_version}, written by lora_jax {self.lora_jax_version}",
               f"config: rank={cfg.rank} alpha={cfg.alpha:g} targets={list(cfg.targets)} "
               f"use_rslora={cfg.use_rslora} dtype={cfg.dtype.name}"
               + (f" train={list(cfg.train)}" if cfg.train else "")]
        rows = [[p, k, "x".join(map(str, a)) or "()", "x".join(map(str, b)) if b else "-",
                 r if r else "-", f"{s:g}" if s is not None else "-", f"{n:,}", f"{nb:,}", d]
                for p, k, a, b, r, s, n, nb, d in self.rows]
        out.append(table(["path", "kind", "a / array", "b", "rank", "scale", "params",
                           "bytes", "dtype"], rows, "<<<<>>>><"))
        out.append(f"{len(self.rows)} entries, {self.n_params:,} parameters, "
                   f"{self.array_bytes:,} array bytes, {self.disk_bytes:,} bytes on disk")
        state = [n for n, h in (("opt_state", self.has_opt_state), ("rng", self.has_rng)) if h]
        out.append(f"training state: {', '.join(state) if state else 'none'}")
        out.append(fingerprint_summary(self.fingerprint))
        if self.metadata:
            out.append(f"metadata: {json.dumps(self.metadata, sort_keys=True)}")
        return "\n".join(out)

    __repr__ = __str__


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _inspect(mngr, directory, step) -> CheckpointInfo:
    step = _pick_step(mngr, step, directory)
    where = os.path.join(directory, str(step))
    rec = _read_record(mngr, step, where)
    config = _config_of(rec, where)
    rows = []
    for path, e in rec["entries"].items():
        if e["kind"] == "lora":
            a, b = e["a"], e["b"]
            n = int(np.prod(a["shape"])) + int(np.prod(b["shape"]))
            nb = (int(np.prod(a["shape"])) * jnp.dtype(a["dtype"]).itemsize
                  + int(np.prod(b["shape"])) * jnp.dtype(b["dtype"]).itemsize)
            # The scale is data; the table shows the config's value for the path.
            rows.append((path, "lora", tuple(a["shape"]), tuple(b["shape"]), a["shape"][-1],
                         config.scale_for(path), n, nb, a["dtype"]))
        else:
            arr = e["array"]
            n = int(np.prod(arr["shape"]))
            rows.append((path, "train", tuple(arr["shape"]), None, None, None, n,
                         n * jnp.dtype(arr["dtype"]).itemsize, arr["dtype"]))
    state = rec.get("state") or {}
    return CheckpointInfo(
        directory=directory, step=step, steps=sorted(mngr.all_steps()), config=config,
        rows=rows, fingerprint=rec.get("fingerprint"), has_opt_state="opt_state" in state,
        has_rng="rng" in state, metadata=rec.get("metadata") or {},
        format_version=rec["format_version"], lora_jax_version=rec.get("lora_jax_version"),
        disk_bytes=_dir_bytes(where))


# ----------------------------------------------------------------------------- one-shot API


def save(directory, adapters, config: LoraConfig, *, step: int | None = None, params=None,
         opt_state=None, rng=None, metrics: Mapping | None = None,
         metadata: Mapping | None = None, max_to_keep: int | None = None,
         check_finite: bool = True) -> int:
    """Saves adapters (and optionally training state) as one checkpoint step.

    Synchronous: when it returns, the step is complete on disk. For saving
    during training (asynchronously, with retention policies) use
    `Checkpointer`.

    Args:
      directory: the checkpoint root; each step is a sub-directory.
      adapters: the adapter tree.
      config: the adapters' `LoraConfig`.
      step: the step number (default: one after the latest, or 0).
      params: the base params: checks the adapters against them and stores a
        base fingerprint, which `restore` and ``merge`` verify.
      opt_state: optimizer state, for `restore_state`.
      rng: a PRNG key, for `restore_state`.
      metrics: JSON-able metrics recorded with the step.
      metadata: JSON-able user data recorded with the step.
      max_to_keep: delete older steps beyond this many (never the latest).
      check_finite: refuse adapters holding NaN/Inf.

    Returns:
      The step written.

    Example:
      >>> import tempfile, jax, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(1))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     print(lj.save(d, ad, cfg, params=params), lj.save(d, ad, cfg))
      0 1
    """
    with Checkpointer(directory, max_to_keep=max_to_keep, async_save=False) as ckpt:
        if step is None:
            latest = ckpt.latest_step
            step = 0 if latest is None else latest + 1
        return ckpt.save(step, adapters, config, params=params, opt_state=opt_state, rng=rng,
                         metrics=metrics, metadata=metadata, check_finite=check_finite)


def restore(directory, params=None, *, like=None, step: int | None = None, dtype=None,
            shardings=None, on_base_mismatch: str = "error", check_finite: bool = True):
    """Restores ``(adapters, config)`` from a checkpoint, verified.

    The arrays are read into a skeleton: with ``params``, the tree of
    ``params`` with the saved config's adapters (shapes checked against the
    base before anything is read, and the base fingerprint checked); with
    ``like=``, exactly that adapter tree (arrays or ``jax.ShapeDtypeStruct``);
    with neither, a flat ``{path: node}`` dict (enough for `lj.export_peft`
    and inspection, not for ``merge``). Every array is checked against its
    stored sha256 and for NaN/Inf.

    Args:
      directory: the checkpoint root.
      params: the base params the adapter is for.
      like: the target adapter tree (instead of ``params``).
      step: which step (default: the latest complete one).
      dtype: convert ``a`` and ``b`` to this dtype. By default they come back
        as saved, and a ``like=`` tree asking for another dtype is an error.
      shardings: a ``jax.sharding.Sharding`` for every array, or a tree
        mirroring the adapters with one per array; default: the shardings of
        ``like=`` leaves, else the first local device.
      on_base_mismatch: ``"error"``, ``"warn"`` or ``"ignore"`` when
        ``params`` differ from the fingerprinted base.
      check_finite: raise on NaN/Inf in the restored adapter.

    Returns:
      ``(adapters, config)``.

    Raises:
      CheckpointError: no such step; corrupted or truncated files; an unknown
        format version; entries, shapes or dtypes that don't fit the target.
      BaseMismatchError: ``params`` are not the fingerprinted base.

    Example:
      >>> import tempfile, jax, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(1))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = lj.save(d, ad, cfg, params=params)
      ...     back, cfg2 = lj.restore(d, params)
      >>> bool((back["w"].a == ad["w"].a).all()), cfg2 == cfg
      (True, True)
    """
    with Checkpointer(directory, read_only=True) as ck:
        return ck.restore(params, like=like, step=step, dtype=dtype, shardings=shardings,
                          on_base_mismatch=on_base_mismatch, check_finite=check_finite)


def restore_state(directory, params=None, *, like=None, tx=None, opt_state_like=None,
                  step: int | None = None, dtype=None, shardings=None,
                  on_base_mismatch: str = "error", check_finite: bool = True):
    """Restores ``(TrainState(step, adapters, opt_state, rng), config)`` to resume.

    Like `restore`, plus the optimizer state (its structure from ``tx`` or
    ``opt_state_like``) and the PRNG key, each verified against its sha256.

    Example:
      >>> import tempfile, jax, optax, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(1))
      >>> tx = lj.optimizer(optax.adam(1e-3))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = lj.save(d, ad, cfg, step=7, opt_state=tx.init(ad), rng=jax.random.key(3))
      ...     state, _ = lj.restore_state(d, params, tx=tx)
      >>> state.step, jax.random.key_data(state.rng).tolist()
      (7, [0, 3])
    """
    with Checkpointer(directory, read_only=True) as ck:
        return ck.restore_state(params, like=like, tx=tx, opt_state_like=opt_state_like,
                                step=step, dtype=dtype, shardings=shardings,
                                on_base_mismatch=on_base_mismatch, check_finite=check_finite)


def inspect(directory, *, step: int | None = None) -> CheckpointInfo:
    """Reads a checkpoint's config, entries and fingerprint without its arrays.

    Example:
      >>> import tempfile, jax, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
      >>> cfg = lj.LoraConfig(rank=2, alpha=4, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(1))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = lj.save(d, ad, cfg)
      ...     info = lj.inspect(d)
      >>> info.step, info.n_params, info.rows[0][:5]
      (0, 64, ('w', 'lora', (16, 2), (2, 16), 2))
    """
    with Checkpointer(directory, read_only=True) as ck:
        return ck.inspect(step)
