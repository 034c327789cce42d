"""What a checkpoint step holds, read without its arrays: `CheckpointInfo`."""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np

from lora_jax._checkpoint.fingerprint import fingerprint_summary
from lora_jax._checkpoint.lease import LEASE_FILE
from lora_jax._checkpoint.manager import bind, config_of, list_steps, pick_step, read_record
from lora_jax._checkpoint.record import FACTOR_KINDS, fields
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
    run_id: str | None = None      # the run that wrote the step (None: lora_jax 0.1)
    metrics: dict | None = None    # the metrics saved with the step
    writer: dict | None = None     # who holds the directory's writer lease now, if anyone
    folder: str | None = None      # the step's folder name, when it differs from ``step``

    @property
    def n_params(self) -> int:
        return sum(r[6] for r in self.rows)

    @property
    def array_bytes(self) -> int:
        return sum(r[7] for r in self.rows)

    def __str__(self) -> str:
        cfg = self.config
        moved = (f" in folder {self.folder!r} (copied or renamed)"
                 if self.folder is not None else "")
        out = [f"checkpoint {self.directory} step {self.step}{moved} (steps: {self.steps}); "
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
        out.append(f"run: {self.run_id or 'unknown (written by lora_jax 0.1)'}; writer: "
                   + (f"process {self.writer.get('pid')} on {self.writer.get('host')!r}"
                      if self.writer else "none (no save in progress)"))
        if self.metrics:
            out.append(f"metrics: {json.dumps(self.metrics, sort_keys=True)}")
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


def inspect_step(mngr, directory, step, *, check_identity: bool = True) -> CheckpointInfo:
    """The `CheckpointInfo` of one step (the latest for None), read without its arrays."""
    step = pick_step(mngr, step, directory)
    where = os.path.join(directory, str(step))
    rec = read_record(mngr, step, where)
    if check_identity:
        bind(rec, step, directory, where)
    config = config_of(rec, where)
    rows = []
    for path, e in rec["entries"].items():
        if e["kind"] in FACTOR_KINDS:
            a, b = e["a"], e["b"]
            trained = [e[f] for f in fields(e) if f != "scale"]
            n = sum(int(np.prod(x["shape"])) for x in trained)
            nb = sum(int(np.prod(x["shape"])) * jnp.dtype(x["dtype"]).itemsize for x in trained)
            # The scale is data; the table shows the config's value for the path.
            rows.append((path, e["kind"], tuple(a["shape"]), tuple(b["shape"]), a["shape"][-1],
                         config.scale_for(path), n, nb, a["dtype"]))
        else:
            arr = e["array"]
            n = int(np.prod(arr["shape"]))
            rows.append((path, "train", tuple(arr["shape"]), None, None, None, n,
                         n * jnp.dtype(arr["dtype"]).itemsize, arr["dtype"]))
    state = rec.get("state") or {}
    saved = int(rec["step"]) if rec.get("step") is not None else step
    return CheckpointInfo(
        directory=directory, step=saved, folder=None if saved == step else str(step),
        steps=list_steps(directory), config=config,
        rows=rows, fingerprint=rec.get("fingerprint"), has_opt_state="opt_state" in state,
        has_rng="rng" in state, metadata=rec.get("metadata") or {},
        format_version=rec["format_version"], lora_jax_version=rec.get("lora_jax_version"),
        disk_bytes=_dir_bytes(where), run_id=rec.get("run_id"), metrics=rec.get("metrics"),
        writer=_writer(directory))


def _writer(directory) -> dict | None:
    try:
        with open(os.path.join(directory, LEASE_FILE)) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
