"""The integrity record of an adapter checkpoint.

Everything `lj.save` writes besides the arrays, and everything `lj.restore`
checks before trusting them: the adapters and optimizer state flattened
into ``'/'``-path-keyed arrays (non-finite values refused), the shape,
dtype and sha256 of every array (hashed on threads: hashlib releases the
GIL), and the JSON record -- format and version, the `LoraConfig`, the base
fingerprint, user metadata and a sha256 of the record itself -- with its
validation on read. Orbax (`lora_jax._checkpoint.manager`) stores and loads; this
module decides what is stored and whether what came back is what was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata as importlib_metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.paths import path_str
from lora_jax._core.weights import (
    AdaLoraWeights,
    LoraWeights,
    check_adapters,
    check_floating,
    check_scales,
    flatten_adapters,
    is_adalora,
    is_lora,
    lora_shaped,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointError", "fields", "canonical", "sha256_json",
           "array_record", "records", "check_finite_values", "adapter_arrays", "state_arrays",
           "build_record", "check_record", "FACTOR_KINDS", "KIND_NAMES", "kind_of",
           "build_node"]

FORMAT = "lora_jax.adapter_checkpoint"
FORMAT_VERSION = 2
# Version 2 added AdaLoRA entries; a record without them is written as version 1,
# so lora_jax 0.2 (which reads version 1) still reads every plain LoRA checkpoint.
_PLAIN_VERSION = 1
_FIELDS = ("a", "b", "scale")
_ADALORA_FIELDS = ("a", "e", "b", "scale")
FACTOR_KINDS = ("lora", "adalora")


def fields(e) -> tuple:
    """The saved fields of a factor entry: ``a, b, scale`` (DoRA adds its magnitude
    ``m``), or AdaLoRA's ``a, e, b, scale``."""
    if e.get("kind") == "adalora":
        return _ADALORA_FIELDS
    return _FIELDS + (("m",) if "m" in e else ())


def kind_of(node) -> str:
    """The record's kind of an adapter node: ``lora``, ``adalora`` or ``train``."""
    return "adalora" if is_adalora(node) else "lora" if is_lora(node) else "train"


KIND_NAMES = {"lora": "LoraWeights", "adalora": "AdaLoraWeights",
              "train": "a fully-trained array"}


def build_node(kind: str, d: Mapping):
    """The adapter node of a factor entry from its ``{field: value}`` mapping."""
    if kind == "adalora":
        return AdaLoraWeights(d["a"], d["e"], d["b"], d["scale"])
    return LoraWeights(d["a"], d["b"], d["scale"], d.get("m"))


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, of an unknown format, or doesn't fit."""


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sha256_json(obj) -> str:
    return hashlib.sha256(canonical(obj)).hexdigest()


def _local(x):
    """``x`` readable on this host. A global array of a multi-process run
    (``jax.distributed``) spans devices of other processes: every process
    gathers it, in the same order (a collective), and hashes the same bytes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return multihost_utils.process_allgather(x, tiled=True)
    return x


def _host(x) -> np.ndarray:
    h = np.asarray(_local(x))
    # (np.ascontiguousarray would turn a 0-d scale into shape (1,).)
    return h if h.flags.c_contiguous else np.ascontiguousarray(h)


def _digest(h: np.ndarray) -> str:
    # A byte view (.data: a memoryview), not tobytes(): no copy of a 100 MB array.
    return hashlib.sha256(h.reshape(-1).view(np.uint8).data).hexdigest()


def array_record(x) -> dict:
    h = _host(x)
    return {"shape": list(h.shape), "dtype": h.dtype.name, "sha256": _digest(h)}


def records(arrays: list) -> list[dict]:
    """`array_record` of each array; large trees hash on several threads
    (hashlib releases the GIL), so hashing keeps pace with Orbax's I/O."""
    arrays = [_local(x) for x in arrays]  # collectives: here, in order, not on threads
    total = sum(int(np.prod(np.shape(x))) for x in arrays)
    if total < (1 << 22) or (os.cpu_count() or 1) < 2:
        return [array_record(x) for x in arrays]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(array_record, arrays))


