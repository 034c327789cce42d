"""The rules table of the `lj.apply` interpreter: one entry per primitive.

`RULES` maps each primitive (by identity, from `jax.extend.core.primitives`)
to ``rule(trace, eqn, invals) -> outputs``; a rule raises `NotLowRank` when
its use of a `LazyWeight` has no low-rank form (the interpreter then
materializes, and says why with `FALLBACK_WHY`). Shape-only ops are pushed
into the factors; products go to `lora_jax._apply.lowrank`; ``jit`` bodies
are inlined, ``remat`` re-wrapped with the same policy, ``scan`` rebuilt with
the sliced factors as extra ``xs``, ``cond`` rebuilt branch by branch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from lora_jax._apply.interp import bind, densify_output, evaluate, is_lazy
from lora_jax._apply.lazy import NotLowRank, S
from lora_jax._apply.lowrank import (
    lowrank_conv,
    lowrank_dot,
    lowrank_dot_shared,
    lowrank_gather,
    lowrank_ragged_dot,
)
from lora_jax._apply.prims import ragged_dot_p

__all__ = ["RULES", "SHARED", "FALLBACK_WHY"]


FALLBACK_WHY = {
    P.custom_jvp_call_p: "passed into a jax.custom_jvp function, whose derivative rule "
                         "needs the dense weight",
    P.custom_vjp_call_p: "passed into a jax.custom_vjp function, whose derivative rule "
                         "needs the dense weight",
    P.while_p: "used inside a while_loop/fori_loop (no low-rank rule for loops with a "
               "traced trip count)",
    P.dot_general_p: "both operands are adapted weights",
}


# ----------------------------------------------------------------------------- shape-only rules


def _one(fn: Callable) -> Callable:
    """A rule for a unary shape op: ``fn(lazy_weight, eqn_params) -> LazyWeight``."""
    def rule(trace, eqn, invals):
        if len([v for v in invals if is_lazy(v)]) != 1 or not is_lazy(invals[0]):
            raise NotLowRank("the weight is not the operand being reshaped")
        return [fn(invals[0], eqn.params, invals[1:])]
    return rule


def _reshape(lw, p, rest):
    if p.get("dimensions") is not None or rest:
        raise NotLowRank("reshape with a dimension order or dynamic shape")
    return lw.reshape(p["new_sizes"])


def _split(trace, eqn, invals):
    (lw,) = invals
    axis, sizes = eqn.params["axis"], eqn.params["sizes"]
    outs, start = [], 0
    for n in sizes:
        starts = [0] * lw.ndim
        limits = list(lw.shape)
        starts[axis], limits[axis] = start, start + int(n)
        outs.append(lw.window(starts, limits))
        start += int(n)
    return outs


def _sharding_constraint(trace, eqn, invals):
    # The frozen weight keeps its constraint; the small factors are left to XLA.
    (lw,) = invals
    return [lw._with(lambda w: bind(eqn, [w])[0])]


RULES: dict = {
    P.transpose_p: _one(lambda lw, p, _: lw.transpose(p["permutation"])),
    P.reshape_p: _one(_reshape),
    P.squeeze_p: _one(lambda lw, p, _: lw.squeeze(p["dimensions"])),
    P.convert_element_type_p: _one(lambda lw, p, _: lw.astype(p["new_dtype"])),
    P.copy_p: _one(lambda lw, p, _: lw),
    P.broadcast_in_dim_p: _one(
        lambda lw, p, rest: lw.broadcast(p["shape"], p["broadcast_dimensions"])),
    P.slice_p: _one(
        lambda lw, p, _: lw.window(p["start_indices"], p["limit_indices"], p["strides"])),
    P.dynamic_slice_p: _one(lambda lw, p, starts: lw.dynamic_window(starts, p["slice_sizes"])),
    P.sharding_constraint_p: _sharding_constraint,
    P.rev_p: _one(lambda lw, p, _: lw.rev(p["dimensions"])),
}
# `split` is exported by jax.lax, not by jax.extend.core.primitives.
if getattr(lax, "split_p", None) is not None:
    RULES[lax.split_p] = _split


# ----------------------------------------------------------------------------- products


def _dot(trace, eqn, invals):
    lhs, rhs = invals
    if is_lazy(lhs) and is_lazy(rhs):
        raise NotLowRank("both operands of the matmul are adapted weights")
    x_is_lhs = is_lazy(rhs)
    x, lw = (lhs, rhs) if x_is_lhs else (rhs, lhs)
    p = eqn.params
    out = lowrank_dot(x, lw, x_is_lhs=x_is_lhs, dimension_numbers=p["dimension_numbers"],
                      precision=p["precision"],
                      preferred_element_type=p["preferred_element_type"],
                      out_sharding=p.get("out_sharding"), lora_input=trace.lora_input,
                      custom_grad=trace.custom_grad)
    trace.took(lw.path, "lowrank_dot")
    return [out]


def _dot_shared(traces, eqns, invals_list) -> list:
    """Matmuls of one plain ``x`` with several adapted weights (q, k, v): `lowrank_dot_shared`.

    Returns each equation's outputs, or None for one left to `_dot`. Not
    with dropout (each projection draws its own mask, as PEFT's do) or
    ``custom_grad=False``.
    """
    trace = traces[0]
    if trace.dropout_active or not trace.custom_grad:
        return [None] * len(eqns)
    x = next(v for v in invals_list[0] if not is_lazy(v))
    uses, where = [], []
    for k, (eqn, (lhs, rhs)) in enumerate(zip(eqns, invals_list, strict=True)):
        if lhs is x and is_lazy(rhs):
            p = eqn.params
            uses.append((rhs, p["dimension_numbers"], p["precision"],
                         p["preferred_element_type"], p.get("out_sharding")))
            where.append(k)
    outs = lowrank_dot_shared(x, uses) if len(uses) > 1 else [None] * len(uses)
    result: list = [None] * len(eqns)
    for k, (lw, *_), y in zip(where, uses, outs, strict=True):
        if y is not None:
            traces[k].took(lw.path, "lowrank_dot")
            result[k] = [y]
    return result


def _conv(trace, eqn, invals):
    x, lw = invals
    if is_lazy(x) or not is_lazy(lw):
        raise NotLowRank("the adapted weight is the convolution's input, not its kernel")
    out = lowrank_conv(x, lw, params=eqn.params, lora_input=trace.lora_input)
    trace.took(lw.path, "lowrank_conv")
    return [out]


def _gather(trace, eqn, invals):
    lw, idx = invals
    if is_lazy(idx) or not is_lazy(lw):
        raise NotLowRank("the adapted weight is used as gather indices")
    if lw.count(S):      # W[ids] of a stacked (expert) weight: still a lazy weight
        return [lw.take_stacked(idx, eqn.params)]
    out = lowrank_gather(lw, idx, params=eqn.params)
    trace.took(lw.path, "lowrank_gather")
    return [out]


def _ragged_dot(trace, eqn, invals):
    x, lw, sizes = invals
    if is_lazy(x) or is_lazy(sizes) or not is_lazy(lw):
        raise NotLowRank("the adapted weight is the ragged_dot's tokens, not its grouped weight")
    out = lowrank_ragged_dot(x, lw, sizes, params=eqn.params, lora_input=trace.lora_input)
    trace.took(lw.path, "lowrank_ragged_dot")
    return [out]


RULES[P.dot_general_p] = _dot
# Rules for several equations of one primitive sharing an operand (`evaluate`).
SHARED: dict = {P.dot_general_p: _dot_shared}
RULES[P.conv_general_dilated_p] = _conv
RULES[P.gather_p] = _gather
RULES[ragged_dot_p] = _ragged_dot


# ----------------------------------------------------------------------------- control flow


def _inline(param: str):
    def rule(trace, eqn, invals):
        body = eqn.params[param]
        if isinstance(body, jcore.ClosedJaxpr):
            return evaluate(trace, body.jaxpr, body.consts, invals)
        return evaluate(trace, body, (), invals)
    return rule


RULES[P.jit_p] = _inline("jaxpr")
RULES[P.closed_call_p] = _inline("call_jaxpr")
RULES[P.call_p] = _inline("call_jaxpr")


class _Flat:
    """Lazy values flattened into arrays (to cross a jax transformation)."""

    def __init__(self, vals):
        self.templates, self.arrays = [], []
        for v in vals:
            if is_lazy(v):
                self.templates.append((len(self.arrays), v))
                self.arrays.extend(v.arrays())
            else:
                self.templates.append((len(self.arrays), None))
                self.arrays.append(v)

    def rebuild(self, arrays) -> list:
        out = []
        for start, tmpl in self.templates:
            if tmpl is None:
                out.append(arrays[start])
            else:
                out.append(tmpl.rebuild(arrays[start:start + len(tmpl.arrays())]))
        return out


def _body_fn(trace, closed, flat: _Flat, where: str):
    """``f(*arrays, [key]) -> outputs`` evaluating ``closed`` on rebuilt values."""
    jaxpr, consts = (closed.jaxpr, closed.consts) if isinstance(closed, jcore.ClosedJaxpr) \
        else (closed, ())

    def f(*arrays):
        key = arrays[-1] if trace.dropout_active else None
        arrays = arrays[:-1] if trace.dropout_active else arrays
        sub = trace.child(key)
        outs = evaluate(sub, jaxpr, consts, flat.rebuild(list(arrays)))
        return [densify_output(sub, o, where) for o in outs]
    return f


def _remat(trace, eqn, invals):
    p = eqn.params
    flat = _Flat(invals)
    extra = [trace.next_key()] if trace.dropout_active else []
    f = _body_fn(trace, p["jaxpr"], flat, "remat body")
    return jax.checkpoint(f, prevent_cse=p["prevent_cse"], policy=p["policy"])(
        *flat.arrays, *extra)


def _cond(trace, eqn, invals):
    index, ops = invals[0], invals[1:]
    flat = _Flat(ops)
    extra = [trace.next_key()] if trace.dropout_active else []
    branches = [_body_fn(trace, br, flat, "cond branch") for br in eqn.params["branches"]]
    return lax.switch(index, branches, *flat.arrays, *extra)


def _scan(trace, eqn, invals):
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, carry, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
    carry = [densify_output(trace, c, "scan carry") if is_lazy(c) else c for c in carry]
    # A stacked weight scanned over: its w, a, b travel as xs (sliced per
    # layer); its scale is the same every layer, so it is a constant.
    xs_plain, xs_lazy, scanned = [], [], []
    for i, x in enumerate(xs):
        if is_lazy(x):
            try:
                x = x.unstack_leading()
            except NotLowRank as e:
                x = trace.fallback(x, "scan", str(e))
        if is_lazy(x):
            # sliced per layer: w, a, b (and DoRA's g); not the scale (index 3)
            scanned.append((i, x, len(xs_lazy)))
            xs_lazy.extend(v for k, v in enumerate(x.arrays()) if k != 3)
        else:
            xs_plain.append(x)
    c_flat = _Flat(consts)
    scales = [x.scale for _, x, _ in scanned]
    keys = [jax.random.split(trace.next_key(), p["length"])] if trace.dropout_active else []
    closed = p["jaxpr"]

    def body(carry_vals, x_arrays):
        x_arrays = list(x_arrays)
        key = x_arrays.pop() if keys else None
        plain, lazy = x_arrays[:len(xs_plain)], x_arrays[len(xs_plain):]
        xs_vals, it_plain = [], iter(plain)
        by_pos = {i: (j, lw, at) for j, (i, lw, at) in enumerate(scanned)}
        for i in range(len(xs)):
            if i in by_pos:
                j, lw, at = by_pos[i]
                w, a, b, *g = lazy[at: at + len(lw.arrays()) - 1]
                xs_vals.append(lw.sliced_leading().rebuild([w, a, b, scales[j], *g]))
            else:
                xs_vals.append(next(it_plain))
        sub = trace.child(key)
        outs = evaluate(sub, closed.jaxpr, closed.consts,
                        c_flat.rebuild(c_flat.arrays) + list(carry_vals) + xs_vals)
        outs = [densify_output(sub, o, "scan body") for o in outs]
        return outs[:ncar], outs[ncar:]

    carry_out, ys = lax.scan(body, list(carry), xs_plain + xs_lazy + keys, length=p["length"],
                             reverse=p["reverse"], unroll=p["unroll"],
                             _split_transpose=p.get("_split_transpose", False))
    return list(carry_out) + list(ys)


RULES[P.remat_p] = _remat
RULES[P.cond_p] = _cond
RULES[P.scan_p] = _scan
