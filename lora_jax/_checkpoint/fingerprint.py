"""Base fingerprints: which base weights an adapter was trained on.

An adapter is only meaningful on the base it was trained on, and a base of
the same architecture but different weights (another checkpoint, a merged
copy, a random init) has the same shapes, so shape checks pass silently.
A fingerprint records, for each targeted weight, its shape, dtype and the
content at a fixed set of sampled positions: a sha256 of the samples (for a
same-dtype comparison, exact) and a few of the sampled values (for a
comparison across dtypes, e.g. a float32 base fingerprint checked against a
bfloat16 copy, within that dtype's resolution). Reading a few hundred
elements per weight keeps it cheap for a 7B model: nothing is hashed in full
and nothing leaves the device but the samples.
"""

from __future__ import annotations

import hashlib
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core

from lora_jax._core.config import LoraConfig, LoraWarning
from lora_jax._core.errors import error, message
from lora_jax._core.leaf import is_container
from lora_jax._core.paths import leaves_with_paths, resolve
from lora_jax._variants.quantize import quantize_as

__all__ = ["base_fingerprint", "check_base", "BaseMismatchError", "FINGERPRINT_VERSION"]

FINGERPRINT_VERSION = 1
_N_HASHED = 256      # sampled elements per weight that go into the hash
_N_VALUES = 8        # of those, how many are stored as values (cross-dtype check)


class BaseMismatchError(ValueError):
    """The given base params are not the ones the adapter was trained on."""


def _positions(size: int) -> np.ndarray:
    """Fixed sampled flat positions for a weight of ``size`` elements.

    Depends on the size only, so the same weight in another layout of the
    tree (or another run) samples the same positions.
    """
    if size <= _N_HASHED:
        return np.arange(size, dtype=np.int64)
    rng = np.random.default_rng([0x10A5, size])
    idx = rng.choice(size, _N_HASHED - 2, replace=False)
    return np.unique(np.concatenate([[0, size - 1], idx]).astype(np.int64))


def _samples(leaf) -> np.ndarray:
    size = math.prod(leaf.shape)
    pos = _positions(size)
    if isinstance(leaf, jax.Array):
        # Gather on the device; only the samples come to the host.
        coords = np.unravel_index(pos, leaf.shape)
        return np.asarray(leaf[tuple(jnp.asarray(c) for c in coords)])
    return np.asarray(leaf).reshape(-1)[pos]


def _is_concrete(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax_core.Tracer)


def _leaf_record(leaf) -> dict:
    rec = {"shape": list(leaf.shape), "dtype": jnp.dtype(leaf.dtype).name}
    if is_container(leaf):
        # A quantized weight: its dequantized values, and how it is stored (so a
        # float base can be checked by quantizing it the same way).
        rec["storage"] = leaf.settings()
        if all(_is_concrete(x) for x in jax.tree.leaves(leaf)):
            leaf = leaf.dequantize()
        else:
            return rec
    if _is_concrete(leaf):
        s = np.ascontiguousarray(_samples(leaf))
        rec["sha256"] = hashlib.sha256(s.tobytes()).hexdigest()[:32]
        rec["values"] = [float(v) for v in s[:_N_VALUES].astype(np.float64)]
    return rec


def base_fingerprint(params, config: LoraConfig) -> dict:
    """A small JSON-ready record of the base weights ``config`` targets.

    For each targeted leaf: shape, dtype, a sha256 of the values at
    ``256`` fixed positions, and the first ``8`` of those values. Abstract
    leaves (``jax.ShapeDtypeStruct``) get shape and dtype only.

    Example:
      >>> import jax, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 64))}
      >>> fp = lj.base_fingerprint(params, lj.LoraConfig(rank=4, targets="w"))
      >>> fp["targets"]["w"]["shape"], len(fp["targets"]["w"]["sha256"])
      ([64, 64], 32)
    """
    resolved = resolve(params, config)
    leaves = dict(leaves_with_paths(params))
    return {"version": FINGERPRINT_VERSION,
            "targets": {p: _leaf_record(leaves[p]) for p in resolved.targets}}


def _resolution(*dtypes) -> float:
    return max(float(jnp.finfo(d).eps) for d in dtypes)


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values[:3]) + ", ...]"