def _as_array(x):
    if isinstance(x, jax.Array):
        return x
    return jnp.asarray(x)


def check_finite_values(path: str, field: str, x, where: str) -> None:
    h = np.asarray(_local(x))
    if np.issubdtype(h.dtype, np.inexact) or h.dtype.name == "bfloat16":
        if not np.isfinite(h).all():
            n = int(np.sum(~np.isfinite(h)))
            name = f"{path}/{field}" if field else path
            raise error(name, f"{n} NaN/Inf value(s) {where}. An adapter with non-finite "
                              f"values breaks every forward pass",
                        "restore an earlier step (or, when saving, find where training "
                        "diverged); pass check_finite=False to load it anyway",
                        kind=CheckpointError)


def _matches(patterns, path: str) -> bool:
    return any(re.fullmatch(p, path) for p in patterns)


def _check_fits_config(entries: dict, config: LoraConfig) -> None:
    """Without params: the adapter's paths, ranks, factor dtypes and scales must agree
    with the config."""
    scales = []
    for path, node in entries.items():
        if is_adalora(node):
            _check_adalora_shapes(path, node)
            node = lora_shaped(node)
        if is_lora(node):
            check_floating(path, node)
            if np.ndim(node.scale) == 0 and config.scale_from == "config":
                scales.append((path, node.scale, np.shape(node.a)[-1]))
            if not _matches(config.targets, path) or _matches(config.exclude, path):
                raise error(path, f"adapters hold LoraWeights here but the config does not "
                                  f"target this path (targets={config.targets!r})",
                            "save with the config the adapters were created with")
            if np.ndim(node.a) < 2 or np.ndim(node.a) != np.ndim(node.b) or \
                    np.shape(node.a)[-1] != np.shape(node.b)[-2]:
                raise error(path, f"a {tuple(np.shape(node.a))} and b {tuple(np.shape(node.b))} "
                                  f"do not form a low-rank pair (*stacked, in, r) / "
                                  f"(*stacked, r, out)",
                            "build adapters with lj.init")
            r = config.rank_for(path)
            if np.shape(node.a)[-1] != r:
                raise error(path, f"rank {np.shape(node.a)[-1]} in the adapters but the config "
                                  f"says {r}",
                            "save with the config the adapters were created with")
        elif not _matches(config.train, path):
            raise error(path, f"adapters hold an array here but the config does not train this "
                              f"path (train={config.train!r})",
                        "save with the config the adapters were created with")
    check_scales(scales, config)


def _check_adalora_shapes(path: str, node) -> None:
    want = (*np.shape(node.a)[:-2], np.shape(node.a)[-1]) if np.ndim(node.a) >= 2 else None
    if want is None or tuple(np.shape(node.e)) != want:
        raise error(path, f"AdaLoraWeights with a {tuple(np.shape(node.a))} and e "
                          f"{tuple(np.shape(node.e))}: e must be (*stacked, rank)",
                    "build adapters with lj.adalora_init")
    check_floating(path, node)


def adapter_arrays(adapters, config, params, check_finite: bool):
    """Returns (arrays item, entries record) for an adapter tree."""
    flat = flatten_adapters(adapters, adalora=True)[0]
    if params is not None:
        for path, node in flat:
            if is_adalora(node):
                _check_adalora_shapes(path, node)
        check_adapters(params, lora_shaped(adapters), config)
    entries = {p: n for p, n in flat if n is not None}
    if not entries:
        raise error("Checkpointer.save",
                    "adapters hold no LoraWeights and no trained arrays; there is nothing to save",
                    "pass the tree returned by lj.init (or restored by lj.restore)")
    if params is None:
        _check_fits_config(entries, config)
    arrays, order = {}, []
    for path, node in entries.items():
        kind = kind_of(node)
        if kind in FACTOR_KINDS:
            item = {f: _as_array(getattr(node, f)) for f in node._fields
                    if f != "scale" and getattr(node, f) is not None}
            item["scale"] = _as_array(jnp.asarray(node.scale, jnp.float32))
            arrays[path] = item
            order += [(path, f, item[f]) for f in fields({"kind": kind, **item})]
        else:
            arrays[path] = _as_array(node)
            order.append((path, "", arrays[path]))
    if check_finite:
        for path, f, x in order:
            check_finite_values(path, f, x, "in the adapter being saved")
    record: dict[str, dict[str, Any]] = {p: {"kind": kind_of(n)} for p, n in entries.items()}
    for (path, f, _), rec in zip(order, records([x for _, _, x in order]), strict=True):
        record[path][f or "array"] = rec
    return arrays, record


