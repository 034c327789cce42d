"""The training matmul: ``x @ W + s (x @ a) @ b`` as one ``custom_vjp``.

The common case -- x's trailing axes contracted with all of one factor's
axes, no batch axes -- is flattened to 2-D by `lora_jax._apply.lowrank` and
goes through `matmul_kernel`, a custom_vjp with a hand-written backward.
Left to autodiff, XLA:CPU forms db = t.T @ g as dot(g, t) contracting g's
rows, i.e. with a transposed copy of every output cotangent g, and
recomputes the sums base + delta (forward) and g @ W.T + dt @ a.T
(backward) inside every consumer, keeping both addends alive until the
backward pass (more temp memory than full fine-tuning). Here every transpose
lands on an (N, r) operand, and the training forward is one dot over
[x | x a] and [W ; s b]. benchmarks/RESULTS.md has the measurements.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax._apply.lazy import is_array
from lora_jax._core.dtypes import promote

__all__ = ["matmul_kernel", "shared_matmul_kernel", "fuse_concat", "explicit_spec"]


# A NaN payload no arithmetic produces (quiet NaNs come out as 0x7FC00000).
_NEVER = 0x7FC0_0D0A


def _tied_to(tree, x):
    """``tree`` unchanged, but computed only once ``x`` exists (a data dependency).

    Each leaf is selected against itself under a flag read from ``x``'s
    first element -- true only for one NaN payload that arithmetic never
    produces -- which no compiler pass can fold away.
    """
    first = jnp.ravel(x)[:1].astype(jnp.float32)
    flag = (lax.bitcast_convert_type(first, jnp.uint32) == _NEVER)[0]
    return jax.tree.map(lambda v: lax.select(jnp.broadcast_to(flag, v.shape), lax.rev(
        v, tuple(range(v.ndim))) if v.ndim else v, v), tree)


@functools.lru_cache(maxsize=None)
def matmul_kernel(precision, out_dtype, concat: bool, out_spec=None):
    """``y = x @ view(w) + (xl @ a) @ (s * b)`` on 2-D operands, with its VJP.

    ``view(w)`` is the frozen weight as a (K, N) array: ``w`` is the stored
    leaf (an array, or a quantized container that ``view`` dequantizes),
    so the backward pass recomputes the view instead of keeping a dense copy
    alive. ``x``: (M, K); ``xl``: the LoRA input (dropout applied); ``a``:
    (K, r); ``b``: (r, N); ``s``: scalar. The low-rank terms are formed in
    the adapters' dtype; ``concat`` (all dtypes equal) computes the training
    forward as one dot over ``[x | xl a]`` and ``[W ; s b]`` (the backward
    keeps ``g @ W.T`` and ``dt @ a.T`` apart: one dot over ``[g | dt]`` and
    ``[W | a]`` copies both, measured no faster and 15% more temporary memory,
    benchmarks/RESULTS.md "Speed, round two"). ``out_spec``: the 2-D
    PartitionSpec the model named for this product's output (on a mesh with
    Explicit axes; tensor-parallel weights), or None.
    """
    dot = _dot_fn(precision)
    dense, scaled = _dense, _scaled

    def forward(x, xl, w, a, sb, train):
        ad = a.dtype
        t_spec, y_spec = _forward_specs(x, w, out_spec)
        t = dot(xl.astype(ad), a, 1, 0, ad, spec=t_spec)
        if train:
            y = dot(jnp.concatenate([x, t], 1), jnp.concatenate([w, sb], 0), 1, 0, out_dtype,
                    spec=y_spec)
        else:
            acc = promote(out_dtype, ad)
            y = (dot(x, w, 1, 0, acc, spec=y_spec) +
                 dot(t, sb, 1, 0, ad, spec=y_spec).astype(acc)).astype(out_dtype)
        return y, t

    def matmul(view, x, xl, w, a, b, s):
        return forward(x, xl, dense(view, w, x), a, scaled(s, b), False)[0]

    def fwd(view, x, xl, w, a, b, s):
        sb = scaled(s, b)
        y, t = forward(x, xl, dense(view, w, x), a, sb, concat and is_array(w))
        return y, (x, xl, w, a, b, s, sb, t)

    def bwd(view, res, g):
        x, xl, w_src, a, b, s, sb, t = res
        w, pull = jax.vjp(lambda w: dense(view, w, g), w_src)
        ad = a.dtype
        ga = g.astype(ad)
        dt = dot(ga, sb, 1, 1, ad, like=t)                  # (M, r)
        dx = dot(g, w, 1, 1, promote(g.dtype, x.dtype), like=x).astype(x.dtype)
        dxl = dot(dt, a, 1, 1, ad, like=xl).astype(xl.dtype)
        # via (r, K): transposes dt only
        da = dot(dt, xl.astype(ad), 0, 0, ad, like=a, flip=True).T
        db = scaled(s, dot(t, ga, 0, 0, ad, like=b)).astype(b.dtype)  # transposes t only
        # The frozen weight's cotangent is dead code unless params are
        # differentiated too (XLA then drops it).
        (dw,) = pull(dot(x, g, 0, 0, promote(g.dtype, w.dtype), like=w)
                     .astype(w.dtype))
        return dx, dxl, dw, da.astype(a.dtype), db, jnp.zeros_like(s)

    kernel = jax.custom_vjp(matmul, nondiff_argnums=(0,))
    kernel.defvjp(fwd, bwd)
    return kernel


def _dense(view, w, after):
    """``view(w)``: a stored container densified where it is used.

    Tied to the activation (``after``: x forward, the cotangent backward) by
    a data dependency, so that XLA neither hoists every dequantization to the
    start nor merges the backward's recomputation with the forward's (either
    keeps all dense weights alive). An optimization barrier does not do it:
    XLA:CPU removes barriers before scheduling.
    """
    if not is_array(w):
        w = _tied_to(w, after)
    return view(w)


def _scaled(s, v):
    """``s * v`` formed in the wider dtype and rounded once to v's (explicit: valid
    under strict promotion, where a float32 scale and bf16/f64 factors don't mix)."""
    wide = promote(s.dtype, v.dtype)
    return (s.astype(wide) * v.astype(wide)).astype(v.dtype)


