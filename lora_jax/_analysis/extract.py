"""`extract`: LoRA adapters from a full fine-tune, by truncated SVD of ``tuned - base``.

Each targeted leaf's ``dW`` is factored at the config's rank by an exact SVD,
or for large matrices a randomized one (a range finder with power steps),
and reported through `Analysis`.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._analysis.spectrum import Analysis, Spectrum, as_float64
from lora_jax._core.config import LoraConfig, LoraWarning
from lora_jax._core.errors import error, message
from lora_jax._core.leaf import as_matrix, dense_float32
from lora_jax._core.paths import leaves_with_paths, mirror, resolve, unflatten_params
from lora_jax._core.weights import LoraWeights
from lora_jax._init import leaf_key

__all__ = ["Extraction", "extract"]

_HI = jax.lax.Precision.HIGHEST

# `extract(svd="auto")` switches to the randomized SVD above this min(in, out).
_EXACT_SVD_MAX = 1024


def _randomized_svd(m, key, *, k: int, oversample: int, power_iters: int):
    """Top-``k + oversample`` SVD of ``m`` (in, out) by a randomized range finder
    (Halko, Martinsson & Tropp 2011, Alg. 4.4 with QR between power steps)."""
    n_in, n_out = m.shape
    n_probes = min(k + oversample, n_in, n_out)
    omega = jax.random.normal(key, (n_out, n_probes), jnp.float32)
    q, _ = jnp.linalg.qr(jnp.matmul(m, omega, precision=_HI))
    for _ in range(power_iters):
        z, _ = jnp.linalg.qr(jnp.matmul(m.T, q, precision=_HI))
        q, _ = jnp.linalg.qr(jnp.matmul(m, z, precision=_HI))
    u, s, vt = jnp.linalg.svd(jnp.matmul(q.T, m, precision=_HI), full_matrices=False)
    return jnp.matmul(q, u, precision=_HI), s, vt


@partial(jax.jit, static_argnames=("n_in", "n_out", "k", "randomized", "oversample",
                                   "power_iters", "dtype"))
def _extract_leaf(w, t, key, scale, *, n_in, n_out, k, randomized, oversample,
                  power_iters, dtype):
    """Factors, singular values, errors and norms of one leaf, layer by layer
    (``lax.map`` keeps one layer's SVD workspace in memory at a time)."""
    w32 = w.astype(jnp.float32).reshape(-1, n_in, n_out)
    dw = t.astype(jnp.float32).reshape(-1, n_in, n_out) - w32
    keys = jax.random.split(key, dw.shape[0])

    def one(args):
        m, key = args
        if randomized:
            u, s, vt = _randomized_svd(m, key, k=k, oversample=oversample,
                                       power_iters=power_iters)
        else:
            u, s, vt = jnp.linalg.svd(m, full_matrices=False)
        root = jnp.sqrt(s[:k] / scale)
        a = (u[:, :k] * root[None, :]).astype(dtype)
        b = (root[:, None] * vt[:k]).astype(dtype)
        approx = scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                                    precision=_HI)
        norm = jnp.linalg.norm(m)
        err = jnp.linalg.norm(m - approx) / jnp.where(norm > 0, norm, 1.0)
        return a, b, s, err, norm

    a, b, s, err, norm = jax.lax.map(one, (dw, keys))
    return a, b, s, err, norm, jnp.linalg.norm(w32.reshape(w32.shape[0], -1), axis=-1)


class Extraction(NamedTuple):
    """What `extract` returns: ``adapters, report = lj.extract(...)``."""

    adapters: Any
    report: Analysis


