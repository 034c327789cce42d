"""Creating adapters: `init`, and `subtract_init` for PiSSA/OLoRA exports.

Each leaf's PRNG key is derived from the root key and the leaf's path, so
adding or removing a target never changes the initial values of the others.

PiSSA and OLoRA compute A and B from W and move ``scale * a @ b`` out of
the base (``W_res = W - scale * a @ b``), so training starts from the same
model with the principal (PiSSA) or QR (OLoRA) directions trainable; they
follow PEFT's formulas, in lora_jax's ``(in, r)``/``(r, out)`` layout:

* PiSSA: ``W = U S V^T``; ``a = U_r sqrt(S_r / s)``, ``b = sqrt(S_r / s) V_r^T``.
* OLoRA: ``W^T = Q R`` (PEFT's ``qr`` of the torch ``(out, in)`` weight);
  ``a = R_r^T``, ``b = Q_r^T``.

LoftQ replaces each target by a quantization ``Q`` and fits ``scale * a @ b``
to ``W - deq(Q)``, alternating the two (`lora_jax._variants.loftq`).
"""


from __future__ import annotations

import math
import re
import zlib

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax._core.config import INITS, LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.leaf import as_matrix, dense_float32, from_matrix, is_container
from lora_jax._core.paths import LeafSpec, flatten_params, mirror, path_str, resolve
from lora_jax._core.weights import LoraWeights, delta, flatten_adapters, scale_array
from lora_jax._variants import dora as _dora
from lora_jax._variants.loftq import loftq_factors

__all__ = ["init", "leaf_key", "subtract_init"]

RESIDUAL_INITS = ("pissa", "olora")


def leaf_key(key, path: str):
    """The PRNG key of the leaf at ``path``: ``fold_in(key, crc32(path))``.

    Example:
      >>> import jax
      >>> k = jax.random.key(0)
      >>> bool((jax.random.key_data(leaf_key(k, "a/kernel"))
      ...       == jax.random.key_data(leaf_key(k, "a/kernel"))).all())
      True
    """
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _init_a(key, spec: LeafSpec, config: LoraConfig):
    if config.init == "kaiming":
        # PEFT: kaiming_uniform_(a=sqrt(5)) on the (rank, in) weight, i.e.
        # U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(spec.in_size)
        return jax.random.uniform(key, spec.a_shape, jnp.float32, -bound, bound
                                  ).astype(config.dtype)
    if config.init == "gaussian":
        init_std = 1.0 / spec.rank  # PEFT's "gaussian": std 1/r
        return (init_std * jax.random.normal(key, spec.a_shape, jnp.float32)
                ).astype(config.dtype)
    # LoraConfig accepts only INITS, and the computed ones (PiSSA, OLoRA, LoftQ) never get here.
    raise error("lj.init", f"LoraConfig.init={config.init!r} is not handled by lj.init "
                f"(LoraConfig accepts {INITS}, so this is a bug in lora_jax)",
                "none on your side; please report it to lora_jax")


def _factorize(w32, spec: LeafSpec, config: LoraConfig):
    """PiSSA / OLoRA factors of the float32 matrix ``w32`` (*stacked, in, out)."""
    r, s = spec.rank, spec.scale
    hi = lax.Precision.HIGHEST
    if config.init == "pissa":
        u, sv, vt = jnp.linalg.svd(w32, full_matrices=False)
        root = jnp.sqrt(sv[..., :r] / s)
        a = u[..., :, :r] * root[..., None, :]
        b = root[..., :, None] * vt[..., :r, :]
    else:  # olora, as PEFT: qr of the torch (out, in) weight
        q, rr = jnp.linalg.qr(jnp.swapaxes(w32, -1, -2))
        a = jnp.swapaxes(rr[..., :r, :], -1, -2)
        b = jnp.swapaxes(q[..., :, :r], -1, -2)
    residual = w32 - s * jnp.matmul(a, b, precision=hi)
    return a, b, residual