def _dot_fn(precision):
    def dot(u, v, cu, cv, dtype=None, like=None, flip=False, spec=None):
        # On a mesh with Explicit axes a product that contracts a sharded
        # axis must name its output's sharding: ``spec``, or that of ``like``
        # (the array the result is the cotangent of), transposed with ``flip``.
        if spec is None and like is not None:
            spec = explicit_spec(like, flip)
        return lax.dot_general(u, v, (((cu,), (cv,)), ((), ())), precision=precision,
                               preferred_element_type=dtype, out_sharding=spec)
    return dot


def _forward_specs(x, w, out_spec):
    """``(t_spec, y_spec)`` for ``t = x @ a`` and ``y`` on a mesh with Explicit axes.

    ``t`` keeps x's row sharding and a replicated rank axis; ``y`` is what the
    model named for its product (``out_spec``, made 2-D by the caller), else
    x's rows by W's columns -- what the model's own ``x @ W`` gives when
    nothing contracted is sharded. (None, None) elsewhere: XLA chooses.
    """
    xs = explicit_spec(x)
    if xs is None:
        return None, None
    if out_spec is None:
        ws = explicit_spec(w)
        out_spec = jax.sharding.PartitionSpec(xs[0], None if ws is None else ws[1])
    return jax.sharding.PartitionSpec(xs[0], None), out_spec


