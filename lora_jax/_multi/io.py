"""Adapter sets on disk: `save_set` / `restore_set`.

`lj.save` / `lj.restore` of a set's stacked tree, with the names and
per-adapter configs in the step's metadata (under `METADATA_KEY`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lora_jax._checkpoint.api import save
from lora_jax._checkpoint.checkpointer import Checkpointer
from lora_jax._checkpoint.record import CheckpointError
from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.weights import flatten_adapters, is_lora
from lora_jax._multi.set import AdapterSet, Member, check_set

__all__ = ["METADATA_KEY", "save_set", "restore_set"]

METADATA_KEY = "lora_jax.adapter_set"
"""The metadata key under which `save_set` stores the set's names and configs."""


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
      ...     back = lj.restore_set(d, params=params)
      >>> same_b = bool((back.adapters["w"].b == aset.adapters["w"].b).all())
      >>> back.names, back.members[0].config == c2, same_b
      (('a', 'b'), True, True)
    """
    check_set(aset, "save_set")
    meta = dict(metadata or {})
    if METADATA_KEY in meta:
        raise error("lj.save_set", f"metadata key {METADATA_KEY!r} is reserved for the set's "
                                   f"names and configs",
                    "store your data under another key")
    meta[METADATA_KEY] = {
        "names": list(aset.names),
        "configs": [m.config.to_dict() for m in aset.members],
        "ranks": [[[p, r] for p, r in m.ranks] for m in aset.members],
    }
    return save(directory, aset.adapters, aset.config, step=step, params=params, metadata=meta)


def restore_set(directory, *, params=None, step: int | None = None,
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
    with Checkpointer(directory, read_only=True) as ck:
        info = ck.info(step=step)
        meta = (info.metadata or {}).get(METADATA_KEY)
        where = f"{ck.directory}/{info.step}"
        if meta is None:
            raise error(where, "this step holds a single adapter, not an adapter set",
                        "restore it with lj.restore, or save sets with lj.save_set",
                        kind=CheckpointError)
        adapters, config = ck.restore(params=params, step=info.step,
                                      on_base_mismatch=on_base_mismatch)
    try:
        members = tuple(Member(n, LoraConfig.from_dict(c), tuple((p, int(r)) for p, r in rk))
                        for n, c, rk in zip(meta["names"], meta["configs"], meta["ranks"],
                                            strict=True))
    except (KeyError, TypeError, ValueError) as e:
        raise error(where, f"the adapter-set metadata can't be read ({type(e).__name__}: {e})",
                    "restore another step, or re-save the set with lj.save_set",
                    kind=CheckpointError) from e
    for _, node in flatten_adapters(adapters)[0]:
        if is_lora(node) and np.shape(node.scale) != (len(members),):
            raise error(where, f"the metadata names {len(members)} adapters but the arrays hold "
                               f"{np.shape(node.scale)}; the step is inconsistent",
                        "restore another step", kind=CheckpointError)
    return AdapterSet(adapters, config, members)