def _check_init_args(config: LoraConfig, key, return_params: bool, quantized) -> None:
    """`init`'s arguments agree with the config's init (rule 16: nothing is ignored)."""
    residual_init = config.init in RESIDUAL_INITS
    loftq = config.init == "loftq"
    if (residual_init or loftq) and not return_params:
        what = ("replaces the base weights by their LoftQ quantization" if loftq else
                "subtracts scale * a @ b from the base weights")
        raise error(
            "lj.init", f"init={config.init!r} {what}, so the adapters only fit the new base",
            "params, adapters = lj.init(params, config, return_params=True"
            + (", quantized=...)" if loftq else ")") + ", and train with those params")
    if loftq and quantized is None:
        raise error(
            "lj.init", "init='loftq' quantizes the base, and quantized= says how (method, "
            "block size, stacked layers): it is missing",
            "q, adapters = lj.init(params, config, return_params=True, "
            "quantized=lj.quantize(params, config=config)), params being the float weights")
    if not loftq and quantized is not None:
        raise error(
            "lj.init", f"quantized= is read by init='loftq' only, but init={config.init!r}; "
            f"passing it would change nothing",
            "for QLoRA pass the quantized base as params, lj.init(lj.quantize(params), "
            "config, key=...); for LoftQ use LoraConfig(init='loftq')")
    if not (residual_init or loftq) and key is None:
        raise error("lj.init", f"init={config.init!r} draws A at random and needs a PRNG key",
                    "lj.init(params, config, key=jax.random.key(0))")


def _factors(path: str, leaf, like, spec: LeafSpec, config: LoraConfig, key):
    """``(base, a, b)`` of one target: its (new) base leaf and the initial factors."""
    if config.init == "loftq":
        return loftq_factors(path, leaf, like, spec, iters=config.loftq_iters,
                             dtype=config.dtype)
    if config.init in RESIDUAL_INITS:
        w32 = as_matrix(dense_float32(leaf), spec)
        a, b, res = _factorize(w32, spec, config)
        res = from_matrix(res, spec)
        base = leaf.requantize(res) if is_container(leaf) else res.astype(leaf.dtype)
        return base, a.astype(config.dtype), b.astype(config.dtype)
    a = _init_a(leaf_key(key, path), spec, config)
    return like, a, jnp.zeros(spec.b_shape, config.dtype)


