"""LoftQ: a quantized base and LoRA factors fitted to what the quantization loses.

QLoRA starts from ``deq(Q) + scale * a @ b`` with ``Q = quantize(W)`` and
``b = 0``, so the model it trains begins with NF4's (or int8's) whole error.
LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization") fits
the factors to that error instead, alternating ``iters`` times

    Q = quantize(W - scale * a @ b)      (the first round: quantize(W))
    a, b = best rank-r factors of (W - deq(Q)) / scale

so that ``deq(Q) + scale * a @ b`` is closer to W than ``deq(Q)`` alone.
The quantizer is the base's own (`lj.quantize`'s NF4 or int8, with the
settings of the containers it made: method, block size, stacked layers,
int8's channels), applied per stacked layer as `lj.quantize` does, to the
weight in its own axis order. The SVD runs on the host in float64 (numpy),
on each ``(*stacked, in, out)`` matrix as the config's layouts give it; the
singular values are split evenly, ``a = U_r sqrt(S_r / scale)``,
``b = sqrt(S_r / scale) V_r^T``, so ``scale * a @ b = U_r S_r V_r^T`` for
any alpha and with rsLoRA. (PEFT's ``loftq_init`` stores ``U_r sqrt(S_r)``
without the scale, so its start is off unless ``lora_alpha = r``.)

`lj.init` with ``LoraConfig(init="loftq")`` runs this per target;
`loftq_report` measures, per layer, how far the result is from W next to
plain quantization.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import core as jax_core

from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.leaf import as_matrix, from_matrix, is_container
from lora_jax._core.paths import LeafSpec, leaves_with_paths, mirror
from lora_jax._core.weights import check_adapters

__all__ = ["loftq_factors", "loftq_report", "LoftqError"]

_HOW = ("q, adapters = lj.init(params, config, return_params=True, "
        "quantized=lj.quantize(params, config=config)) with the float params")


def _host_matrix(x, spec: LeafSpec) -> np.ndarray:
    """A weight-shaped float array as its float64 ``(*stacked, in, out)`` matrix."""
    return np.asarray(as_matrix(jnp.asarray(x, jnp.float32), spec), np.float64)


def _weight(path: str, leaf, spec: LeafSpec, where: str) -> np.ndarray:
    """The float weight W that LoftQ approximates, refusing what has lost it."""
    if is_container(leaf):
        raise error(
            path, f"{where} needs the float weight W, but params hold it quantized "
            f"({leaf!r}): the quantization has already lost what LoftQ fits",
            f"pass the float params and the quantized ones apart: {_HOW}")
    if isinstance(leaf, jax_core.Tracer):
        raise error(
            path, f"{where} computes its SVDs on the host (numpy, float64), so it can't run "
            f"inside jax.jit or another transformation",
            "call it outside jit, once, before training")
    return _host_matrix(leaf, spec)


def _container(path: str, leaf, like, what: str):
    """The quantized container that states how ``path`` is stored, checked against W."""
    if not is_container(like):
        held = (f"a {jnp.dtype(like.dtype).name} array {tuple(np.shape(like))}"
                if hasattr(like, "dtype") else f"a {type(like).__name__}")
        raise error(
            path, f"LoftQ quantizes each target, but {what} holds {held} here, not a "
            f"quantized weight, so it doesn't say how",
            f"quantize every target: lj.quantize(params, targets=..., config=config) with "
            f"the same targets as the config, or exclude the path from the config, e.g. "
            f"exclude=r'{re.escape(path)}'")
    shape, dtype = tuple(np.shape(leaf)), jnp.dtype(leaf.dtype)
    if tuple(like.shape) != shape or jnp.dtype(like.dtype) != dtype:
        raise error(
            path, f"{what} holds {like!r} but the float weight is {shape} {dtype.name}",
            f"quantize these same params: {_HOW}")
    return like


def loftq_factors(path: str, leaf, like, spec: LeafSpec, *, iters: int, dtype):
    """LoftQ for one target: ``(Q, a, b)`` with ``deq(Q) + scale * a @ b ≈ W``.

    ``leaf`` is the float weight W, ``like`` the container of `lj.quantize`
    that says how to store it (only its settings are read: ``Q`` is a new
    container of the same kind), ``spec`` the leaf's `LeafSpec` (layout,
    rank, scale). ``a``, ``b`` come back in ``dtype``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> w = jax.random.normal(jax.random.key(0), (64, 32))
      >>> cfg = lj.LoraConfig(rank=4, targets="w", init="loftq")
      >>> spec = lj.describe({"w": w}, cfg).specs["w"]
      >>> like = lj.quantize({"w": w}, targets="w")["w"]
      >>> q, a, b = loftq_factors("w", w, like, spec, iters=1, dtype=jnp.float32)
      >>> q, a.shape, b.shape
      (NF4Weight(shape=(64, 32), dtype=float32, block_size=64), (64, 4), (4, 32))
    """
    w = _weight(path, leaf, spec, "LoftQ (init='loftq')")
    like = _container(path, leaf, like, "quantized=")
    r, s = spec.rank, float(spec.scale)
    lowrank = np.zeros_like(w)
    q = like
    a = b = np.zeros((0,))
    for _ in range(iters):
        target = from_matrix(jnp.asarray((w - lowrank).astype(np.float32)), spec)
        q = like.requantize(target)
        u, sv, vt = np.linalg.svd(w - _host_matrix(q.dequantize(dtype=jnp.float32), spec),
                                  full_matrices=False)
        root = np.sqrt(sv[..., :r] / s)
        a = u[..., :, :r] * root[..., None, :]
        b = root[..., :, None] * vt[..., :r, :]
        lowrank = s * np.matmul(a, b)
    return q, jnp.asarray(a.astype(np.float32)).astype(dtype), \
        jnp.asarray(b.astype(np.float32)).astype(dtype)


class LoftqError(NamedTuple):
    """Relative reconstruction errors of one weight, ``||W - W'||_F / ||W||_F``.

    Each is a float64 array of the weight's stacked shape: one value per
    stacked layer (a 0-d array for an unstacked weight; ``float()`` reads it).

    Attributes:
      plain: ``W' = deq(quantize(W))``, QLoRA's start (the same quantization
        settings as the base).
      loftq: ``W' = deq(Q) + scale * a @ b``, the base and adapters given.
    """

    plain: np.ndarray
    loftq: np.ndarray


def _rel(diff: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.linalg.norm(diff, axis=(-2, -1)) / np.maximum(np.linalg.norm(w, axis=(-2, -1)),
                                                            np.finfo(np.float64).tiny)


def loftq_report(params, quantized, adapters, config: LoraConfig) -> dict:
    """Per layer, how far a quantized base plus adapters is from the float weights,
    next to plain quantization (what LoftQ gains over QLoRA's start).

    For each target, ``plain = ||W - deq(quantize(W))||_F / ||W||_F`` (``W``
    quantized with the base's own settings) and
    ``loftq = ||W - deq(Q) - scale * a @ b||_F / ||W||_F``, both in float64
    per ``(in, out)`` matrix as the config's layouts give it (DoRA's
    magnitude is left out: at init it rescales nothing). Meant for what
    ``lj.init(..., init="loftq")`` returned; with a plain QLoRA start
    (``b = 0``) both errors are the same.

    Args:
      params: the float params (W).
      quantized: the quantized base (``Q``), mirroring ``params``.
      adapters: the adapters for ``quantized``.
      config: their `LoraConfig`.

    Returns:
      ``{path: LoftqError(plain, loftq)}`` for every target.

    Raises:
      ValueError: ``quantized`` or ``adapters`` does not mirror ``params``; a
        target of ``params`` is quantized or one of ``quantized`` is not, or
        their shapes or dtypes differ; every error of `lj.describe`.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (128, 64))}
      >>> cfg = lj.LoraConfig(rank=8, targets="w", init="loftq", loftq_iters=2)
      >>> q, ad = lj.init(params, cfg, return_params=True,
      ...                 quantized=lj.quantize(params, config=cfg, targets="w"))
      >>> e = lj.loftq_report(params, q, ad, cfg)["w"]
      >>> print(f"NF4 {float(e.plain):.3f}, LoftQ {float(e.loftq):.3f}")
      NF4 0.090, LoftQ 0.070
    """
    if not isinstance(config, LoraConfig):
        raise error("lj.loftq_report", f"config must be a lj.LoraConfig, got "
                    f"{type(config).__name__}", "pass the config of the adapters",
                    kind=TypeError)
    mirror(params, quantized, what="quantized", against="params",
           fix="pass the base lj.init returned for these params")
    weights = dict(leaves_with_paths(params))
    out = {}
    for path, stored, node, spec in check_adapters(quantized, adapters, config):
        if spec is None:
            continue
        leaf = weights[path]
        w = _weight(path, leaf, spec, "lj.loftq_report")
        q = _container(path, leaf, stored, "quantized")
        plain = _host_matrix(q.requantize(jnp.asarray(leaf)).dequantize(dtype=jnp.float32), spec)
        base = _host_matrix(q.dequantize(dtype=jnp.float32), spec)
        lowrank = np.asarray(node.scale, np.float64) * np.matmul(
            np.asarray(jnp.asarray(node.a, jnp.float32), np.float64),
            np.asarray(jnp.asarray(node.b, jnp.float32), np.float64))
        out[path] = LoftqError(_rel(w - plain, w), _rel(w - base - lowrank, w))
    return out
