"""The low-rank products: the only places ``x @ a`` and ``(x @ a) @ b`` are formed.

`lowrank_dot` (matmuls, through `lora_jax._apply.kernel` when the product
flattens to 2-D), `lowrank_conv` (a conv with an r-channel kernel, then a
1x1 up-projection), `lowrank_gather` (embedding rows: ``a[ids] @ b``) and
`lowrank_ragged_dot` (grouped matmuls over expert-stacked weights: MoE).
Each raises `NotLowRank` when the use has no low-rank form; DoRA's scale
``g`` is applied here (`dora_scaled`), and a mixture's per-token gates
(`LazyWeight.router`, matmuls of the weight's input only) in `lowrank_dot`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from lora_jax._apply.gating import gate_blocks
from lora_jax._apply.kernel import (
    explicit_spec,
    fuse_concat,
    matmul_kernel,
    shared_matmul_kernel,
)
from lora_jax._apply.lazy import A, B, LazyWeight, NotLowRank, S, factor_labels, transpose_to
from lora_jax._core.dtypes import promote
from lora_jax._core.errors import error

__all__ = ["lowrank_dot", "lowrank_dot_shared", "lowrank_conv", "lowrank_gather",
           "lowrank_ragged_dot", "dora_scaled"]


def _matmul_plan(x, lw: LazyWeight, xc, wc, first_is_a):
    """``(view, f1, f2, out_shape)`` when the product flattens to 2-D, else None.

    Flattens when x's contracted axes are its trailing ones, the weight's
    contracted axes are all of one factor's axes in the same order, and the
    weight's free axes are the other factor's, in order. ``view(lw.w)`` is
    the frozen weight as (K, N).
    """
    nx = x.ndim
    if tuple(xc) != tuple(range(nx - len(xc), nx)):
        return None
    lw = lw.canonical()
    kind1 = A if first_is_a else B
    kind2 = B if first_is_a else A
    if [lw.dims[i] for i in wc] != [(kind1, k) for k in range(lw.count(kind1))]:
        return None
    free = [i for i in range(lw.ndim) if i not in wc]
    if [lw.dims[i] for i in free] != [(kind2, k) for k in range(lw.count(kind2))]:
        return None
    r = lw.a.shape[-1]
    k = math.prod(lw.shape[i] for i in wc)
    n = math.prod(lw.shape[i] for i in free)
    perm = tuple(wc) + tuple(free)
    dtype, pending = lw.dtype, lw.pending

    def view(w):
        w = LazyWeight.frozen_value(w, dtype, pending)
        if perm != tuple(range(w.ndim)):
            w = lax.transpose(w, perm)
        return w.reshape(k, n)

    a2 = lw.a.reshape(-1, r)        # (prod A, r)
    b2 = lw.b.reshape(r, -1)        # (r, prod B)
    f1, f2 = (a2, b2) if first_is_a else (b2.T, a2.T)
    out_shape = x.shape[: nx - len(xc)] + tuple(lw.shape[i] for i in free)
    return view, lw.w, f1, f2, out_shape


def _out_dtype(preferred, x_dtype, w_dtype):
    return jnp.dtype(preferred) if preferred is not None else promote(x_dtype, w_dtype)


def _acc_dtype(out_dtype, adapter_dtype):
    """The dtype the low-rank sum is formed in: never below the adapters'."""
    return promote(out_dtype, adapter_dtype)