def init(params, config: LoraConfig, *, key=None, return_params: bool = False,
         quantized=None):
    """Creates the adapter tree for ``params``.

    The result mirrors ``params``: ``LoraWeights(a, b, scale)`` at each
    targeted leaf (``a: (*stacked, in, rank)``, ``b: (*stacked, rank, out)``),
    a copy of the leaf at each ``config.train`` leaf, and ``None`` elsewhere.
    With ``config.init`` ``"kaiming"`` or ``"gaussian"``, A is random and B
    is zero, so the model starts unchanged. ``"pissa"`` and ``"olora"``
    compute both from W and subtract ``scale * a @ b`` from the base, so
    they need ``return_params=True`` and the returned base. With
    ``config.use_dora``, each `LoraWeights` also gets ``m``, the column
    norms of (the new) ``W + scale * a @ b``, so the model starts unchanged.

    Quantized weights (`lj.quantize`) are read dequantized; a PiSSA/OLoRA
    residual is quantized again with the same settings (QLoRA + PiSSA).

    ``"loftq"`` (LoftQ) reads the float weights W from ``params`` and how to
    quantize each target from ``quantized`` (`lj.quantize` of those params:
    its method, block size, stacked layers). It alternates
    ``config.loftq_iters`` times ``Q = quantize(W - scale * a @ b)`` and
    ``a, b = `` the best rank-r factors of ``(W - deq(Q)) / scale`` (float64
    SVD on the host, so not under ``jit``), and returns ``quantized`` with
    each target replaced by its ``Q``: ``deq(Q) + scale * a @ b`` is closer to
    W than plain quantization (`lj.loftq_report` shows by how much, per layer).

    Args:
      params: the model's parameters (any pytree of arrays; only shapes and
        dtypes are read for random inits without DoRA, except that ``train``
        leaves are copied).
      config: the `LoraConfig`.
      key: a PRNG key (``jax.random.key(0)``); keyword-only; required by the
        random inits (``kaiming``, ``gaussian``), unused by PiSSA/OLoRA/LoftQ.
      return_params: return ``(params, adapters)``: the base to train with
        (PiSSA/OLoRA: the residual ``W - scale * a @ b`` at each target;
        LoftQ: the quantized base; otherwise ``params`` itself) and the
        adapters.
      quantized: ``init="loftq"`` only, and required there: the quantized
        base, ``lj.quantize(params, config=config, ...)``; each target must be
        quantized in it. Its other leaves are returned as they are.

    Raises:
      ValueError: no key for a random init; ``pissa``/``olora``/``loftq``
        without ``return_params=True``; ``loftq`` without ``quantized`` (or
        with a quantized target in ``params``, or a float one in
        ``quantized``), ``quantized`` with another init; and every error of
        `lj.describe`.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
      >>> cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*/kernel")
      >>> adapters = lj.init(params, cfg, key=jax.random.key(0))
      >>> adapters["dense"]["kernel"].a.shape, adapters["dense"]["kernel"].b.shape
      ((16, 4), (4, 32))
      >>> adapters["dense"]["bias"] is None
      True

      PiSSA moves the principal directions into the adapter; base + adapter
      is the original weight:

      >>> w = {"w": jax.random.normal(jax.random.key(1), (32, 16))}
      >>> pcfg = lj.LoraConfig(rank=4, targets="w", init="pissa")
      >>> res, ad = lj.init(w, pcfg, return_params=True)
      >>> bool(jnp.allclose(lj.merge(res, ad, pcfg)["w"], w["w"], atol=1e-5))
      True

      LoftQ returns an NF4 base whose error the adapter partly cancels:

      >>> lcfg = lj.LoraConfig(rank=4, targets="w", init="loftq")
      >>> q, ad = lj.init(w, lcfg, return_params=True,
      ...                 quantized=lj.quantize(w, targets="w", config=lcfg))
      >>> q["w"]
      NF4Weight(shape=(32, 16), dtype=float32, block_size=64)
      >>> e = lj.loftq_report(w, q, ad, lcfg)["w"]
      >>> bool(e.loftq < e.plain)
      True
    """
    if not isinstance(return_params, bool):
        raise error("lj.init", f"return_params must be a bool, got {return_params!r}",
                    "pass return_params=True or return_params=False", kind=TypeError)
    resolved = resolve(params, config)
    train = set(resolved.train)
    _check_init_args(config, key, return_params, quantized)
    loftq = config.init == "loftq"

    flat, treedef = flatten_params(params)
    likes = [leaf for _, leaf in flat]
    if loftq:
        likes = mirror(params, quantized, what="quantized", against="params",
                       fix="pass lj.quantize(params, config=config) of these same params")
        resolve(quantized, config)   # its stacked layers must be the config's
    new_params, nodes = [], []
    for (keypath, leaf), like in zip(flat, likes, strict=True):
        path = path_str(keypath)
        spec = resolved.targets.get(path)
        base = like
        if spec is not None:
            base, a, b = _factors(path, leaf, like, spec, config, key)
            node = LoraWeights(a, b, scale_array(spec))
            if config.use_dora:
                v = as_matrix(dense_float32(base) + delta(node, spec), spec)
                node = node._replace(m=_dora.dense_column_norm(v).astype(config.dtype))
            nodes.append(node)
        elif path in train:
            # A copy: the adapter tree's buffers may be donated to a train step,
            # which must never invalidate the frozen params.
            nodes.append(jnp.array(leaf, copy=True))
        else:
            nodes.append(None)
        new_params.append(base)
    adapters = jax.tree_util.tree_unflatten(treedef, nodes)
    if return_params:
        return jax.tree_util.tree_unflatten(treedef, new_params), adapters
    return adapters


