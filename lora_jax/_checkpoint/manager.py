"""The Orbax side of adapter checkpoints: one ``CheckpointManager`` per directory.

Creating the manager, the run directory's identity and steps, retention,
picking a step, and reading and binding a step's JSON record.

A *step* is a numbered sub-directory holding lora_jax's record
(``<step>/lora_jax/metadata``); other folders -- the user's own ``1/``, ``2/``
-- are never listed as steps, pruned or deleted. Orbax itself deletes
nothing: retention (`prune`) is lora_jax's and touches only steps of this
run. The run's identity is a random id fixed by its first save
(``<dir>/.lora_jax-run``); every record carries it and its step number, so a
step copied, renamed or symlinked from elsewhere is recognised (`bind`).
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping

from lora_jax._checkpoint.record import CheckpointError, check_record
from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error

__all__ = ["ARRAYS_ITEM", "STATE_ITEM", "META_ITEM", "orbax_checkpoint", "create_manager",
           "empty_trash", "pick_step", "read_record", "config_of", "list_steps", "run_id",
           "prune", "bind", "check_max_to_keep", "RUN_FILE"]

ARRAYS_ITEM, STATE_ITEM, META_ITEM = "adapters", "state", "lora_jax"
"""The names of a step's three Composite items: arrays, training state, the record."""

# Steps pruned by max_to_keep are first renamed here (atomic), then deleted:
# deleting in place could be killed midway and leave a listed, half-deleted step.
_TRASH = ".lora_jax-deleted"
_ITEMS = (ARRAYS_ITEM, STATE_ITEM, META_ITEM)
RUN_FILE = ".lora_jax-run"


class _QuietOrbax(logging.Filter):
    """Drops Orbax's notices about what lora_jax does on purpose (a read-only manager,
    a numbered folder of the user's that is not a step), which would otherwise reach
    every reader's stderr as warnings."""

    _EXPECTED = ("setting save_interval_steps=0", "Given directory is read only",
                 "Metadata file does not exist")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(s in text for s in self._EXPECTED)


_QUIET = _QuietOrbax()


def orbax_checkpoint():
    """The ``orbax.checkpoint`` module, imported on first use (it adds a quarter of a
    second to ``import lora_jax``, which most programs that never checkpoint don't need)."""
    import orbax.checkpoint as ocp
    absl = logging.getLogger("absl")
    if _QUIET not in absl.filters:
        absl.addFilter(_QUIET)
    return ocp


def check_max_to_keep(max_to_keep, best_mode) -> None:
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or
                                    not isinstance(max_to_keep, int) or max_to_keep < 1):
        raise error("Checkpointer", f"max_to_keep={max_to_keep!r} is not an int >= 1",
                    "use an int >= 1, or None to keep all")
    if best_mode not in ("min", "max"):
        raise error("Checkpointer", f"best_mode={best_mode!r} is not 'min' or 'max'",
                    "best_mode='min' (the lowest best_fn value is best) or 'max'")


def create_manager(directory, *, read_only: bool, async_save: bool = False):
    """The Orbax ``CheckpointManager`` of ``directory``: read-only, or a writer's (the
    caller holds the directory's lease, so leftover tmp directories are dead writers'
    and cleaning them up is safe). Orbax keeps every step; `prune` decides."""
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
            enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(directory, options=opts, item_names=_ITEMS)


def empty_trash(directory) -> None:
    """Deletes steps that retention already renamed out of sight."""
    trash = os.path.join(directory, _TRASH)
    if os.path.isdir(trash):
        for name in os.listdir(trash):
            shutil.rmtree(os.path.join(trash, name), ignore_errors=True)


def _record_path(directory, step) -> str:
    return os.path.join(directory, str(step), META_ITEM, "metadata")


