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
not do, this package adds: it verifies every array against its sha256 (Orbax
restores a flipped byte silently), restores each array as it was saved and
converts only when asked (Orbax casts silently), checks the base the adapter
was trained on (`lj.check_base`), and always keeps the latest step when a
best-metric policy prunes the others.

Paths are the '/'-joined key paths of `lj.path_str`; arrays are restored into
a skeleton built from ``params`` and the saved config, or from ``like=``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

from lora_jax._checkpoint.checkpointer import Checkpointer
from lora_jax._checkpoint.info import CheckpointInfo
from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import message

__all__ = ["save", "restore", "restore_state", "inspect"]


def save(directory, adapters, config: LoraConfig, *, step: int | None = None, params=None,
         opt_state=None, rng=None, metrics: Mapping | None = None,
         metadata: Mapping | None = None, max_to_keep: int | None = None,
         check_finite: bool = True, fingerprint: str = "sampled", force: bool = False) -> int:
    """Saves adapters (and optionally training state) as one checkpoint step.

    Synchronous: when it returns, the step is complete on disk. For saving
    during training (asynchronously, with retention policies) use
    `Checkpointer`.

    Args:
      directory: the checkpoint root; each step is a sub-directory.
      adapters: the adapter tree: `LoraWeights` (DoRA's too), fully-trained
        arrays, or AdaLoRA's `AdaLoraWeights` (restored as such; its allocator
        state `lj.AdaLoraState` goes in ``opt_state``).
      config: the adapters' `LoraConfig`.
      step: the step number (default: one after the latest, or 0, skipping
        numbers whose folder exists but is not a lora_jax step).
      params: the base params: checks the adapters against them and stores a
        base fingerprint, which `restore` and ``merge`` verify.
      opt_state: optimizer state, for `restore_state`.
      rng: a PRNG key, for `restore_state`.
      metrics: JSON-able metrics recorded with the step.
      metadata: JSON-able user data recorded with the step.
      max_to_keep: delete older steps of this run beyond this many (never the
        latest; never a folder lora_jax did not write, nor another run's step).
      check_finite: refuse adapters holding NaN/Inf.
      fingerprint: with ``params``, ``"sampled"`` (every row and column of every
        base leaf) or ``"full"`` (every byte); see `lj.base_fingerprint`.
      force: take the writer lease over from a writer on another host (see
        `Checkpointer`); a live writer on this host is never overridden.

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
    with Checkpointer(directory, max_to_keep=max_to_keep, async_save=False,
                      force=force) as ckpt:
        if step is None:
            latest = ckpt.latest_step
            step = 0 if latest is None else latest + 1
            while os.path.lexists(os.path.join(ckpt.directory, str(step))):
                step += 1           # a folder lora_jax did not write: never replaced
        return ckpt.save(step, adapters, config, params=params, opt_state=opt_state, rng=rng,
                         metrics=metrics, metadata=metadata, check_finite=check_finite,
                         fingerprint=fingerprint)


def restore(directory, *, params=None, like=None, step: int | None = None, dtype=None,
            shardings=None, on_base_mismatch: str = "error", check_finite: bool = True,
            check_identity: bool = True):
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
      check_identity: refuse a step whose record names another step number or
        run than the directory it sits in (a copied, renamed or symlinked step).
        ``False`` reads it anyway, as what its record says it is.

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
      ...     back, cfg2 = lj.restore(d, params=params)
      >>> bool((back["w"].a == ad["w"].a).all()), cfg2 == cfg
      (True, True)
    """
    with Checkpointer(directory, read_only=True) as ck:
        return ck.restore(params=params, like=like, step=step, dtype=dtype, shardings=shardings,
                          on_base_mismatch=on_base_mismatch, check_finite=check_finite,
                          check_identity=check_identity)


def restore_state(directory, *, params=None, like=None, tx=None, opt_state_like=None,
                  step: int | None = None, dtype=None, shardings=None,
                  on_base_mismatch: str = "error", check_finite: bool = True,
                  check_identity: bool = True):
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
      ...     state, _ = lj.restore_state(d, params=params, tx=tx)
      >>> state.step, jax.random.key_data(state.rng).tolist()
      (7, [0, 3])
    """
    with Checkpointer(directory, read_only=True) as ck:
        return ck.restore_state(params=params, like=like, tx=tx, opt_state_like=opt_state_like,
                                step=step, dtype=dtype, shardings=shardings,
                                on_base_mismatch=on_base_mismatch, check_finite=check_finite,
                          check_identity=check_identity)


def checkpoint_info(directory, *, step: int | None = None, check_identity: bool = True
                    ) -> CheckpointInfo:
    """Reads a checkpoint's config, entries and fingerprint without its arrays.

    Reading never changes the directory (no clean-up, no lease taken). With
    ``check_identity=False`` a copied or renamed step is reported as what its
    record says (``info.step``, ``info.run_id``) instead of refused.

    Example:
      >>> import tempfile, jax, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
      >>> cfg = lj.LoraConfig(rank=2, alpha=4, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(1))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = lj.save(d, ad, cfg)
      ...     info = lj.checkpoint_info(d)
      >>> info.step, info.n_params, info.rows[0][:5]
      (0, 64, ('w', 'lora', (16, 2), (2, 16), 2))
    """
    with Checkpointer(directory, read_only=True) as ck:
        return ck.info(step=step, check_identity=check_identity)


def inspect(directory, *, step: int | None = None) -> CheckpointInfo:
    """Deprecated alias of `checkpoint_info` (the name shadowed the standard library's
    ``inspect`` module on ``from lora_jax import *``); removed in lora_jax 0.3.

    Example:
      >>> import tempfile, warnings, jax, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = lj.save(d, lj.init(params, cfg, key=jax.random.key(1)), cfg)
      ...     with warnings.catch_warnings(record=True) as w:
      ...         warnings.simplefilter("always")
      ...         step = lj.inspect(d).step
      >>> step, w[0].category.__name__
      (0, 'DeprecationWarning')
    """
    warnings.warn(message("lj.inspect", "deprecated; it will be removed in lora_jax 0.3",
                          "use lj.checkpoint_info (same arguments)"),
                  DeprecationWarning, stacklevel=2)
    return checkpoint_info(directory, step=step)
