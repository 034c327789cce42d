"""Base fingerprints: which base weights an adapter was trained on.

An adapter is only meaningful on the base it was trained on, and a base of
the same architecture but different weights (another checkpoint, a merged
copy, a fine-tuned norm) has the same shapes, so shape checks pass silently.
A fingerprint records *every* leaf of the frozen base -- targeted kernels,
biases, norms, embeddings, untargeted weights alike -- with its shape, dtype
and a sha256 of its content:

* ``mode="sampled"`` (the default): for a leaf viewed as a matrix
  ``(rows, last axis)``, one element of every row and one of every column
  (spread with fixed strides), so a changed row or column of any weight
  changes the hash; leaves of up to 65,536 elements (biases, norm scales)
  are hashed whole. Gathered on the device; only the samples reach the
  host, so a 7B base costs a few million elements.
* ``mode="full"``: every byte of every leaf (certainty, at the cost of
  reading the whole base to the host once).

A few sampled values are kept too, for comparisons across dtypes (a
float32 base checked against its bfloat16 copy, within that dtype's
resolution). A quantized weight (`lj.quantize`) is recorded by its
dequantized values and how it is stored, so the float weights it was
quantized from are recognised (quantized the same way) as well as the
dequantized ones. Version 1 fingerprints (lora_jax 0.1: targeted weights
only, 256 random positions each) are still checked.
"""

from __future__ import annotations

import hashlib
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core
from jax.experimental import multihost_utils

from lora_jax._core.config import LoraConfig, LoraWarning
from lora_jax._core.errors import error, message
from lora_jax._core.leaf import is_container
from lora_jax._core.paths import leaves_with_paths, resolve
from lora_jax._variants.quantize import quantize_as

__all__ = ["base_fingerprint", "check_base", "BaseMismatchError", "FINGERPRINT_VERSION",
           "fingerprint_summary", "MODES"]

FINGERPRINT_VERSION = 2
MODES = ("sampled", "full")
_WHOLE = 1 << 16     # leaves this small are hashed whole in sampled mode
_N_VALUES = 8        # sampled values stored for cross-dtype comparisons
_V1_HASHED = 256     # version 1: sampled positions per targeted weight


class BaseMismatchError(ValueError):
    """The given base params are not the ones the adapter was trained on."""


# ----------------------------------------------------------------------------- positions


