"""The Orbax side of adapter checkpoints: one ``CheckpointManager`` per directory.

Creating the manager (preservation policy, item names), emptying the trash of
pruned steps, picking a step, and reading a step's JSON record.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

from lora_jax._checkpoint.record import CheckpointError, check_record
from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error

__all__ = ["ARRAYS_ITEM", "STATE_ITEM", "META_ITEM", "orbax_checkpoint", "create_manager",
           "empty_trash", "pick_step", "read_record", "config_of"]

ARRAYS_ITEM, STATE_ITEM, META_ITEM = "adapters", "state", "lora_jax"
"""The names of a step's three Composite items: arrays, training state, the record."""

# Steps pruned by max_to_keep are first renamed here (atomic), then deleted:
# deleting in place could be killed midway and leave a listed, half-deleted step.
_TRASH = ".lora_jax-deleted"
_ITEMS = (ARRAYS_ITEM, STATE_ITEM, META_ITEM)


def orbax_checkpoint():
    """The ``orbax.checkpoint`` module, imported on first use (it adds a quarter of a
    second to ``import lora_jax``, which most programs that never checkpoint don't need)."""
    import orbax.checkpoint as ocp
    return ocp


def _preservation(max_to_keep, best_fn, best_mode):
    cm = orbax_checkpoint().checkpoint_managers
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or
                                    not isinstance(max_to_keep, int) or max_to_keep < 1):
        raise error("Checkpointer", f"max_to_keep={max_to_keep!r} is not an int >= 1",
                    "use an int >= 1, or None to keep all")
    if best_fn is None:
        return cm.LatestN(n=max_to_keep)
    if best_mode not in ("min", "max"):
        raise error("Checkpointer", f"best_mode={best_mode!r} is not 'min' or 'max'",
                    "best_mode='min' (the lowest best_fn value is best) or 'max'")
    # Orbax's best-N alone can delete the latest step; resuming needs it.
    return cm.AnyPreservationPolicy([
        cm.LatestN(n=1),
        cm.BestN(get_metric_fn=best_fn, reverse=(best_mode == "min"), n=max_to_keep)])


def create_manager(directory, *, read_only: bool, async_save: bool = False, max_to_keep=None,
                   best_fn=None, best_mode="min"):
    """The Orbax ``CheckpointManager`` of ``directory`` (read-only, or with retention)."""
    ocp = orbax_checkpoint()
    directory = os.path.abspath(os.fspath(directory))
    if read_only and not os.path.isdir(directory):
        raise error(directory, "no such checkpoint directory",
                    "check the path (it is the directory given to lj.save, holding one "
                    "sub-directory per step)", kind=CheckpointError)
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
            raise error(directory, f"no complete checkpoint{extra}",
                        "check the path, or save one with lj.save", kind=CheckpointError)
        return max(steps)
    if step not in steps:
        raise error(directory, f"no complete checkpoint for step {step}; steps present: {steps}",
                    "pass one of those, or step=None for the latest", kind=CheckpointError)
    return int(step)


def read_record(mngr, step, where) -> Mapping:
    """The step's JSON record, validated (`check_record`)."""
    ocp = orbax_checkpoint()
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
        rec = out[META_ITEM]
    except Exception as e:  # orbax/json raise many types; name the file either way
        raise error(where, f"reading the checkpoint metadata ({META_ITEM}/metadata) failed: "
                           f"{type(e).__name__}: {e}",
                    "restore another step", kind=CheckpointError) from e
    return check_record(rec, where)


def config_of(rec, where) -> LoraConfig:
    """The `LoraConfig` saved in a record."""
    try:
        return LoraConfig.from_dict(rec["config"])
    except (ValueError, TypeError) as e:
        raise error(where, f"the saved LoraConfig can't be read: {e}",
                    "restore another step, or read this one with the lora_jax version that "
                    "wrote it", kind=CheckpointError) from e