def _compare(path: str, saved: dict, leaf) -> str | None:
    """Why ``leaf`` differs from its record, or None."""
    shape = list(leaf.shape)
    if shape != list(saved["shape"]):
        return f"{path}: shape {tuple(shape)}, the adapter's base had {tuple(saved['shape'])}"
    concrete = all(_is_concrete(x) for x in jax.tree.leaves(leaf))
    if "sha256" not in saved or not concrete:
        return None
    if "storage" in saved and not is_container(leaf):
        # trained on a quantized base, given the float weights: quantize them the same way
        leaf = quantize_as(saved["storage"], leaf)
    now = _leaf_record(leaf)
    if "storage" in now and "storage" not in saved:
        # trained on float weights, given a quantized copy: within its rounding
        a, b = np.asarray(now["values"]), np.asarray(saved["values"])
        if not np.allclose(a, b, rtol=0, atol=leaf.rounding_bound()):
            return (f"{path}: the quantized weight's values differ from the adapter's base "
                    f"beyond its {now['storage']['method']} rounding (e.g. "
                    f"{_fmt(now['values'])} vs {_fmt(saved['values'])})")
        return None
    if now["dtype"] == saved["dtype"]:
        if now["sha256"] != saved["sha256"]:
            return (f"{path}: sampled values differ (e.g. {_fmt(now['values'])} vs the "
                    f"adapter's base {_fmt(saved['values'])})")
        return None
    # Another dtype: compare the stored values within the coarser resolution.
    tol = 2 * _resolution(now["dtype"], saved["dtype"])
    a, b = np.asarray(now["values"]), np.asarray(saved["values"])
    if not np.allclose(a, b, rtol=tol, atol=tol * max(1e-6, float(np.max(np.abs(b)) or 1.0))):
        return (f"{path}: sampled values differ beyond {now['dtype']}/{saved['dtype']} "
                f"resolution (e.g. {_fmt(now['values'])} vs {_fmt(saved['values'])})")
    return None


def check_base(params, fingerprint: dict | None, *, on_mismatch: str = "error",
               what: str = "lj.check_base") -> list[str]:
    """Checks ``params`` against a fingerprint from `base_fingerprint`.

    Same dtype: the sampled values must be bit-identical. Another dtype (a
    bfloat16 copy of a float32 base): they must agree within the coarser
    dtype's resolution. A fingerprinted path missing from ``params`` counts
    as a mismatch.

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
      >>> import jax, lora_jax as lj
      >>> cfg = lj.LoraConfig(rank=4, targets="w")
      >>> base = {"w": jax.random.normal(jax.random.key(0), (64, 64))}
      >>> fp = lj.base_fingerprint(base, cfg)
      >>> lj.check_base(base, fp)
      []
      >>> other = {"w": jax.random.normal(jax.random.key(1), (64, 64))}
      >>> try:
      ...     lj.check_base(other, fp)
      ... except lj.BaseMismatchError as e:
      ...     print(str(e).splitlines()[0])
      lj.check_base: the adapter was trained on a different base than the params given:
    """
    if on_mismatch not in ("error", "warn", "ignore"):
        raise error("lj.check_base", f"on_mismatch={on_mismatch!r} is not a policy",
                    "use 'error', 'warn' or 'ignore'")
    if not fingerprint or on_mismatch == "ignore":
        return []
    version = fingerprint.get("version")
    if version != FINGERPRINT_VERSION:
        raise error(what, f"base fingerprint version {version!r} is not one this lora_jax "
                          f"reads ({FINGERPRINT_VERSION})",
                    "upgrade lora_jax, or pass on_mismatch='ignore' to skip the base check",
                    kind=BaseMismatchError)
    leaves = dict(leaves_with_paths(params))
    problems = []
    for path, rec in fingerprint.get("targets", {}).items():
        if path not in leaves:
            problems.append(f"{path}: not in the given params")
            continue
        why = _compare(path, rec, leaves[path])
        if why:
            problems.append(why)
    if problems:
        shown = "\n  ".join(problems[:6]) + (
            f"\n  ... ({len(problems) - 6} more)" if len(problems) > 6 else "")
        why = f"the adapter was trained on a different base than the params given:\n  {shown}"
        fix = ("pass the base params the adapter was trained on (not a merged or "
               "re-initialized copy); if you know the base is right, pass "
               "on_mismatch='warn' (or 'ignore'; on_base_mismatch= in lj.restore)")
        if on_mismatch == "error":
            raise error(what, why, fix, kind=BaseMismatchError)
        warnings.warn(message(what, why, fix), LoraWarning, stacklevel=3)
    return problems


def fingerprint_summary(fingerprint: dict | None) -> str:
    """One line per weight for reports: ``path  shape  dtype  sha256[:12]``."""
    if not fingerprint:
        return "base fingerprint: none (saved without params=)"
    lines = [f"base fingerprint (v{fingerprint.get('version')}, sampled):"]
    for path, rec in fingerprint.get("targets", {}).items():
        shape = "x".join(map(str, rec["shape"])) or "()"
        lines.append(f"  {path}  {shape}  {rec['dtype']}  {rec.get('sha256', '-')[:12]}")
    return "\n".join(lines)
