"""`Checkpointer`: a directory of adapter checkpoints for a training run, and `TrainState`."""

from __future__ import annotations

import contextlib
import errno
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._checkpoint.fingerprint import base_fingerprint, check_base
from lora_jax._checkpoint.info import CheckpointInfo, inspect_step
from lora_jax._checkpoint.lease import acquire
from lora_jax._checkpoint.manager import (
    ARRAYS_ITEM,
    META_ITEM,
    STATE_ITEM,
    bind,
    check_max_to_keep,
    config_of,
    create_manager,
    empty_trash,
    list_steps,
    orbax_checkpoint,
    pick_step,
    prune,
    read_record,
    run_id,
)
from lora_jax._checkpoint.record import (
    CheckpointError,
    adapter_arrays,
    build_record,
    canonical,
    state_arrays,
)
from lora_jax._checkpoint.restore import (
    abstract_opt_state,
    assemble,
    check_slots,
    expected_nodes,
    restore_arrays,
    state_abstract,
    unpack_state,
)
from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error, message
from lora_jax._core.weights import (
    check_adapters,
    check_scales,
    flatten_adapters,
    is_lora,
    lora_shaped,
)

__all__ = ["Checkpointer", "TrainState"]


@contextlib.contextmanager
def _disk_errors(directory: str, step: int | None):
    """Orbax's and the OS's write errors (a full disk, a read-only or vanished directory)
    as one `CheckpointError` naming the step; earlier steps are never touched."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:            # orbax wraps OSError in several of its own types
        cause, seen = e, set()
        while cause is not None and id(cause) not in seen and not isinstance(cause, OSError):
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        if not isinstance(cause, OSError):
            raise
        known = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}
        what = known.get(cause.errno or -1, f"{type(e).__name__}: {e}")
        label = "" if step is None else f" step {step}"
        raise error(directory, f"writing{label} failed: {what}; the steps saved before it "
                               f"are intact (the partial one is invisible and removed by the "
                               f"next writer)", "free space (or fix the directory), then save "
                               "again", kind=CheckpointError) from e


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


class Checkpointer:
    """A directory of adapter checkpoints, one per step (an Orbax CheckpointManager).

    Use one for a training run: ``save`` every so often (asynchronously by
    default: it returns once the arrays are copied off the device), then
    ``close`` (or use it as a context manager) so pending writes finish.

    A writing Checkpointer holds the directory's writer lease from its
    creation to ``close`` (see `lora_jax._checkpoint.lease`): a second writer
    (another training job, a notebook, `lj.save` from another process) is
    refused with an error naming the holder, instead of overwriting steps or
    deleting the save in flight. Retention deletes only this run's steps
    (folders holding lora_jax's record, written with this run's id), never
    the latest one; other folders in the directory are left alone.

    Args:
      directory: the root directory (created on the first save).
      max_to_keep: keep at most this many steps (None: keep all). With
        ``best_fn``, the best ``max_to_keep`` by metric *plus* the latest.
      best_fn: ``metrics -> float`` ranking steps (``metrics`` as given to
        ``save``); None ranks by recency.
      best_mode: ``"min"`` or ``"max"``: which ``best_fn`` values are best.
      async_save: write in a background thread (call ``wait``/``close``).
      read_only: only restore and inspect (never create, clean up, delete or
        write, and no lease): safe while another process is saving.
      force: take the writer lease over from a writer on another host that
        you know is gone (on this host a dead writer's lease is taken over
        without it).

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
      ...         state, cfg2 = ckpt.restore_state(params=params, tx=tx)
      ...         print(ckpt.steps, state.step, cfg2 == cfg)
      [1, 2] 2 True
    """

    def __init__(self, directory, *, max_to_keep: int | None = None,
                 best_fn: Callable[[Any], float] | None = None, best_mode: str = "min",
                 async_save: bool = True, read_only: bool = False, force: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        check_max_to_keep(max_to_keep, best_mode)
        self._best_fn, self._best_mode, self._max_to_keep = best_fn, best_mode, max_to_keep
        self._read_only, self._async = read_only, async_save
        self._lease = None
        self._pending: int | None = None
        if not read_only and jax.process_index() == 0:
            self._lease = acquire(self.directory, force=force)
        try:
            self._mngr = create_manager(self.directory, read_only=read_only,
                                        async_save=async_save)
        except BaseException:
            if self._lease is not None:
                self._lease.release()
            raise
        self._fp_cache: tuple[int, LoraConfig, str, dict] | None = None
        self._run_id = None if read_only else run_id(self.directory, create=True)
        if not read_only:
            empty_trash(self.directory)

    # -- context manager / lifecycle
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def wait(self) -> None:
        """Blocks until every pending (asynchronous) save is on disk, then prunes."""
        with _disk_errors(self.directory, self._pending):
            self._mngr.wait_until_finished()
        self._pending = None
        self._prune()

    def close(self) -> None:
        """Waits for pending saves, prunes, and releases the manager and the lease."""
        try:
            with _disk_errors(self.directory, self._pending):
                self._mngr.close()
            self._pending = None
            self._prune()
        finally:
            if self._lease is not None:
                self._lease.release()
                self._lease = None

    def _prune(self) -> None:
        if self._read_only or jax.process_index() != 0:
            return
        prune(self.directory, keep_latest=self._max_to_keep, best_fn=self._best_fn,
              best_mode=self._best_mode, run=self._run_id, protect=self._pending)
        empty_trash(self.directory)

    @property
    def steps(self) -> list[int]:
        """The complete steps on disk, ascending (folders holding a lora_jax record)."""
        return list_steps(self.directory)

    @property
    def latest_step(self) -> int | None:
        s = self.steps
        return s[-1] if s else None

    # -- save
    def _fingerprint(self, params, config, mode):
        if params is None:
            return None
        if self._fp_cache is not None and self._fp_cache[:3] == (id(params), config, mode):
            return self._fp_cache[3]
        fp = base_fingerprint(params, config, mode=mode)
        self._fp_cache = (id(params), config, mode, fp)
        return fp

    def save(self, step: int, adapters, config: LoraConfig, *, params=None, opt_state=None,
             rng=None, metrics: Mapping | None = None, metadata: Mapping | None = None,
             check_finite: bool = True, fingerprint: str = "sampled") -> int:
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
          fingerprint: ``"sampled"`` (every row and column of every base leaf)
            or ``"full"`` (every byte); see `lj.base_fingerprint`.

        Nothing is written if a check fails, and a save that dies midway
        (a kill, a full disk) never touches earlier steps. With ``async_save`` the call returns
        once the arrays are copied to host memory; the buffers may then be
        donated or overwritten.
        """
        if self._read_only:
            raise error(self.directory, "this Checkpointer is read_only",
                        "open one without read_only=True to save")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise error("Checkpointer.save", f"step={step!r} is not a non-negative int",
                        "use a non-negative int, larger than every step already saved")
        step = int(step)
        if self._best_fn is not None and metrics is None:
            raise error("Checkpointer.save",
                        "this Checkpointer ranks steps with best_fn, but save() got no metrics",
                        "pass metrics={...} (what best_fn reads)")
        if not isinstance(config, LoraConfig):
            raise error("Checkpointer.save",
                        f"config must be a lj.LoraConfig, got {type(config).__name__}",
                        "pass the LoraConfig the adapters were created with", kind=TypeError)
        config.to_dict()  # fails early for configs that can't be written
        arrays, entries = adapter_arrays(adapters, config, params, check_finite)
        st_arrays, st_record = state_arrays(opt_state, rng)
        record = build_record(config, entries, st_record,
                              self._fingerprint(params, config, fingerprint),
                              dict(metadata or {}), step, run_id=self._run_id,
                              metrics=dict(metrics) if metrics is not None else None)
        canonical(record)  # metadata and metrics must be JSON-able before anything is written
        if self._pending is not None:     # the previous (async) save must land first
            with _disk_errors(self.directory, self._pending):
                self._mngr.wait_until_finished()
            self._pending = None
            self._prune()
        latest = self.latest_step
        if latest is not None and step <= latest:
            raise error(self.directory,
                        f"step {step} is not after the latest saved step {latest}",
                        "save with a larger step, or to a new directory")
        if os.path.lexists(os.path.join(self.directory, str(step))):
            raise error(os.path.join(self.directory, str(step)),
                        "a folder of this name exists and is not a lora_jax step (it holds "
                        "no lora_jax record); saving step "
                        f"{step} would replace it", "save with another step number, or "
                        "into a directory of its own", kind=CheckpointError)
        ocp = orbax_checkpoint()
        items = {ARRAYS_ITEM: ocp.args.StandardSave(arrays), META_ITEM: ocp.args.JsonSave(record)}
        if st_arrays:
            items[STATE_ITEM] = ocp.args.StandardSave(st_arrays)
        if self._lease is not None:
            self._lease.renew()
        with _disk_errors(self.directory, step):
            self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
        self._pending = step
        if not self._async:
            self.wait()
        return step

    # -- restore
    def restore(self, *, params=None, like=None, step: int | None = None, dtype=None,
                shardings=None, on_base_mismatch: str = "error", check_finite: bool = True,
                check_identity: bool = True):
        """Restores ``(adapters, config)``; see `lj.restore`."""
        state, config = self._restore(params, like, step, dtype, shardings, on_base_mismatch,
                                      check_finite, with_state=False, state_like=None,
                                      check_identity=check_identity)
        return state.adapters, config

    def restore_state(self, *, params=None, like=None, tx=None, opt_state_like=None,
                      step: int | None = None, dtype=None, shardings=None,
                      on_base_mismatch: str = "error", check_finite: bool = True,
                      check_identity: bool = True):
        """Restores ``(TrainState, config)``; see `lj.restore_state`."""
        return self._restore(params, like, step, dtype, shardings, on_base_mismatch,
                             check_finite, with_state=True,
                             state_like=(tx, opt_state_like), check_identity=check_identity)

    def info(self, *, step: int | None = None, check_identity: bool = True) -> CheckpointInfo:
        """Metadata of one step without reading its arrays; see `lj.checkpoint_info`."""
        return inspect_step(self._mngr, self.directory, step, check_identity=check_identity)

    def inspect(self, step: int | None = None) -> CheckpointInfo:
        """Deprecated alias of `info` (it shadowed the standard library's name)."""
        warnings.warn(message("Checkpointer.inspect",
                              "deprecated; it will be removed in lora_jax 0.3",
                              "use Checkpointer.info(step=...)"),
                      DeprecationWarning, stacklevel=2)
        return self.info(step=step)

    def _restore(self, params, like, step, dtype, shardings, on_base_mismatch, check_finite,
                 with_state, state_like, check_identity):
        if params is not None and like is not None:
            raise error("lj.restore_state" if with_state else "lj.restore",
                        "got both params= and like= (like= is the exact target tree; params= "
                        "builds one from the saved config)", "pass params= or like=, not both",
                        kind=TypeError)
        if dtype is not None:
            dtype = jnp.dtype(dtype)
        step = pick_step(self._mngr, step, self.directory)
        where = os.path.join(self.directory, str(step))
        rec = read_record(self._mngr, step, where)
        if check_identity:
            bind(rec, step, self.directory, where)
        config = config_of(rec, where)
        slots, treedef = expected_nodes(rec, params, like)
        check_slots(rec, slots, where, dtype, used_like=like is not None)
        if params is not None:
            skeleton = jax.tree_util.tree_unflatten(treedef, [n for _, n in slots])
            try:
                check_adapters(params, lora_shaped(skeleton), config)
            except ValueError as e:   # e says what and how to fix; name the step too
                raise error(where, str(e), kind=CheckpointError) from None
            check_base(params, rec.get("fingerprint"), on_mismatch=on_base_mismatch, what=where)
        st_abstract = opt_like = None
        if with_state:
            opt_like = abstract_opt_state(rec, slots, treedef, *state_like, where=where)
            st_abstract = state_abstract(rec, where, opt_like, shardings)
        arrays, st = restore_arrays(self._mngr, step, rec, slots, shardings, where,
                                    check_finite, st_abstract)
        adapters = assemble(rec, slots, treedef, arrays, dtype)
        if config.scale_from == "config":   # the record's config must describe the arrays
            flat = flatten_adapters(lora_shaped(adapters))[0]
            scales = [(p, n.scale, np.shape(n.a)[-1]) for p, n in flat
                      if is_lora(n) and np.ndim(n.scale) == 0]
            try:
                check_scales(scales, config)
            except ValueError as e:
                raise error(where, str(e), kind=CheckpointError) from None
        if dtype is not None:
            config = config.replace(dtype=dtype)
        opt_state = rng = None
        if st is not None:
            opt_state, rng = unpack_state(rec, st, where, opt_like)
        # the record's step: the folder's name when bound, what the step really is if not
        saved = rec.get("step")
        return TrainState(step if saved is None else int(saved), adapters, opt_state, rng), config
