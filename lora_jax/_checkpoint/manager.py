"""The Orbax side of adapter checkpoints: one ``CheckpointManager`` per directory.

Creating the manager (preservation policy, item names), emptying the trash of
pruned steps, picking a step, and reading a step's JSON record.
"""

from __future__ import annotations

import os
import shutil

from lora_jax._checkpoint.record import CheckpointError, check_record
from lora_jax._core.config import LoraConfig

__all__ = ["ARRAYS_ITEM", "STATE_ITEM", "META_ITEM", "orbax_checkpoint", "create_manager",
           "empty_trash", "pick_step", "read_record", "config_of"]

ARRAYS_ITEM, STATE_ITEM, META_ITEM = "adapters", "state", "lora_jax"
"""The names of a step's three Composite items: arrays, training state, the record."""

# Steps pruned by max_to_keep are first renamed here (atomic), then deleted:
# deleting in place could be killed midway and leave a listed, half-deleted step.
_TRASH = ".lora_jax-deleted"
_ITEMS = (ARRAYS_ITEM, STATE_ITEM, META_ITEM)


def orbax_checkpoint():
    """The ``orbax.checkpoint`` module, imported on first use."""
    import orbax.checkpoint as ocp
    return ocp


def _preservation(max_to_keep, best_fn, best_mode):
    cm = orbax_checkpoint().checkpoint_managers
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


def create_manager(directory, *, read_only: bool, async_save: bool = False, max_to_keep=None,
                   best_fn=None, best_mode="min"):
    """The Orbax ``CheckpointManager`` of ``directory`` (read-only, or with the retention policy)."""
    ocp = orbax_checkpoint()
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


def empty_trash(directory) -> None:
    """Deletes steps that retention already renamed out of sight."""
    trash = os.path.join(directory, _TRASH)
    if os.path.isdir(trash):
        for name in os.listdir(trash):
            shutil.rmtree(os.path.join(trash, name), ignore_errors=True)


def pick_step(mngr, step, directory) -> int:
    """``step`` if it is a complete step on disk, the latest one for None; else raises."""
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


def read_record(mngr, step, where) -> dict:
    """The step's JSON record, validated (`check_record`)."""
    ocp = orbax_checkpoint()
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
        rec = out[META_ITEM]
    except Exception as e:  # orbax/json raise many types; name the file either way
        raise CheckpointError(
            f"{where}: reading the checkpoint metadata ({META_ITEM}/metadata) failed: "
            f"{type(e).__name__}: {e}. Fix: restore another step.") from e
    return check_record(rec, where)


def config_of(rec, where) -> LoraConfig:
    """The `LoraConfig` saved in a record."""
    try:
        return LoraConfig.from_dict(rec["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: the saved LoraConfig can't be read: {e}") from e