def state_arrays(opt_state, rng):
    arrays, record = {}, {}
    if opt_state is not None:
        flat = {path_str(p): _as_array(x)
                for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]}
        arrays["opt_state"] = flat
        record["opt_state"] = dict(zip(flat, records(list(flat.values())), strict=True))
    if rng is not None:
        rng = _as_array(rng)
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            impl, data = str(jax.random.key_impl(rng)), jax.random.key_data(rng)
        else:
            impl, data = None, rng
        arrays["rng"] = data
        record["rng"] = {"impl": impl, "array": array_record(data)}
    return arrays, record


def _version() -> str:
    try:
        return importlib_metadata.version("lora-jax")
    except importlib_metadata.PackageNotFoundError:   # a source tree on sys.path, not installed
        return "unknown"


def build_record(config, entries, state, fingerprint, metadata, step, *, run_id=None,
                 metrics=None) -> dict:
    cfg = config.to_dict()
    adalora = any(e.get("kind") == "adalora" for e in entries.values())
    rec = {"format": FORMAT, "format_version": FORMAT_VERSION if adalora else _PLAIN_VERSION,
           "lora_jax_version": _version(), "step": int(step), "run_id": run_id, "config": cfg,
           "config_sha256": sha256_json(cfg), "entries": entries, "state": state or None,
           "fingerprint": fingerprint, "metadata": metadata or {}, "metrics": metrics}
    rec["sha256"] = sha256_json(rec)
    return rec


def check_record(rec, where: str) -> Mapping:
    if not isinstance(rec, Mapping) or rec.get("format") != FORMAT:
        fmt = rec.get("format") if isinstance(rec, Mapping) else type(rec).__name__
        raise error(where, f"not a lora_jax adapter checkpoint (format {fmt!r})",
                    "point at a directory written by lj.save / lj.Checkpointer",
                    kind=CheckpointError)
    version = rec.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise error(where, f"checkpoint format version {version!r} is not supported; this "
                           f"lora_jax reads versions 1 to {FORMAT_VERSION} (the file was "
                           f"written by lora_jax {rec.get('lora_jax_version')!r})",
                    "upgrade lora_jax to read it", kind=CheckpointError)
    body = {k: v for k, v in rec.items() if k != "sha256"}
    if sha256_json(rec.get("config")) != rec.get("config_sha256"):
        raise error(where, "the stored LoraConfig does not match its sha256; the metadata file "
                           "was modified or corrupted",
                    "restore another step", kind=CheckpointError)
    if sha256_json(body) != rec.get("sha256"):
        raise error(where, "the checkpoint metadata does not match its sha256; the file was "
                           "modified or corrupted",
                    "restore another step", kind=CheckpointError)
    entries = rec.get("entries")
    bad = sorted(p for p, e in entries.items() if not isinstance(e, Mapping)
                 or e.get("kind") not in KIND_NAMES) if isinstance(entries, Mapping) else []
    if not isinstance(entries, Mapping) or bad:
        raise error(where, f"the checkpoint's entries {bad[:4] or ''} are not LoRA, AdaLoRA or "
                           f"trained-array entries",
                    "restore another step, or upgrade lora_jax if a newer one wrote it",
                    kind=CheckpointError)
    return rec