def lowrank_dot(x, lw: LazyWeight, *, x_is_lhs: bool, dimension_numbers, precision,
                preferred_element_type, out_sharding, lora_input=None,
                custom_grad=True):
    """``dot_general(x, W + s a b)`` as ``x W + s (x a) b``; raises `NotLowRank`.

    The one place the low-rank product of a matmul is formed; extensions
    (DoRA's column norm, per-example adapter gathers, sharding constraints)
    hook in here. ``lora_input(x)`` gives the LoRA branch's input (``x``
    after dropout); it is called only once the product is known to be
    low-rank. The weight's batch axes must be stacked axes (a stacked axis
    the product keeps is fine: the up-projection batches over it), and its
    contracted axes all input (``A``) axes or all output (``B``) axes;
    partial contractions of one kind are fine.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    xc, wc, xb, wb = (lc, rc, lb, rb) if x_is_lhs else (rc, lc, rb, lb)
    dims = lw.dims
    if any(dims[i][0] != S for i in wb):
        raise NotLowRank("the matmul batches over an input or output axis of the weight, "
                         "not a stacked one (check LoraConfig.layouts)")
    kinds = {dims[i][0] for i in wc}
    if kinds not in ({A}, {B}):
        raise NotLowRank("the matmul contracts a mix of the weight's input and output axes "
                         "(or none); check LoraConfig.layouts")
    first_is_a = kinds == {A}
    if lw.router is not None and not first_is_a:
        raise _mixture_error(lw, "a matmul that contracts the weight's output axes (x @ W.T: "
                                 "a tied embedding as the output projection), where the "
                                 "router, which reads the weight's input, has no input to read")
    if lw.g is None:
        return _lowrank_dot(x, lw, x_is_lhs, dimension_numbers, first_is_a, precision,
                            preferred_element_type, out_sharding, lora_input, custom_grad)
    # DoRA: the weight is (W + s a b) * g over its output axes
    x_free = [i for i in range(x.ndim) if i not in xc and i not in xb]
    if not first_is_a:       # output axes contracted: scale x instead
        labels = [None] * x.ndim
        for i, j in (*zip(xc, wc, strict=True), *zip(xb, wb, strict=True)):
            labels[i] = dims[j]
        x = (x * lw.g_along(labels)).astype(x.dtype)
        return _lowrank_dot(x, lw, x_is_lhs, dimension_numbers, first_is_a, precision,
                            preferred_element_type, out_sharding, lora_input, custom_grad)
    w_free = [dims[i] for i in range(lw.ndim) if i not in wc and i not in wb]
    none = [None] * len(x_free)
    labels = [dims[j] for j in wb] + (none + w_free if x_is_lhs else w_free + none)
    y = _lowrank_dot(x, lw, x_is_lhs, dimension_numbers, first_is_a, precision,
                     preferred_element_type, out_sharding, lora_input, custom_grad)
    return dora_scaled(lw, y, labels)


def _spec_2d(out_sharding, n_lead: int):
    """The PartitionSpec a product's output was given, for its ``(M, N)`` form: the
    first ``n_lead`` axes (x's) become rows, the rest (W's) columns; None if none."""
    spec = getattr(out_sharding, "spec", out_sharding)
    if spec is None:
        return None

    def merged(entries):
        names = []
        for e in entries:
            names.extend(() if e is None else (e,) if isinstance(e, str) else tuple(e))
        return None if not names else names[0] if len(names) == 1 else tuple(names)

    spec = tuple(spec)
    return PartitionSpec(merged(spec[:n_lead]), merged(spec[n_lead:]))


def lowrank_dot_shared(x, uses: list) -> list:
    """Several ``dot_general(x, W_i + s_i a_i b_i)`` on one ``x``, sharing ``x @ a``.

    ``uses``: one ``(lw, dimension_numbers, precision, preferred_element_type,
    out_sharding)`` per product, ``x`` the left operand of each. Returns one entry per use:
    its output, or None for a use that cannot join (it then goes through
    `lowrank_dot` on its own). Products join when they flatten to
    ``(M, K) @ (K, N)`` with the same ``K`` and precision, their factors
    share a dtype, and they are plain LoRA (no DoRA scale, no mixture); fewer than two
    joining products give all None. Equal to separate `lowrank_dot` calls up
    to rounding (one ``x @ [a_1 | a_2 | ...]`` instead of one per product).
    """
    plans = []
    for lw, dn, precision, pet, sharding in uses:
        (lc, rc), (lb, rb) = dn
        plan = None
        kinds = {lw.dims[i][0] for i in rc}
        if lw.g is None and lw.router is None and not lb and not rb and kinds in ({A}, {B}):
            plan = _matmul_plan(x, lw, lc, rc, kinds == {A})
        if plan is not None:
            view, w_src, f1, f2, out_shape = plan
            plan = (view, w_src, f1, f2, lw.scale, out_shape, precision,
                    _out_dtype(pet, x.dtype, lw.dtype), lw.dtype,
                    _spec_2d(sharding, x.ndim - len(lc)))
        plans.append(plan)
    first = next((p for p in plans if p is not None), None)
    if first is None:
        return [None] * len(uses)
    k, precision, ad = first[2].shape[0], first[6], first[2].dtype
    join = [p is not None and p[2].shape[0] == k and p[6] == precision and p[2].dtype == ad
            and p[3].dtype == ad for p in plans]
    if sum(join) < 2:
        return [None] * len(uses)
    members = [p for p, j in zip(plans, join, strict=True) if j]
    out_dtypes = tuple(p[7] for p in members)
    same = all(x.dtype == p[8] == ad == p[7] for p in members)
    kernel = shared_matmul_kernel(precision, out_dtypes, same and fuse_concat(),
                                  tuple(p[9] for p in members))
    ys = kernel(tuple(p[0] for p in members), x.reshape(-1, k), tuple(p[1] for p in members),
                tuple(p[2] for p in members), tuple(p[3] for p in members),
                tuple(p[4] for p in members))
    it = iter(y.reshape(p[5]) for y, p in zip(ys, members, strict=True))
    return [next(it) if j else None for j in join]


def _lowrank_dot(x, lw, x_is_lhs, dimension_numbers, first_is_a, precision,
                 preferred_element_type, out_sharding, lora_input, custom_grad):
    """`lowrank_dot` without DoRA's scale (arguments checked there)."""
    (lc, rc), (lb, rb) = dimension_numbers
    xc, wc, xb, wb = (lc, rc, lb, rb) if x_is_lhs else (rc, lc, rb, lb)
    dims = lw.dims
    f1, f2 = (lw.a, lw.b) if first_is_a else (lw.b, lw.a)
    pos1, pos2 = (lw.a_axis, lw.b_axis) if first_is_a else (lw.b_axis, lw.a_axis)
    out_dtype = _out_dtype(preferred_element_type, x.dtype, lw.dtype)
    acc = _acc_dtype(out_dtype, f1.dtype)
    if lw.router is not None:    # a mixture: its gates live in the generic path, not the kernel
        custom_grad = False
    if custom_grad and x_is_lhs and not wb:
        plan = _matmul_plan(x, lw, xc, wc, first_is_a)
        if plan is not None:
            view, w_src, f1_2d, f2_2d, out_shape = plan
            xl = x if lora_input is None else lora_input(x)
            k = f1_2d.shape[0]
            same = x.dtype == lw.dtype == f1.dtype == f2.dtype == out_dtype
            kernel = matmul_kernel(precision, out_dtype, same and fuse_concat(),
                                   _spec_2d(out_sharding, x.ndim - len(xc)))
            y = kernel(view, x.reshape(-1, k), xl.reshape(-1, k), w_src, f1_2d, f2_2d,
                       lw.scale)
            return y.reshape(out_shape)
    operands = (x, lw.frozen()) if x_is_lhs else (lw.frozen(), x)
    base = lax.dot_general(*operands, dimension_numbers, precision=precision,
                           preferred_element_type=acc if acc != out_dtype
                           else preferred_element_type,
                           out_sharding=out_sharding)
    xl = x if lora_input is None else lora_input(x)
    xl = xl.astype(f1.dtype)
    nbat = len(wb)
    # t = x . f1 over the contracted axes: (batch, x free, f1 free)
    t_dn = ((tuple(xc), tuple(pos1(dims[i]) for i in wc)),
            (tuple(xb), tuple(pos1(dims[i]) for i in wb)))
    x_free = [i for i in range(x.ndim) if i not in xc and i not in xb]
    xs = explicit_spec(x)    # Explicit mesh axes: t keeps x's sharding, the rank axis none
    t_spec = None if xs is None else PartitionSpec(
        *(xs[i] for i in (*xb, *x_free)), *([None] * (f1.ndim - len(wc) - len(wb))))
    t = lax.dot_general(xl, f1, t_dn, precision=precision, preferred_element_type=f1.dtype,
                        out_sharding=t_spec)
    f1_used = {pos1(dims[i]) for i in (*wc, *wb)}
    f1_labels = factor_labels(lw, first_is_a)
    t_labels: list = [("batch", i) for i in range(nbat)] + [("x", i) for i in x_free] + \
        [lab for p, lab in enumerate(f1_labels) if p not in f1_used]
    r_t = t_labels.index("r")
    if lw.router is not None:    # a mixture: each token's gates weight its adapters' blocks of t
        gd = promote(lw.router.dtype, jnp.float32)
        logits = lax.dot_general(x.astype(gd), lw.router.astype(gd), t_dn, precision=precision,
                                 preferred_element_type=gd, out_sharding=t_spec)  # t's axes
        t = gate_blocks(t, logits, r_t, lw.gating)
    f2 = f2 * lw.scale.astype(f2.dtype)
    # Stacked axes the product keeps as free axes (an ensemble on a shared input,
    # per-head copies): t carries them, and the up-projection batches over them.
    kept = [lab for lab in t_labels[nbat:] if lab != "r" and lab[0] == S]
    t_batch = tuple(range(nbat)) + tuple(t_labels.index(lab) for lab in kept)
    f2_batch = tuple(pos2(dims[i]) for i in wb) + tuple(pos2(lab) for lab in kept)
    d = lax.dot_general(t, f2, (((r_t,), (pos2("r"),)), (t_batch, f2_batch)),
                        precision=precision, preferred_element_type=f1.dtype)
    f2_free = [lab for lab in factor_labels(lw, not first_is_a) if lab != "r" and lab[0] != S]
    d_labels = [("batch", i) for i in range(nbat)] + kept + \
        [lab for lab in t_labels[nbat:] if lab != "r" and lab not in kept] + f2_free
    w_free = [dims[i] for i in range(lw.ndim) if i not in wc and i not in wb]
    x_part = [("x", i) for i in x_free]
    want = [("batch", i) for i in range(nbat)] + \
        (x_part + w_free if x_is_lhs else w_free + x_part)
    d = transpose_to(d, d_labels, want)
    if xs is not None:       # the update takes the sharding the model gave the product
        d = jax.sharding.reshard(d, explicit_spec(base))
    return (base.astype(acc) + d.astype(acc)).astype(out_dtype)


