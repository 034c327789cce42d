"""The jaxpr interpreter behind `lj.apply`.

`evaluate` runs a traced jaxpr on values of which some are `LazyWeight`s.
An equation none of whose inputs is lazy is bound unchanged (through
`jax.extend.core.jaxpr_as_fun` on a one-equation jaxpr, so call-like
primitives get their bind parameters the way JAX's own evaluator gives
them). An equation with a lazy input goes to the rule registered for its
primitive in `RULES` (primitives are compared by identity, as exported by
`jax.extend.core.primitives`); a rule returns the outputs or raises
`NotLowRank`, and then -- or when no rule exists -- the lazy inputs are
materialized for that equation only (`Trace.fallback`).

Control flow: ``jit``/``closed_call`` bodies are evaluated inline;
``remat`` bodies are rewritten and wrapped again in `jax.checkpoint` with
the same policy; ``scan`` is rebuilt with `lax.scan`, the per-layer slices of
stacked factors travelling as extra ``xs``; ``cond`` is rebuilt with
`lax.switch`, each branch rewritten. A lazy value can't leave a rebuilt body
(it is materialized there, and reported).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from lora_jax._apply.lazy import (LazyWeight, NotLowRank, lowrank_conv, lowrank_dot,
                                  lowrank_gather)

__all__ = ["Trace", "Record", "evaluate", "RULES"]


# ----------------------------------------------------------------------------- bookkeeping


@dataclasses.dataclass
class Record:
    """What happened to each targeted leaf during one rewrite.

    Keys of ``rules``/``fallbacks`` are sites (the chain of equations from
    the top-level jaxpr), so a body that JAX traces twice is counted once.
    """

    rules: dict = dataclasses.field(default_factory=dict)      # site -> (path, rule)
    fallbacks: dict = dataclasses.field(default_factory=dict)  # site -> (path, prim, why)

    def rule_counts(self) -> dict:
        out: dict = {}
        for path, rule in self.rules.values():
            out.setdefault(path, Counter())[rule] += 1
        return out

    def fallback_list(self) -> dict:
        out: dict = {}
        for path, prim, why in self.fallbacks.values():
            out.setdefault(path, []).append((prim, why))
        return out


class StrictError(ValueError):
    """Raised under ``strict=True`` where a weight would be materialized."""


class Trace:
    """State of one rewrite: options, the record, the dropout key, the site.

    ``site`` identifies the equation being evaluated (`at`); `child` gives
    the state for a rebuilt body: the same record, its own dropout key and
    counters, so a body that JAX traces again draws the same masks and is
    recorded at the same sites.
    """

    def __init__(self, record: Record, *, strict: bool = False, dropout: float = 0.0,
                 custom_grad: bool = True, key=None, site: tuple = (),
                 counters: list | None = None):
        self.record, self.strict, self.dropout, self.key = record, strict, dropout, key
        self.custom_grad = custom_grad
        self.site = site
        self._counters = [0, 0] if counters is None else counters  # keys drawn, outputs

    @property
    def dropout_active(self) -> bool:
        return self.dropout > 0.0 and self.key is not None

    def at(self, eqn) -> Trace:
        """The same state, positioned at ``eqn`` (counters shared)."""
        return Trace(self.record, strict=self.strict, dropout=self.dropout,
                     custom_grad=self.custom_grad, key=self.key,
                     site=self.site + (id(eqn),), counters=self._counters)

    def child(self, key=None) -> Trace:
        """Fresh state for a rebuilt body at the current site."""
        return Trace(self.record, strict=self.strict, dropout=self.dropout,
                     custom_grad=self.custom_grad, key=key, site=self.site)

    def next_key(self):
        """A fresh key for one dropout site or one rebuilt body."""
        self._counters[0] += 1
        return jax.random.fold_in(self.key, self._counters[0])

    def lora_input(self, x):
        """Dropout on the LoRA branch's input (PEFT's ``B(A(dropout(x)))``)."""
        if not self.dropout_active:
            return x
        keep = 1.0 - self.dropout
        mask = jax.random.bernoulli(self.next_key(), keep, x.shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))

    def took(self, path: str, rule: str):
        self.record.rules[self.site + (path,)] = (path, rule)

    def fallback(self, lw: LazyWeight, prim: str, why: str, *, output: bool = False):
        """Materializes ``lw`` for one use, recording it (or raising if strict)."""
        if self.strict:
            raise StrictError(
                f"{lw.path}: lj.apply(strict=True) refuses to materialize W + scale * a @ b "
                f"at `{prim}`: {why}. Fix: use the weight through a matmul, convolution or "
                f"row lookup the model can express directly; or exclude the path with "
                f"LoraConfig.exclude; or pass strict=False to accept a dense update at this "
                f"use (correct, but not low-rank). lj.explain(...) lists every use.")
        site = self.site + (lw.path,)
        if output:
            self._counters[1] += 1
            site += ("output", self._counters[1])
        self.record.fallbacks[site] = (lw.path, prim, why)
        return lw.materialize()


# ----------------------------------------------------------------------------- evaluation


def _is_lazy(x) -> bool:
    return isinstance(x, LazyWeight)


def bind(eqn, invals) -> list:
    """Evaluates one equation on plain values, as JAX's own evaluator does."""
    args, seen = [], {}
    for v, x in zip(eqn.invars, invals):
        if isinstance(v, jcore.Var) and v not in seen:
            seen[v] = len(args)
            args.append(x)
    info = jcore.DebugInfo("lora_jax.apply", eqn.primitive.name,
                           tuple(f"in{i}" for i in range(len(args))),
                           tuple(f"out{i}" for i in range(len(eqn.outvars))))
    one = jcore.Jaxpr((), list(seen), eqn.outvars, [eqn], eqn.effects, info)
    return list(jcore.jaxpr_as_fun(jcore.ClosedJaxpr(one, ()))(*args))