def list_steps(directory) -> list[int]:
    """The complete lora_jax steps in ``directory``, ascending (numbered folders with a
    lora_jax record; a save still in flight has no numbered folder yet)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names
                  if n.isdigit() and os.path.isfile(_record_path(directory, n)))


def run_id(directory, *, create: bool = False) -> str | None:
    """The run's id (``<dir>/.lora_jax-run``); a writer's first save creates it."""
    path = os.path.join(directory, RUN_FILE)
    try:
        with open(path) as fh:
            data = json.load(fh)
        if isinstance(data, dict) and isinstance(data.get("run_id"), str):
            return data["run_id"]
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        raise error(path, f"the run's identity file can't be read ({e})",
                    "restore it from a backup of the run directory, or delete it to start "
                    "a new run identity (steps saved before then read as another run's)",
                    kind=CheckpointError) from e
    if not create:
        return None
    rid = uuid.uuid4().hex
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"run_id": rid, "created": time.time()}, fh)
    os.replace(tmp, path)
    return rid


def _raw_record(directory, step) -> dict:
    try:
        with open(_record_path(directory, step)) as fh:
            rec = json.load(fh)
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def prune(directory, *, keep_latest: int | None, best_fn: Callable | None, best_mode: str,
          run: str | None, protect: int | None = None) -> list[int]:
    """Deletes this run's steps beyond the retention policy; returns the steps deleted.

    Only steps whose record carries ``run`` are candidates; the latest step is
    always kept, and so is ``protect`` (a step being written). A step is
    renamed into the trash (atomic) before it is deleted, so an interrupted
    prune never leaves a listed, half-deleted step.
    """
    if keep_latest is None:
        return []
    steps = [s for s in list_steps(directory) if s != protect]
    ours = [s for s in steps if _raw_record(directory, s).get("run_id") == run]
    if len(ours) <= keep_latest:
        return []
    latest = max(steps)             # steps holds ``ours``, which is not empty
    if best_fn is None:
        keep = set(ours[-keep_latest:])
    else:
        scored = [(s, best_fn(_raw_record(directory, s).get("metrics") or {})) for s in ours]
        scored.sort(key=lambda t: t[1], reverse=(best_mode == "max"))
        keep = {s for s, _ in scored[:keep_latest]}
    keep.add(latest)
    gone = [s for s in ours if s not in keep]
    trash = os.path.join(directory, _TRASH)
    os.makedirs(trash, exist_ok=True)
    for s in gone:
        os.replace(os.path.join(directory, str(s)), os.path.join(trash, f"{s}.{uuid.uuid4().hex}"))
    empty_trash(directory)
    return gone


def bind(rec: Mapping, step: int, directory, where: str) -> None:
    """Refuses a record that is not this directory's step ``step`` (copied, renamed or
    symlinked in from elsewhere), naming what it is."""
    step_dir = os.path.join(directory, str(step))
    real_root, real = os.path.realpath(directory), os.path.realpath(step_dir)
    fix = ("restore it from the run directory it was written in (copy whole run "
           "directories, not single steps), or pass check_identity=False to read it anyway")
    if os.path.dirname(real) != real_root:
        raise error(where, f"step {step} is a link to {real}, another directory's step",
                    fix, kind=CheckpointError)
    saved = rec.get("step")
    if saved is not None and int(saved) != int(step):
        raise error(where, f"the folder is step {step} but its record was written as step "
                           f"{saved} (copied or renamed: e.g. cp -r {saved} {step}); its "
                           f"optimizer state and rng are step {saved}'s", fix,
                    kind=CheckpointError)
    ours, theirs = run_id(directory), rec.get("run_id")
    if ours is not None and theirs is not None and ours != theirs:
        raise error(where, f"this step was written by another run (run id {theirs}; this "
                           f"directory's run is {ours}): copied in from elsewhere", fix,
                    kind=CheckpointError)


def pick_step(mngr, step, directory) -> int:
    """``step`` if it is a complete step on disk, the latest one for None; else raises."""
    if step is not None and (isinstance(step, bool) or not isinstance(step, numbers.Integral)):
        kind = type(step).__name__
        raise error(directory, f"step={step!r} is a {kind}, not an int",
                    f"pass step={int(step)}" if isinstance(step, str) and step.isdigit()
                    else "pass an int step, or step=None for the latest", kind=TypeError)
    steps = list_steps(directory)
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
