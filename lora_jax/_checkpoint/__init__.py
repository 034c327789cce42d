"""Verified adapter checkpoints on Orbax: the record, base fingerprints, the manager.

  record        what is stored besides the arrays, and its validation on read
  fingerprint   the base fingerprint, `check_base`
  manager       the Orbax side: the CheckpointManager, retention, steps, the JSON record
  restore       restoring into a skeleton: slots, checks, verified arrays
  info          `CheckpointInfo`: a step read without its arrays
  checkpointer  `Checkpointer` and `TrainState`
  api           the one-shot `save`, `restore`, `restore_state`, `inspect`
"""

from lora_jax._checkpoint.api import inspect as inspect
from lora_jax._checkpoint.api import restore as restore
from lora_jax._checkpoint.api import restore_state as restore_state
from lora_jax._checkpoint.api import save as save
from lora_jax._checkpoint.checkpointer import Checkpointer as Checkpointer
from lora_jax._checkpoint.checkpointer import TrainState as TrainState
from lora_jax._checkpoint.fingerprint import BaseMismatchError as BaseMismatchError
from lora_jax._checkpoint.fingerprint import base_fingerprint as base_fingerprint
from lora_jax._checkpoint.fingerprint import check_base as check_base
from lora_jax._checkpoint.info import CheckpointInfo as CheckpointInfo
from lora_jax._checkpoint.record import FORMAT_VERSION as FORMAT_VERSION
from lora_jax._checkpoint.record import CheckpointError as CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "BaseMismatchError",
    "CheckpointError",
    "CheckpointInfo",
    "Checkpointer",
    "TrainState",
    "base_fingerprint",
    "check_base",
    "inspect",
    "restore",
    "restore_state",
    "save",
]
