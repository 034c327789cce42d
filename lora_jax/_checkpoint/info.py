"""What a checkpoint step holds, read without its arrays: `CheckpointInfo`."""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np

from lora_jax._checkpoint.fingerprint import fingerprint_summary
from lora_jax._checkpoint.manager import config_of, pick_step, read_record
from lora_jax._core.config import LoraConfig
from lora_jax._core.fmt import table

__all__ = ["CheckpointInfo", "inspect_step"]


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
    lora_jax_version: str | None   # None in a record written without it
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
               f"config: rank={cfg.rank} alpha={cfg.alpha:g} targets={_shown(cfg.targets)} "
               f"use_rslora={cfg.use_rslora} dtype={cfg.dtype.name}"
               + (f" train={_shown(cfg.train)}" if cfg.train else "")]
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


def _shown(patterns):
    """A config's normalized patterns (a tuple of regexes; a saved config has no
    callables) as a list."""
    return list(patterns) if isinstance(patterns, tuple) else patterns


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def inspect_step(mngr, directory, step) -> CheckpointInfo:
    """The `CheckpointInfo` of one step (the latest for None), read without its arrays."""
    step = pick_step(mngr, step, directory)
    where = os.path.join(directory, str(step))
    rec = read_record(mngr, step, where)
    config = config_of(rec, where)
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