@functools.lru_cache(maxsize=None)
def shared_matmul_kernel(precision, out_dtypes: tuple, concat: bool, out_specs: tuple):
    """``y_i = x @ view_i(w_i) + (x @ a_i) @ (s_i * b_i)`` for weights sharing one input.

    The projections that read the same activation (q, k and v; gate and up)
    share their thin products: one ``x @ [a_1 | a_2 | ...]`` forward, and in
    the backward one ``[dt_1 | dt_2 | ...] @ [a_1 | ...].T`` for the input's
    gradient and one ``x.T @ [dt_1 | ...]`` for every ``a``'s -- three
    passes over ``x`` instead of three per projection. Operands as in
    `matmul_kernel` (tuples, one entry per weight; the factors of all
    weights share one dtype); no dropout (the LoRA input is ``x`` itself);
    ``out_specs``: each product's ``out_spec`` (see `matmul_kernel`).
    """
    dot = _dot_fn(precision)

    def split(t, ranks):
        cuts = [sum(ranks[:i]) for i in range(1, len(ranks))]
        return jnp.split(t, cuts, axis=-1)

    def forward(x, ws, as_, sbs, train):
        ad = as_[0].dtype
        a_cat = jnp.concatenate(as_, 1)
        t_spec = _forward_specs(x, ws[0], out_specs[0])[0]
        t_cat = dot(x.astype(ad), a_cat, 1, 0, ad, spec=t_spec)
        ts = split(t_cat, [a.shape[1] for a in as_])
        ys = []
        for w, t, sb, od, spec in zip(ws, ts, sbs, out_dtypes, out_specs, strict=True):
            y_spec = _forward_specs(x, w, spec)[1]
            if train:
                ys.append(dot(jnp.concatenate([x, t], 1), jnp.concatenate([w, sb], 0),
                              1, 0, od, spec=y_spec))
            else:
                acc = promote(od, ad)
                ys.append((dot(x, w, 1, 0, acc, spec=y_spec) +
                           dot(t, sb, 1, 0, ad, spec=y_spec).astype(acc)).astype(od))
        return tuple(ys), t_cat

    def matmul(views, x, ws, as_, bs, ss):
        sbs = [_scaled(s, b) for s, b in zip(ss, bs, strict=True)]
        dense = [_dense(v, w, x) for v, w in zip(views, ws, strict=True)]
        return forward(x, dense, as_, sbs, False)[0]

    def fwd(views, x, ws, as_, bs, ss):
        sbs = [_scaled(s, b) for s, b in zip(ss, bs, strict=True)]
        dense = [_dense(v, w, x) for v, w in zip(views, ws, strict=True)]
        train = concat and all(is_array(w) for w in ws)
        ys, t_cat = forward(x, dense, as_, sbs, train)
        return ys, (x, ws, as_, bs, ss, sbs, t_cat)

    def bwd(views, res, gs):
        x, w_srcs, as_, bs, ss, sbs, t_cat = res
        ad = as_[0].dtype
        ranks = [a.shape[1] for a in as_]
        ts = split(t_cat, ranks)
        a_cat = jnp.concatenate(as_, 1)
        xa = x.astype(ad)
        dx_dtype = promote(promote(*(g.dtype for g in gs)), x.dtype)
        dts, dbs, dws, dense = [], [], [], []
        for view, w_src, b, s, sb, t, g in zip(views, w_srcs, bs, ss, sbs, ts, gs, strict=True):
            w, pull = jax.vjp(lambda w, view=view, g=g: _dense(view, w, g), w_src)
            dense.append(w)
            ga = g.astype(ad)
            dts.append(dot(ga, sb, 1, 1, ad, like=t))                          # (M, r_i)
            dbs.append(_scaled(s, dot(t, ga, 0, 0, ad, like=b)).astype(b.dtype))
            # dead code unless params are differentiated too (XLA then drops it)
            (dw,) = pull(dot(x, g, 0, 0, promote(g.dtype, w.dtype), like=w).astype(w.dtype))
            dws.append(dw)
        dt_cat = jnp.concatenate(dts, 1)
        dx = dot(dt_cat, a_cat, 1, 1, ad, like=x).astype(dx_dtype)
        for g, w in zip(gs, dense, strict=True):
            dx = dx + dot(g, w, 1, 1, dx_dtype, like=x)
        da_cat = dot(dt_cat, xa, 0, 0, ad, like=a_cat, flip=True).T     # transposes dt only
        das = [da.astype(a.dtype) for da, a in zip(split(da_cat, ranks), as_, strict=True)]
        return (dx.astype(x.dtype), tuple(dws), tuple(das), tuple(dbs),
                tuple(jnp.zeros_like(s) for s in ss))

    kernel = jax.custom_vjp(matmul, nondiff_argnums=(0,))
    kernel.defvjp(fwd, bwd)
    return kernel


def explicit_spec(x, flip: bool = False):
    """``x``'s PartitionSpec (axes reversed with ``flip``) on a mesh with Explicit
    axes; None elsewhere (Auto axes, no mesh), where XLA chooses."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if sharding is None or \
            not any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return None
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    return jax.sharding.PartitionSpec(*(spec[::-1] if flip else spec))


@functools.lru_cache(maxsize=None)
def fuse_concat() -> bool:
    """Whether the training forward fuses into one dot over ``[x | x a]``, ``[W ; s b]``.

    Only on a single CPU device, where it was measured faster (it saves a
    pass over the output). Under a mesh the concatenation of a sharded
    ``W`` with the replicated ``s b`` makes XLA reshuffle ``W`` (all-to-alls,
    benchmarks/RESULTS.md "Sharding"), and on accelerators it would copy
    every weight each step for no gain.
    """
    return jax.default_backend() == "cpu" and jax.device_count() == 1