def lowrank_conv(x, lw: LazyWeight, *, params, lora_input=None):
    """``conv(x, W + s a b)`` as ``conv(x, W) + s conv(x, a) b``; raises `NotLowRank`.

    ``a`` becomes an r-output-channel kernel with W's spatial and input axes;
    ``b`` is then a 1x1 up-projection on the output's feature axis. Needs
    W's output-feature axis to be its only ``B`` axis (the default conv
    layout) and no batch groups. A grouped (or depthwise) convolution with
    ``G`` groups runs ``a`` once per group (a grouped conv with ``G * r``
    outputs: ``G`` copies of ``a``) and ``b`` per group (group ``g``'s output
    channels take group ``g``'s ``r`` channels): the same FLOPs as ungrouped.
    """
    if lw.router is not None:
        raise _mixture_error(lw, "a convolution")
    dn = params["dimension_numbers"]
    if params["batch_group_count"] != 1 or lw.count(S) or lw.count(B) != 1:
        raise NotLowRank("a batch-grouped convolution, or a kernel whose layout is not "
                         "(*spatial, in, out)")
    out_feat = dn.rhs_spec[0]
    if lw.dims[out_feat] != (B, 0):
        raise NotLowRank("the convolution's output-feature axis is not the weight's output axis")
    conv = dict(window_strides=params["window_strides"], padding=params["padding"],
                lhs_dilation=params["lhs_dilation"], rhs_dilation=params["rhs_dilation"],
                dimension_numbers=dn, precision=params["precision"],
                feature_group_count=params["feature_group_count"])
    out_dtype = _out_dtype(params["preferred_element_type"], x.dtype, lw.dtype)
    acc = _acc_dtype(out_dtype, lw.a.dtype)
    base = lax.conv_general_dilated(
        x, lw.frozen(), **conv,
        preferred_element_type=acc if acc != out_dtype else params["preferred_element_type"])
    kernel_labels = [lab if lab[0] == A else "r" for lab in lw.dims]
    kernel = transpose_to(lw.a, factor_labels(lw, True), kernel_labels)
    groups = params["feature_group_count"]
    if groups > 1:     # one copy of a per group: G * r output channels, group-major
        kernel = jnp.concatenate([kernel] * groups, axis=out_feat)
    xl = (x if lora_input is None else lora_input(x)).astype(lw.a.dtype)
    t = lax.conv_general_dilated(xl, kernel, **conv, preferred_element_type=lw.a.dtype)
    feat = dn.out_spec[1]
    b = lw.b * lw.scale.astype(lw.b.dtype)
    if groups == 1:
        d = lax.dot_general(t, b, (((feat,), (0,)), ((), ())), precision=params["precision"],
                            preferred_element_type=lw.a.dtype)
    else:              # group g's outputs from group g's r channels
        r, n_out = b.shape
        tg = jnp.moveaxis(t, feat, -1).reshape(*base.shape[:feat], *base.shape[feat + 1:],
                                                groups, r)
        bg = b.reshape(r, groups, n_out // groups)
        d = jnp.einsum("...gk,kgo->...go", tg, bg, precision=params["precision"],
                       preferred_element_type=lw.a.dtype).reshape(*tg.shape[:-2], n_out)
    d = jnp.moveaxis(d, -1, feat)
    return dora_scaled(lw, (base.astype(acc) + d.astype(acc)).astype(out_dtype),
                        _feature_labels(y_ndim=base.ndim, feat=feat))


def _mixture_error(lw: LazyWeight, use: str) -> Exception:
    """A mixture of adapters used where its per-token gates have no form."""
    return error(lw.path, f"lj.apply_mixture gates a weight per token in matmuls of its "
                          f"input only; the model uses this one in {use}",
                 "leave this path out of the adapter set (build the adapters with "
                 "LoraConfig(exclude=...)), or serve one adapter at a time with lj.apply")


def _feature_labels(y_ndim: int, feat: int) -> list:
    """Labels of a conv/gather result: the weight's one output axis at ``feat``."""
    labels: list = [None] * y_ndim
    labels[feat] = (B, 0)
    return labels


def dora_scaled(lw: LazyWeight, y, labels):
    """``y`` (axes labelled ``labels``) times DoRA's ``g``; unchanged without DoRA."""
    if lw.g is None:
        return y
    return (y * lw.g_along(labels).astype(y.dtype)).astype(y.dtype)


def lowrank_gather(lw: LazyWeight, indices, *, params):
    """``(W + s a b)[ids]`` as ``W[ids] + s a[ids] b``; raises `NotLowRank`.

    The embedding lookup: rows (``A`` axes) are gathered from ``a``, then
    multiplied by ``b``. Needs one ``B`` axis, taken whole by every slice.
    """
    if lw.router is not None:
        raise _mixture_error(lw, "a row lookup (an embedding: its input is an index, not a "
                                 "vector a router can read)")
    gdn = params["dimension_numbers"]
    sizes = tuple(params["slice_sizes"])
    if lw.count(S) or lw.count(B) != 1 or gdn.operand_batching_dims:
        raise NotLowRank("a gather from a stacked weight or one with several output axes")
    bpos = lw.dims.index((B, 0))
    # The output axis must be taken whole by every slice (an index into it, as a
    # vmapped row lookup writes, can then only be 0).
    if sizes[bpos] != lw.shape[bpos] or bpos in gdn.collapsed_slice_dims:
        raise NotLowRank("the gather slices the weight's output axis (not a row lookup)")
    kw = dict(dimension_numbers=gdn, indices_are_sorted=params["indices_are_sorted"],
              unique_indices=params["unique_indices"], mode=params["mode"],
              fill_value=params["fill_value"])
    base = lax.gather(lw.frozen(), indices, slice_sizes=sizes, **kw)
    out_dtype = base.dtype
    acc = _acc_dtype(out_dtype, lw.a.dtype)
    r = lw.a.shape[-1]
    table_labels = [lab if lab[0] == A else "r" for lab in lw.dims]
    table = transpose_to(lw.a, factor_labels(lw, True), table_labels)
    t = lax.gather(table, indices, slice_sizes=sizes[:bpos] + (r,) + sizes[bpos + 1:], **kw)
    kept = [i for i in range(lw.ndim) if i not in gdn.collapsed_slice_dims]
    feat = gdn.offset_dims[kept.index(bpos)]
    b = lw.b * lw.scale.astype(lw.b.dtype)
    d = lax.dot_general(t, b, (((feat,), (0,)), ((), ())),
                        preferred_element_type=lw.a.dtype)
    d = jnp.moveaxis(d, -1, feat)
    return dora_scaled(lw, (base.astype(acc) + d.astype(acc)).astype(out_dtype),
                        _feature_labels(y_ndim=base.ndim, feat=feat))


def lowrank_ragged_dot(x, lw: LazyWeight, group_sizes, *, params, lora_input=None):
    """``ragged_dot(x, W + s a b, sizes)`` as ``ragged_dot(x, W) + s ragged_dot(ragged_dot(x,
    a), b)``, all grouped by the same ``sizes``; raises `NotLowRank`.

    An MoE layer's experts, stacked ``W: (E, in, out)`` and run on tokens sorted
    by expert (``lax.ragged_dot``), with per-expert factors ``a: (E, in, r)``,
    ``b: (E, r, out)``: each token meets its own expert's adapter, at ``2 r
    (in + out)`` FLOPs per token. Needs ``lax.ragged_dot``'s form -- tokens
    ``(m, k)`` ragged along axis 0, the weight's group axis its stacked axis,
    one contracted axis (input or output: a transposed weight works) -- and
    no ``group_offset``; DoRA is not low-rank here.
    """
    if lw.router is not None:
        raise _mixture_error(lw, "a grouped matmul (lax.ragged_dot: MoE experts)")
    dn = params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = dn.dot_dimension_numbers
    if (x.ndim != 2 or lw.ndim != 3 or lb or rb or tuple(lc) != (1,) or len(rc) != 1
            or tuple(dn.lhs_ragged_dimensions) != (0,) or len(dn.rhs_group_dimensions) != 1
            or params.get("group_offset") is not None):
        raise NotLowRank("a ragged_dot_general other than lax.ragged_dot's (tokens, k) x "
                         "(groups, k, n) form")
    gdim, cdim = dn.rhs_group_dimensions[0], rc[0]
    fdim = ({0, 1, 2} - {gdim, cdim}).pop()
    kinds = (lw.dims[gdim][0], lw.dims[cdim][0], lw.dims[fdim][0])
    if kinds not in ((S, A, B), (S, B, A)):
        raise NotLowRank("the ragged_dot's group axis is not the weight's stacked axis, or "
                         "it does not contract the input (or the output) axis")
    if lw.g is not None:
        raise NotLowRank("DoRA on a ragged_dot (its column norm per expert has no grouped form)")
    first_is_a = kinds[1] == A
    lw = lw.canonical()
    b = lw.b * lw.scale.astype(lw.b.dtype)
    f1, f2 = (lw.a, b) if first_is_a else (jnp.swapaxes(b, 1, 2), jnp.swapaxes(lw.a, 1, 2))
    out_dtype = _out_dtype(params["preferred_element_type"], x.dtype, lw.dtype)
    acc = _acc_dtype(out_dtype, f1.dtype)
    precision = params["precision"]
    base = lax.ragged_dot_general(
        x, lw.frozen(), group_sizes, dn, precision=precision,
        preferred_element_type=acc if acc != out_dtype else params["preferred_element_type"])
    xl = (x if lora_input is None else lora_input(x)).astype(f1.dtype)
    t = lax.ragged_dot(xl, f1, group_sizes, precision=precision,
                       preferred_element_type=f1.dtype)
    d = lax.ragged_dot(t, f2, group_sizes, precision=precision,
                       preferred_element_type=f1.dtype)
    return (base.astype(acc) + d.astype(acc)).astype(out_dtype)