def evaluate(trace: Trace, jaxpr, consts, args) -> list:
    """Runs ``jaxpr`` on ``args`` (arrays or `LazyWeight`s); returns its outputs."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(_is_lazy(x) for x in invals):
            outs = _apply_rule(trace.at(eqn), eqn, invals)
        else:
            outs = bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _apply_rule(trace: Trace, eqn, invals) -> list:
    rule = RULES.get(eqn.primitive)
    why = _FALLBACK_WHY.get(eqn.primitive, "it has no low-rank rule")
    if rule is not None:
        try:
            return rule(trace, eqn, invals)
        except NotLowRank as e:
            why = str(e)
    return bind(eqn, [_densify(trace, eqn, x, why) for x in invals])


def _densify(trace: Trace, eqn, x, why: str):
    if not _is_lazy(x):
        return x
    return trace.fallback(x, eqn.primitive.name, why)


def densify_output(trace: Trace, x, where: str):
    """A lazy value leaving a function or a rebuilt body must be dense."""
    if not _is_lazy(x):
        return x
    return trace.fallback(x, where, f"the weight itself is an output of the {where}",
                          output=True)


_FALLBACK_WHY = {
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
        if len([v for v in invals if _is_lazy(v)]) != 1 or not _is_lazy(invals[0]):
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
}
# `split` is exported by jax.lax, not by jax.extend.core.primitives.
if getattr(lax, "split_p", None) is not None:
    RULES[lax.split_p] = _split


# ----------------------------------------------------------------------------- products


def _dot(trace, eqn, invals):
    lhs, rhs = invals
    if _is_lazy(lhs) and _is_lazy(rhs):
        raise NotLowRank("both operands of the matmul are adapted weights")
    x_is_lhs = _is_lazy(rhs)
    x, lw = (lhs, rhs) if x_is_lhs else (rhs, lhs)
    p = eqn.params
    out = lowrank_dot(x, lw, x_is_lhs=x_is_lhs, dimension_numbers=p["dimension_numbers"],
                      precision=p["precision"],
                      preferred_element_type=p["preferred_element_type"],
                      out_sharding=p.get("out_sharding"), lora_input=trace.lora_input,
                      custom_grad=trace.custom_grad)
    trace.took(lw.path, "lowrank_dot")
    return [out]


def _conv(trace, eqn, invals):
    x, lw = invals
    if _is_lazy(x) or not _is_lazy(lw):
        raise NotLowRank("the adapted weight is the convolution's input, not its kernel")
    out = lowrank_conv(x, lw, params=eqn.params, lora_input=trace.lora_input)
    trace.took(lw.path, "lowrank_conv")
    return [out]


def _gather(trace, eqn, invals):
    lw, idx = invals
    if _is_lazy(idx) or not _is_lazy(lw):
        raise NotLowRank("the adapted weight is used as gather indices")
    out = lowrank_gather(lw, idx, params=eqn.params)
    trace.took(lw.path, "lowrank_gather")
    return [out]


RULES[P.dot_general_p] = _dot
RULES[P.conv_general_dilated_p] = _conv
RULES[P.gather_p] = _gather


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
            if _is_lazy(v):
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
    carry = [densify_output(trace, c, "scan carry") if _is_lazy(c) else c for c in carry]
    # A stacked weight scanned over: its w, a, b travel as xs (sliced per
    # layer); its scale is the same every layer, so it is a constant.
    xs_plain, xs_lazy, scanned = [], [], []
    for i, x in enumerate(xs):
        if _is_lazy(x):
            try:
                x = x.unstack_leading()
            except NotLowRank as e:
                x = trace.fallback(x, "scan", str(e))
        if _is_lazy(x):
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