def _positions(shape) -> np.ndarray:
    """Flat positions covering every row and every column of ``shape`` as a matrix."""
    size = math.prod(shape)
    if size <= _WHOLE or len(shape) < 2:
        if size <= _WHOLE:
            return np.arange(size, dtype=np.int64)
        step = max(1, size // _WHOLE)                 # a long vector: a strided sample
        return np.unique(np.concatenate([np.arange(0, size, step), [size - 1]]))
    cols = int(shape[-1])
    rows = size // cols
    r = np.arange(rows, dtype=np.int64)
    c = np.arange(cols, dtype=np.int64)
    by_row = r * cols + (r * 7919 + 13) % cols        # one element of every row
    by_col = ((c * 104729 + 31) % rows) * cols + c    # one element of every column
    return np.unique(np.concatenate([by_row, by_col, [0, size - 1]]))


def _v1_positions(size: int) -> np.ndarray:
    if size <= _V1_HASHED:
        return np.arange(size, dtype=np.int64)
    rng = np.random.default_rng([0x10A5, size])
    idx = rng.choice(size, _V1_HASHED - 2, replace=False)
    return np.unique(np.concatenate([[0, size - 1], idx]).astype(np.int64))


def _take(leaf, pos: np.ndarray) -> np.ndarray:
    if isinstance(leaf, jax.Array):   # gather on the device; only the samples come back
        coords = np.unravel_index(pos, leaf.shape)
        return np.asarray(leaf[tuple(jnp.asarray(c) for c in coords)])
    return np.asarray(leaf).reshape(-1)[pos]


def _host(leaf) -> np.ndarray:
    """All of ``leaf`` on this host (gathered from every process in a multi-process run)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def _is_concrete(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax_core.Tracer)


def _concrete(leaf) -> bool:
    return all(_is_concrete(x) for x in jax.tree.leaves(leaf)) and bool(jax.tree.leaves(leaf))


# ----------------------------------------------------------------------------- records


def _content(leaf, mode: str, version: int = FINGERPRINT_VERSION) -> tuple[str, list]:
    """``(sha256, first values)`` of a dense leaf's fingerprinted content."""
    if mode == "full":
        data = np.ascontiguousarray(_host(leaf))
        digest = hashlib.sha256(data.reshape(-1).view(np.uint8).tobytes()).hexdigest()
        head = data.reshape(-1)[:_N_VALUES]
    else:
        pos = _v1_positions(math.prod(leaf.shape)) if version == 1 else _positions(leaf.shape)
        s = np.ascontiguousarray(_take(leaf, pos))
        digest = hashlib.sha256(s.tobytes()).hexdigest()[: 32 if version == 1 else 64]
        head = s[:_N_VALUES]
    return digest, [float(v) for v in np.asarray(head, np.float64)]


def _leaf_record(leaf, mode: str) -> dict:
    rec = {"shape": list(leaf.shape), "dtype": jnp.dtype(leaf.dtype).name}
    if is_container(leaf):
        rec["storage"] = leaf.settings()
        if not _concrete(leaf):
            return rec
        leaf = leaf.dequantize()
    if _concrete(leaf):
        rec["sha256"], rec["values"] = _content(leaf, mode)
    return rec


def base_fingerprint(params, config: LoraConfig | None, *, mode: str = "sampled"
                     ) -> dict:
    """A JSON-ready record of the whole frozen base ``params``.

    Every array leaf (and quantized weight) gets its shape, dtype and a
    sha256 of its content -- sampled so that every row and every column of
    every weight is read (leaves of up to 65,536 elements whole), or, with
    ``mode="full"``, every byte. Abstract leaves (``jax.ShapeDtypeStruct``)
    get shape and dtype only.

    Args:
      params: the base params (arrays, quantized containers, or abstract).
      config: the adapters' config, whose targets are listed in the record (for
        reports), or ``None``.
      mode: ``"sampled"`` or ``"full"``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 64)), "norm": jnp.ones(64)}
      >>> fp = lj.base_fingerprint(params, lj.LoraConfig(rank=4, targets="w"))
      >>> sorted(fp["leaves"]), fp["targets"], fp["mode"]
      (['norm', 'w'], ['w'], 'sampled')
    """
    if mode not in MODES:
        raise error("lj.base_fingerprint", f"mode={mode!r} is not one of {MODES}",
                    "use mode='sampled' (the default) or mode='full' (every byte)")
    targets = list(resolve(params, config).targets) if config is not None else []
    leaves = {p: _leaf_record(x, mode) for p, x in leaves_with_paths(params)
              if hasattr(x, "shape") and hasattr(x, "dtype")}
    return {"version": FINGERPRINT_VERSION, "mode": mode, "leaves": leaves,
            "targets": targets}


# ----------------------------------------------------------------------------- checking


def _resolution(*dtypes) -> float:
    return max(float(jnp.finfo(d).eps) for d in dtypes)


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values[:3]) + ", ...]"


def _same_content(saved: dict, leaf, mode: str, version: int) -> bool:
    digest, _ = _content(leaf, mode, version)
    return digest == saved["sha256"]


def _compare(path: str, saved: dict, leaf, mode: str, version: int) -> str | None:
    """Why ``leaf`` differs from its record, or None."""
    if list(leaf.shape) != list(saved["shape"]):
        return f"{path}: shape {tuple(leaf.shape)}, the adapter's base had {tuple(saved['shape'])}"
    if "sha256" not in saved or not _concrete(leaf):
        return None
    dense = leaf.dequantize() if is_container(leaf) else leaf
    dtype = jnp.dtype(leaf.dtype).name
    if dtype == saved["dtype"] and _same_content(saved, dense, mode, version):
        return None
    if "storage" in saved and not is_container(leaf):
        # trained on a quantized base, given the float weights it came from
        requant = quantize_as(saved["storage"], leaf).dequantize()
        if _same_content(saved, requant, mode, version):
            return None
    _, values = _content(dense, mode, version)
    if is_container(leaf) and "storage" not in saved:
        # trained on float weights, given a quantized copy: within its rounding
        if np.allclose(values, saved["values"], rtol=0, atol=leaf.rounding_bound()):
            return None
        return (f"{path}: the quantized weight's values differ from the adapter's base beyond "
                f"its {leaf.method} rounding (e.g. {_fmt(values)} vs {_fmt(saved['values'])})")
    if dtype != saved["dtype"] and "storage" not in saved:
        tol = 2 * _resolution(dtype, saved["dtype"])
        scale = max(1e-6, float(np.max(np.abs(saved["values"]))) if saved["values"] else 1.0)
        if np.allclose(values, saved["values"], rtol=tol, atol=tol * scale):
            return None
        return (f"{path}: sampled values differ beyond {dtype}/{saved['dtype']} resolution "
                f"(e.g. {_fmt(values)} vs {_fmt(saved['values'])})")
    what = "content" if mode == "full" else "sampled values"
    return f"{path}: {what} differ (e.g. {_fmt(values)} vs the adapter's base " \
           f"{_fmt(saved['values'])})"