def subtract_init(adapters, initial, config: LoraConfig):
    """A PiSSA/OLoRA adapter as a plain LoRA on the *original* base (PEFT's conversion).

    PiSSA/OLoRA train ``W_res + s * a @ b`` with ``W_res = W - s * a0 @ b0``,
    so the update relative to the original ``W`` is
    ``s * (a @ b - a0 @ b0) = s * [a | a0] @ [b ; -b0]``: a LoRA of rank
    ``2 * rank`` (PEFT's ``subtract_mutated_init``, what
    ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes).
    The returned config doubles every rank and keeps every scale (alpha is
    doubled, or multiplied by sqrt(2) with rsLoRA) and uses the default init;
    where ``2 * rank`` would exceed ``min(in, out)``, the update is refactored
    exactly at rank ``min(in, out)`` (from its SVD) and the path gets its own
    ``rank_pattern`` / ``alpha_pattern`` entry with the same scale;
    DoRA magnitudes carry over unchanged (the direction is the same).
    Export the result with `lj.export_peft`, or merge it into the original
    params. LoftQ adapters are refused: their base is the quantized one, not W.

    Args:
      adapters: the trained adapters.
      initial: the adapters `lj.init` returned (before training).
      config: their `LoraConfig`.

    Returns:
      ``(adapters, config)`` of rank ``2 * rank``, for the original base.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> w = {"w": jax.random.normal(jax.random.key(0), (32, 16))}
      >>> cfg = lj.LoraConfig(rank=4, alpha=8, targets="w", init="pissa")
      >>> res, ad0 = lj.init(w, cfg, return_params=True)
      >>> ad = {"w": ad0["w"]._replace(b=ad0["w"].b + 0.1)}        # "trained"
      >>> plain, pcfg = lj.subtract_init(ad, ad0, cfg)
      >>> plain["w"].a.shape, pcfg.rank, pcfg.alpha, pcfg.init
      ((32, 8), 8, 16.0, 'kaiming')
      >>> bool(jnp.allclose(lj.merge(w, plain, pcfg)["w"], lj.merge(res, ad, cfg)["w"],
      ...                   atol=1e-5))
      True
    """
    if not isinstance(config, LoraConfig):
        raise error("lj.subtract_init",
                    f"config must be a lj.LoraConfig, got {type(config).__name__}",
                    "pass the LoraConfig the adapters were made with", kind=TypeError)
    if config.init == "loftq":
        # W = deq(Q) + s * a0 @ b0 only approximately (the point of LoftQ is how well),
        # so the difference to W would be a different model.
        raise error(
            "lj.subtract_init", "init='loftq' adapters fit the quantized base deq(Q), which "
            "differs from the original W by more than scale * a0 @ b0 (by LoftQ's "
            "reconstruction error), so no LoRA on the original base gives the trained model",
            "use the LoftQ base itself as the plain base: lj.dequantize(q) with the adapters "
            "as they are, and config.replace(init='kaiming', loftq_iters=1) for tools that "
            "need a plain init")
    flat, treedef = flatten_adapters(adapters)
    try:
        init_nodes = treedef.flatten_up_to(initial)
    except (ValueError, TypeError) as e:
        raise error("lj.subtract_init", f"initial does not mirror adapters ({e})",
                    "pass the tree lj.init returned for this config") from None
    out, capped = [], {}
    for (path, node), node0 in zip(flat, init_nodes, strict=True):
        if not isinstance(node, LoraWeights):
            out.append(node)
            continue
        if not isinstance(node0, LoraWeights) or jnp.shape(node0.a) != jnp.shape(node.a) \
                or jnp.shape(node0.b) != jnp.shape(node.b):
            raise error(
                path, f"initial holds {type(node0).__name__} with other shapes than the "
                f"adapter (a {jnp.shape(node.a)}, b {jnp.shape(node.b)})",
                "pass the initial adapters of this same run")
        a = jnp.concatenate([node.a, jnp.asarray(node0.a, node.a.dtype)], axis=-1)
        b = jnp.concatenate([node.b, -jnp.asarray(node0.b, node.b.dtype)], axis=-2)
        k = min(a.shape[-2], b.shape[-1])
        if a.shape[-1] > k:          # rank 2r can't exceed min(in, out): refactor exactly
            a, b = _refactored(a, b, k)
            capped[re.escape(path)] = (k, config.alpha_for(path), config.rank_for(path))
        out.append(node._replace(a=a, b=b))
    factor = 2 ** 0.5 if config.use_rslora else 2.0
    # exact-path entries first: they win over the patterns they refine
    rank_pattern = {p: k for p, (k, _, _) in capped.items()}
    alpha_pattern = {p: _same_scale(alpha, r, k, config.use_rslora)
                     for p, (k, alpha, r) in capped.items()}
    rank_pattern.update({p: 2 * r for p, r in config.rank_pattern})
    alpha_pattern.update({p: factor * a for p, a in config.alpha_pattern})
    new_config = config.replace(
        rank=2 * config.rank, alpha=factor * config.alpha, init="kaiming",
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return jax.tree_util.tree_unflatten(treedef, out), new_config


def _refactored(a, b, k: int):
    """``a @ b`` (rank <= k) as exact rank-``k`` factors, from its SVD (float32)."""
    prod = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
    u, sv, vt = jnp.linalg.svd(prod, full_matrices=False)
    root = jnp.sqrt(sv[..., :k])
    return ((u[..., :, :k] * root[..., None, :]).astype(a.dtype),
            (root[..., :, None] * vt[..., :k, :]).astype(b.dtype))


def _same_scale(alpha: float, rank: int, k: int, rslora: bool) -> float:
    """The alpha that gives rank ``k`` the scale ``alpha`` gives ``rank``."""
    return alpha * (k / rank) ** 0.5 if rslora else alpha * k / rank