def extract(base_params, tuned_params, config: LoraConfig, *, svd: str = "auto",
            key=None, oversample: int = 10, power_iters: int = 2) -> Extraction:
    """LoRA adapters approximating a full fine-tune, by truncated SVD.

    For each leaf ``config`` targets, ``dW = tuned - base`` (float32, as an
    ``(in, out)`` matrix per stacked layer) is replaced by its best rank-r
    approximation, ``r = config.rank_for(path)``, factored as
    ``a = U sqrt(S / scale)``, ``b = sqrt(S / scale) V^T`` with
    ``scale = config.scale_for(path)``, in ``config.dtype``. So
    ``lj.merge(base_params, adapters, config)`` approximates ``tuned_params``.
    Leaves named by ``config.train`` hold their tuned values; leaves that
    changed but are neither targeted nor trained are lost, with a
    `LoraWarning` naming them.

    Args:
      base_params: the weights before fine-tuning.
      tuned_params: the fully fine-tuned weights (same structure and shapes).
      config: which leaves to factor, and at which rank and scale.
      svd: ``"exact"`` (full SVD), ``"randomized"`` (randomized range finder:
        ``rank + oversample`` random probes, ``power_iters`` power steps), or
        ``"auto"``: exact up to ``min(in, out) = 1024``, randomized above.
      key: PRNG key for the randomized SVD (keyword-only; each leaf's key is
        derived from its path); ``None`` means ``jax.random.key(0)``.
      oversample: extra probes of the randomized SVD.
      power_iters: power iterations of the randomized SVD.

    Returns:
      ``Extraction(adapters, report)``; the report (an `Analysis`) has per
      layer the singular values found (all of them for the exact SVD, the
      leading ``rank + oversample`` otherwise), ``||dW|| / ||W||``, the rank
      kept and the measured relative error ``||dW - s a b||_F / ||dW||_F``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> base = {"w": jax.random.normal(k1, (32, 24))}
      >>> dw = jax.random.normal(k2, (32, 3)) @ jax.random.normal(k3, (3, 24))  # rank 3
      >>> tuned = {"w": base["w"] + dw}
      >>> cfg = lj.LoraConfig(rank=3, alpha=3, targets="w")
      >>> adapters, report = lj.extract(base, tuned, cfg)
      >>> report.spectra[0].error < 1e-5
      True
      >>> bool(jnp.allclose(lj.merge(base, adapters, cfg)["w"], tuned["w"], atol=1e-4))
      True
    """
    if svd not in ("auto", "exact", "randomized"):
        raise error("lj.extract", f"svd={svd!r} is not a known SVD",
                    "use svd='auto', 'exact' or 'randomized'")
    for name, v, lo, default in (("oversample", oversample, 0, 10),
                                 ("power_iters", power_iters, 0, 2)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise error("lj.extract", f"{name}={v!r} must be an int >= {lo}",
                        f"e.g. {name}={default} (the default)")
    key = jax.random.key(0) if key is None else key
    resolved = resolve(base_params, config)
    train = set(resolved.train)

    base_items = leaves_with_paths(base_params)
    tuned_leaves = mirror(base_params, tuned_params, what="tuned_params", against="base_params",
                          fix="pass the same model's parameters before and after fine-tuning.")

    rows, nodes, untargeted = [], [], []
    for (path, w), t in zip(base_items, tuned_leaves, strict=True):
        if np.shape(w) != np.shape(t):
            raise error(
                path, f"base has shape {tuple(np.shape(w))}, tuned has {tuple(np.shape(t))}",
                "pass the same model's parameters before and after fine-tuning")
        spec = resolved.targets.get(path)
        if spec is None:
            if path in train:
                nodes.append(jnp.array(t, copy=True))
            else:
                nodes.append(None)
                if hasattr(w, "shape") and not np.array_equal(np.asarray(dense_float32(w)),
                                                              np.asarray(dense_float32(t))):
                    untargeted.append(path)
            continue
        lead, (n_in, n_out), k = spec.stacked_shape, (spec.in_size, spec.out_size), spec.rank
        randomized = svd == "randomized" or (svd == "auto" and min(n_in, n_out) > _EXACT_SVD_MAX)
        a, b, sv, err, norm, wn = _extract_leaf(
            as_matrix(dense_float32(w), spec), as_matrix(dense_float32(t), spec),
            leaf_key(key, path), jnp.float32(spec.scale),
            n_in=n_in, n_out=n_out, k=k, randomized=randomized, oversample=oversample,
            power_iters=power_iters, dtype=config.dtype)
        sv, err, norm, wn = as_float64(sv), as_float64(err), as_float64(norm), as_float64(wn)
        for i in range(sv.shape[0]):
            tail = max(norm[i] ** 2 - float(np.sum(sv[i] ** 2)), 0.0) if randomized else 0.0
            layer = tuple(int(j) for j in np.unravel_index(i, lead)) if lead else ()
            rows.append(Spectrum(path, layer, (n_in, n_out), sv[i], tail_energy=tail,
                                 base_norm=float(wn[i]), rank_kept=k, error=float(err[i])))
        a, b = a.reshape(spec.a_shape), b.reshape(spec.b_shape)
        nodes.append(LoraWeights(a, b, jnp.asarray(spec.scale, jnp.float32)))

    if untargeted:
        warnings.warn(message(
            "lj.extract", f"{len(untargeted)} leaves differ between base and tuned but the "
            f"config neither targets nor trains them, so the adapters drop their change: "
            f"{untargeted[:8]}{' ...' if len(untargeted) > 8 else ''}",
            "add them to LoraConfig.targets (matrices) or LoraConfig.train (biases, norms)"),
            LoraWarning, stacklevel=2)
    return Extraction(unflatten_params(base_params, nodes), Analysis(tuple(rows)))