def _records(fingerprint: dict, where: str) -> tuple[dict, str, int]:
    version = fingerprint.get("version")
    if version == 1:
        return fingerprint.get("targets", {}), "sampled", 1
    if version == FINGERPRINT_VERSION:
        return fingerprint.get("leaves", {}), fingerprint.get("mode", "sampled"), 2
    raise error(where, f"base fingerprint version {version!r} is not one this lora_jax reads "
                       f"(1 and {FINGERPRINT_VERSION})",
                "upgrade lora_jax, or pass on_mismatch='ignore' to skip the base check",
                kind=BaseMismatchError)


def check_base(params, fingerprint: dict | None, *, on_mismatch: str = "error",
               what: str = "lj.check_base") -> list[str]:
    """Checks ``params`` against a fingerprint from `base_fingerprint`.

    Every fingerprinted leaf must be in ``params`` with the same shape and
    content (same dtype: identical hash; another dtype, e.g. a bfloat16 copy
    of a float32 base: the sampled values within the coarser resolution; a
    quantized weight: see the module doc), and ``params`` must hold no array
    leaf the fingerprinted base did not have.

    Args:
      params: the base params to check.
      fingerprint: the record, or None (nothing to check).
      on_mismatch: ``"error"`` (raise `BaseMismatchError`), ``"warn"`` (a
        `LoraWarning`) or ``"ignore"``.
      what: where messages say the adapter is (`lj.restore` passes the step's
        directory); by default ``lj.check_base``.

    Returns:
      The list of differences (empty when the base matches).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> base = {"w": jax.random.normal(jax.random.key(0), (64, 64)), "norm": jnp.ones(64)}
      >>> fp = lj.base_fingerprint(base, None)
      >>> lj.check_base(base, fp)
      []
      >>> tweaked = {"w": base["w"], "norm": base["norm"].at[3].set(1.5)}
      >>> lj.check_base(tweaked, fp, on_mismatch="ignore") == []      # not checked
      True
      >>> try:
      ...     lj.check_base(tweaked, fp)
      ... except lj.BaseMismatchError as e:
      ...     print(str(e).splitlines()[1].strip()[:40])
      norm: sampled values differ (e.g. [1, 1,
    """
    if on_mismatch not in ("error", "warn", "ignore"):
        raise error("lj.check_base", f"on_mismatch={on_mismatch!r} is not a policy",
                    "use 'error', 'warn' or 'ignore'")
    if not fingerprint or on_mismatch == "ignore":
        return []
    saved, mode, version = _records(fingerprint, what)
    leaves = {p: x for p, x in leaves_with_paths(params)
              if hasattr(x, "shape") and hasattr(x, "dtype")}
    problems = [f"{p}: not in the given params" for p in saved if p not in leaves]
    for path, rec in saved.items():
        if path in leaves:
            why = _compare(path, rec, leaves[path], mode, version)
            if why:
                problems.append(why)
    if version >= 2:
        problems += [f"{p}: in the given params, not in the adapter's base"
                     for p in leaves if p not in saved]
    if problems:
        shown = "\n  ".join(problems[:6]) + (
            f"\n  ... ({len(problems) - 6} more)" if len(problems) > 6 else "")
        why = f"the adapter was trained on a different base than the params given:\n  {shown}"
        fix = ("pass the base params the adapter was trained on (not a merged, fine-tuned or "
               "re-initialized copy); if you know the base is right, pass on_mismatch='warn' "
               "(or 'ignore'; on_base_mismatch= in lj.restore)")
        if on_mismatch == "error":
            raise error(what, why, fix, kind=BaseMismatchError)
        warnings.warn(message(what, why, fix), LoraWarning, stacklevel=3)
    return problems


def fingerprint_summary(fingerprint: dict | None) -> str:
    """One line per weight for reports: ``path  shape  dtype  sha256[:12]``."""
    if not fingerprint:
        return "base fingerprint: none (saved without params=)"
    saved, mode, version = _records(fingerprint, "fingerprint")
    targets = set(fingerprint.get("targets") or (saved if version == 1 else ()))
    lines = [f"base fingerprint (v{version}, {mode}, {len(saved)} leaves):"]
    for path, rec in saved.items():
        shape = "x".join(map(str, rec["shape"])) or "()"
        mark = " (adapted)" if path in targets else ""
        storage = f" {rec['storage']['method']}" if "storage" in rec else ""
        lines.append(f"  {path}  {shape}  {rec['dtype']}{storage}  "
                     f"{rec.get('sha256', '-')[:12]}{mark}")
    return "\n".join(lines)
