"""Reading each adapted weight's layout from the program that uses it.

A weight's `Layout` says which of its axes are stacked copies (``S``: one
adapter per layer of an ``nn.scan`` stack), which are contracted with the
layer's input (``A``) and which the layer produces (``B``). The program
knows all of it: a ``scan`` slices the stacked axes, a ``dot_general``
contracts the input axes and keeps the output axes (or the other way round,
for a tied embedding used as the output projection), a convolution's kernel
spec names its spatial, input and output features, an embedding lookup
indexes rows. `infer_jaxpr` walks a jaxpr following every targeted weight
through the shape-only ops `lj.apply` follows (transpose, reshape, casts,
slices, ``jit``, ``remat``, ``scan``, ``cond``) and collects one fact per
use; `solve` turns the facts of one weight into a `Layout` (any axis order)
or says which two uses contradict each other.

Nothing is computed: the program is traced abstractly (`jax.make_jaxpr` on
``ShapeDtypeStruct`` values), so reading a 7B model's layouts costs a trace.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from lora_jax._apply.lazy import A, B, S, reshape_blocks
from lora_jax._apply.prims import ragged_dot_p
from lora_jax._core.config import Layout
from lora_jax._core.errors import error

__all__ = ["Facts", "Inferred", "infer_jaxpr", "solve", "roles", "layout_text", "check_layouts",
           "probe_for"]


class _Probe(NamedTuple):
    """A targeted weight in the current view: per view axis, the weight's axes it holds."""

    path: str
    axes: tuple     # one frozenset of original axes per view axis (empty: a new axis)
    shape: tuple    # the view's shape
    # W[ids] of a weight with >= 3 axes, not yet read: an expert gather when a product
    # takes the result as its weight, a row lookup (an embedding) for any other use
    lookup: tuple | None = None     # (desc, batching, rows, whole) original axes


@dataclasses.dataclass
class Facts:
    """What the program does with one weight (see the module doc)."""

    shape: tuple
    pins: dict = dataclasses.field(default_factory=dict)      # axis -> {role: use}
    dots: list = dataclasses.field(default_factory=list)      # (contracted, free, use)
    opaque: list = dataclasses.field(default_factory=list)    # uses with no low-rank form
    bad: list = dataclasses.field(default_factory=list)       # uses no layout can express
    uses: list = dataclasses.field(default_factory=list)      # every use, described
    lookups: int = 0      # row lookups (an embedding)
    products: int = 0     # matmuls (an embedding used as the output projection too: tied)

    def pin(self, axes, role: str, use: str) -> None:
        for ax in axes:
            self.pins.setdefault(ax, {}).setdefault(role, use)


class Inferred(NamedTuple):
    """The outcome of `solve` for one weight."""

    layout: Layout | None   # None: the program gives no layout (see ``why``)
    why: str                # how it was read, or why it could not be
    conflict: bool          # True: two uses contradict each other (``why`` names both)


# ----------------------------------------------------------------------------- the walk


def _origs(probe: _Probe, view_axes) -> frozenset:
    out: frozenset = frozenset()
    for i in view_axes:
        out |= probe.axes[i]
    return out


def _axes_str(axes) -> str:
    return "axis " + str(sorted(axes)[0]) if len(axes) == 1 else \
        "axes (" + ", ".join(map(str, sorted(axes))) + ")"


def _reshape(probe: _Probe, new_shape, facts: Facts, use: str):
    blocks = reshape_blocks(probe.shape, tuple(new_shape))
    if blocks is None:
        facts.opaque.append(use)
        return None
    axes: list = [frozenset()] * len(new_shape)
    for olds, news in blocks:
        merged = _origs(probe, olds)
        for j in news:
            axes[j] = merged if new_shape[j] != 1 else frozenset()
    return probe._replace(axes=tuple(axes), shape=tuple(new_shape))


def _squeeze(probe: _Probe, dims, facts: Facts, use: str):
    dims = {int(d) % len(probe.shape) for d in dims}
    for d in dims:
        origs = probe.axes[d]
        if origs and any(facts.shape[o] > 1 for o in origs):
            # a size-1 slice of a real axis, dropped: one index of it (W[i])
            facts.pin(origs, S, f"{use} (indexes {_axes_str(origs)})")
    keep = [i for i in range(len(probe.shape)) if i not in dims]
    return probe._replace(axes=tuple(probe.axes[i] for i in keep),
                          shape=tuple(probe.shape[i] for i in keep))


def _per_token_weight(probe: _Probe, batch) -> bool:
    """Whether gathered rows ``W[ids]`` enter a product as a per-token weight: it batches
    over the index axes (einsum ``"td,tdf->tf"``). Rows used as activations keep them
    free (an embedding lookup)."""
    index_axes = [i for i, ax in enumerate(probe.axes) if not ax]
    return bool(index_axes) and all(i in batch for i in index_axes)


def _dot(eqn, probes, facts_of, use):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    probes = list(probes)
    for side, batch in ((0, lb), (1, rb)):
        p = probes[side]
        if p is not None and p.lookup is not None and not _per_token_weight(p, batch):
            _settle(p, facts_of)          # looked-up rows used as activations
            probes[side] = None
    if probes[0] is None and probes[1] is None:
        return
    if probes[0] is not None and probes[1] is not None:
        for p in probes:
            facts_of[p.path].opaque.append(f"{use} (both operands are adapted weights)")
        return
    side = 0 if probes[0] is not None else 1
    probe = probes[side]
    contract, batch = (lc, lb) if side == 0 else (rc, rb)
    if probe.lookup is not None:
        _expert_gather(probe.lookup, facts_of[probe.path], use)
    free = [i for i in range(len(probe.shape)) if i not in contract and i not in batch]
    c, b, f = _origs(probe, contract), _origs(probe, batch), _origs(probe, free)
    facts = facts_of[probe.path]
    if (c & f) or (c & b) or (b & f):
        facts.bad.append(f"{use} uses one axis of the weight both as a contracted and a "
                         f"kept axis (a reshape splits it)")
        return
    desc = f"{use} contracting {_axes_str(c)}" + (f", batch over {_axes_str(b)}" if b else "")
    facts.uses.append(desc)
    facts.pin(b, S, desc)
    facts.products += 1
    if c or f:
        facts.dots.append((c, f, desc))


def _conv(eqn, probes, facts_of, use):
    for p in probes:
        _settle(p, facts_of)
    if probes[0] is not None:
        facts_of[probes[0].path].opaque.append(f"{use} (the weight is the convolution input)")
    probe = probes[1]
    if probe is None:
        return
    facts = facts_of[probe.path]
    p = eqn.params
    if p["batch_group_count"] != 1:
        facts.opaque.append(f"{use} (batch-grouped convolution)")
        return
    rhs = p["dimension_numbers"].rhs_spec      # (out feature, in feature, *spatial)
    out, ins = probe.axes[rhs[0]], _origs(probe, rhs[1:])
    desc = f"{use} (kernel: output features {_axes_str(out)})"
    facts.uses.append(desc)
    facts.pin(ins, A, desc)
    facts.pin(out, B, desc)


def _gather(eqn, probes, facts_of, use):
    """Facts of a gather from the weight; an output probe for ``W[ids]`` of a weight
    with >= 3 axes, whose meaning its next use decides (`_settle`)."""
    if probes[1] is not None:
        facts_of[probes[1].path].opaque.append(f"{use} (the weight is used as indices)")
    probe = probes[0]
    if probe is None:
        return None
    facts = facts_of[probe.path]
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    batching = set(dn.operand_batching_dims)
    rows, whole = [], []
    for i, n in enumerate(probe.shape):
        if i in batching:
            continue
        if i in dn.start_index_map and sizes[i] == 1:
            rows.append(i)
        elif sizes[i] == n:      # taken whole (an index into it can only be 0)
            whole.append(i)
        else:
            facts.opaque.append(f"{use} (a window of the weight, not whole rows)")
            return None
    desc = f"{use} (row lookup over {_axes_str(_origs(probe, rows))})"
    lookup = (desc, _origs(probe, batching), _origs(probe, rows), _origs(probe, whole))
    if (len(probe.shape) >= 3 and len(rows) == 1 and not batching and probe.lookup is None
            and tuple(dn.collapsed_slice_dims) == tuple(rows)):
        out_axes: list = [frozenset()] * len(eqn.outvars[0].aval.shape)
        for j, i in zip(dn.offset_dims, whole, strict=True):
            out_axes[j] = probe.axes[i]
        return probe._replace(axes=tuple(out_axes), shape=tuple(eqn.outvars[0].aval.shape),
                              lookup=lookup)
    _commit_lookup(facts, lookup)
    return None


def _commit_lookup(facts: Facts, lookup) -> None:
    desc, batching, rows, whole = lookup
    facts.uses.append(desc)
    facts.lookups += 1
    facts.pin(batching, S, desc)
    facts.pin(rows, A, desc)
    facts.pin(whole, B, desc)


def _settle(probe: _Probe | None, facts_of) -> bool:
    """A gathered weight used other than as a product's weight: it was a row lookup.
    True when ``probe`` was such a gather (its use is then not opaque)."""
    if probe is None or probe.lookup is None:
        return False
    _commit_lookup(facts_of[probe.path], probe.lookup)
    return True


def _expert_gather(lookup: tuple, facts: Facts, use: str) -> None:
    """``W[ids]`` whose result a product takes as its weight: the indexed axis holds
    the experts (stacked), one slice per token."""
    desc, _, rows, _ = lookup
    facts.pin(rows, S, f"{desc}, then {use} (an expert gather)")


def _ragged_dot(eqn, probes, facts_of, use):
    """``lax.ragged_dot``'s grouped weight: the group axis holds the experts (stacked),
    the contracted axis is the input (or, transposed, the output) side."""
    if probes[0] is not None:
        _settle(probes[0], facts_of)
        facts_of[probes[0].path].opaque.append(f"{use} (the weight is the ragged operand)")
    probe = probes[1]
    if probe is None:
        return
    _settle(probe, facts_of)
    facts = facts_of[probe.path]
    dn = eqn.params["ragged_dot_dimension_numbers"]
    (_, rc), (_, rb) = dn.dot_dimension_numbers
    groups = tuple(dn.rhs_group_dimensions)
    free = [i for i in range(len(probe.shape)) if i not in rc and i not in rb
            and i not in groups]
    g, c, f = _origs(probe, groups), _origs(probe, rc), _origs(probe, free)
    desc = f"{use} over groups {_axes_str(g)} contracting {_axes_str(c)}"
    facts.uses.append(desc)
    facts.pin(g | _origs(probe, rb), S, desc)
    facts.products += 1
    if c or f:
        facts.dots.append((c, f, desc))


def _shape_op(eqn, probe: _Probe, facts: Facts, use: str):
    """The output probe of a one-operand shape-only op, or None (then opaque)."""
    prim, p = eqn.primitive, eqn.params
    if prim in (P.convert_element_type_p, P.copy_p, P.sharding_constraint_p,
                P.reduce_precision_p, P.slice_p, P.dynamic_slice_p, P.rev_p):
        if prim is P.convert_element_type_p and not _is_float(p["new_dtype"]):
            facts.opaque.append(f"{use} (a cast to {p['new_dtype']})")
            return None
        return probe._replace(shape=tuple(eqn.outvars[0].aval.shape))
    if prim is P.transpose_p:
        perm = p["permutation"]
        return probe._replace(axes=tuple(probe.axes[i] for i in perm),
                              shape=tuple(probe.shape[i] for i in perm))
    if prim is P.reshape_p:
        if p.get("dimensions") is not None:
            facts.opaque.append(use)
            return None
        return _reshape(probe, p["new_sizes"], facts, use)
    if prim is P.squeeze_p:
        return _squeeze(probe, p["dimensions"], facts, use)
    if probe.lookup is not None:    # a gathered weight is only followed to a product
        return None
    if prim is P.broadcast_in_dim_p:
        axes: list = [frozenset()] * len(p["shape"])
        for i, j in enumerate(p["broadcast_dimensions"]):
            axes[j] = probe.axes[i]
        return probe._replace(axes=tuple(axes), shape=tuple(p["shape"]))
    facts.opaque.append(f"{use} (no low-rank rule)")
    return None


def _is_float(dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating) or np.dtype(dtype).name == "bfloat16"


_OPAQUE_CALLS = {
    P.custom_jvp_call_p: "a jax.custom_jvp function",
    P.custom_vjp_call_p: "a jax.custom_vjp function",
    P.while_p: "a while_loop/fori_loop",
}


def _closed(j):
    return (j.jaxpr, j.consts) if isinstance(j, jcore.ClosedJaxpr) else (j, ())


def infer_jaxpr(jaxpr, inputs: dict, facts_of: dict, *, where: str = "") -> list:
    """Walks ``jaxpr``; ``inputs`` maps invar positions to `_Probe`s. Facts are
    added to ``facts_of[path]``; returns the probes of the outputs (None where none)."""
    env: dict = {}
    for i, v in enumerate(jaxpr.invars):
        if i in inputs:
            env[v] = inputs[i]
    for eqn in jaxpr.eqns:
        probes = [env.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
        if all(p is None for p in probes):
            continue
        use = f"`{eqn.primitive.name}`" + (f" in {where}" if where else "")
        outs = _eqn(eqn, probes, facts_of, use, where)
        for v, o in zip(eqn.outvars, outs, strict=False):
            if o is not None:
                env[v] = o
    outs = [env.get(v) if isinstance(v, jcore.Var) else None for v in jaxpr.outvars]
    return [None if _settle(o, facts_of) else o for o in outs]


def _products(fn):
    """A rule for a product: it records facts and has no lazy outputs."""
    def rule(eqn, probes, facts_of, use, where):
        fn(eqn, probes, facts_of, use)
        return [None] * len(eqn.outvars)
    return rule


def _call(eqn, probes, facts_of, use, where):
    body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return infer_jaxpr(_closed(body)[0], dict(enumerate(probes)), facts_of, where=where or use)


def _cond(eqn, probes, facts_of, use, where):
    ops = {i - 1: p for i, p in enumerate(probes) if i > 0 and p is not None}
    for br in eqn.params["branches"]:
        infer_jaxpr(_closed(br)[0], ops, facts_of, where=where or use)
    return [None] * len(eqn.outvars)


def _split(eqn, probes, facts_of, use, where):
    if probes[0] is None:
        return _opaque(eqn, probes, facts_of, use, where)
    return [probes[0]._replace(shape=tuple(v.aval.shape)) for v in eqn.outvars]


def _opaque_call(eqn, probes, facts_of, use, where):
    for p in probes:
        if p is not None:
            facts_of[p.path].opaque.append(f"{use} (passed into {_OPAQUE_CALLS[eqn.primitive]})")
    return [None] * len(eqn.outvars)


def _opaque(eqn, probes, facts_of, use, where):
    for p in probes:
        if p is not None and not _settle(p, facts_of):
            facts_of[p.path].opaque.append(f"{use} (no low-rank rule)")
    return [None] * len(eqn.outvars)


def _eqn(eqn, probes, facts_of, use, where) -> list:
    rule = _RULES.get(eqn.primitive)
    if rule is not None:
        return rule(eqn, probes, facts_of, use, where)
    # a one-operand op on the weight (the other inputs are literals or other values)
    live = [p for p in probes if p is not None]
    if probes[0] is not None and len(live) == 1:
        gathered = probes[0].lookup is not None
        out = _shape_op(eqn, probes[0], Facts(()) if gathered else facts_of[probes[0].path],
                        use)
        if out is None and gathered:      # gathered rows used as values: an embedding
            _settle(probes[0], facts_of)
        return [out] + [None] * (len(eqn.outvars) - 1)
    return _opaque(eqn, probes, facts_of, use, where)


def _scan(eqn, probes, facts_of, use, where) -> list:
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    inner = {}
    for i, probe in enumerate(probes):
        if probe is None:
            continue
        facts = facts_of[probe.path]
        if nc <= i < nc + ncar:
            facts.opaque.append(f"{use} (the weight is carried through the scan)")
            continue
        if i >= nc + ncar:     # xs: sliced along view axis 0, one slice per iteration
            origs = probe.axes[0]
            desc = f"{use} over {_axes_str(origs)}"
            facts.uses.append(desc)
            facts.pin(origs, S, desc)
            probe = probe._replace(axes=probe.axes[1:], shape=probe.shape[1:])
        inner[i] = probe
    body, _ = _closed(p["jaxpr"])
    outs = infer_jaxpr(body, inner, facts_of, where=f"{use} body")
    for o in outs:
        if o is not None:
            facts_of[o.path].opaque.append(f"{use} (the weight is an output of the body)")
    return [None] * len(eqn.outvars)


_RULES = {
    P.dot_general_p: _products(_dot),
    P.conv_general_dilated_p: _products(_conv),
    P.gather_p: lambda eqn, probes, facts_of, use, where:
        [_gather(eqn, probes, facts_of, use)] + [None] * (len(eqn.outvars) - 1),
    P.jit_p: _call, P.closed_call_p: _call, P.call_p: _call, P.remat_p: _call,
    P.scan_p: _scan,
    P.cond_p: _cond,
    **{prim: _opaque_call for prim in _OPAQUE_CALLS},
}
if getattr(lax, "split_p", None) is not None:
    _RULES[lax.split_p] = _split
_RULES[ragged_dot_p] = _products(_ragged_dot)


def probe_for(path: str, shape) -> _Probe:
    """The probe of a weight as the program receives it."""
    return _Probe(path, tuple(frozenset([i]) for i in range(len(shape))), tuple(shape))


# ----------------------------------------------------------------------------- solving


class _Parity:
    """Union-find with parity: which axes are on the same side (input or output)."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, (x, 0))
        root, par = self.parent[x]
        if root == x:
            return x, 0
        r, p = self.find(root)
        self.parent[x] = (r, par ^ p)
        return r, par ^ p

    def union(self, x, y, odd: int) -> bool:
        (rx, px), (ry, py) = self.find(x), self.find(y)
        if rx == ry:
            return (px ^ py) == odd
        self.parent[rx] = (ry, px ^ py ^ odd)
        return True


class _Contradiction(Exception):
    """Two uses of one weight that no layout satisfies (the message names both)."""


def _pinned_roles(facts: Facts) -> dict:
    """``{axis: role}`` from scans, batch axes, kernels and row lookups."""
    out = {}
    for ax, pins in facts.pins.items():
        if len(pins) > 1:
            (r1, u1), (r2, u2) = list(pins.items())[:2]
            raise _Contradiction(f"axis {ax} is {_ROLE[r1]} for {u1} but {_ROLE[r2]} for {u2}")
        out[ax] = next(iter(pins))
    return out


def _relate_products(facts: Facts, pinned: dict):
    """Union-find of the products' relations: contracted axes on one side, kept on the other."""
    uf, seed = _Parity(), {}
    for c, f, use in facts.dots:
        for ax in c | f:
            if pinned.get(ax) == S:
                raise _Contradiction(f"axis {ax} is a stacked axis for {facts.pins[ax][S]} but "
                                     f"{use} contracts or keeps it as a matrix axis")
        members = [(ax, 0) for ax in c] + [(ax, 1) for ax in f]
        first, par0 = members[0]
        for ax, par in members[1:]:
            if not uf.union(ax, first, par ^ par0):
                raise _Contradiction(f"{use} contradicts an earlier use of axes "
                                     f"{sorted(c | f)}: " +
                                     "; ".join(u for *_, u in facts.dots[:2]))
        seed.setdefault(uf.find(first)[0], (first, par0))
    return uf, seed


def _orient(facts: Facts, pinned: dict, uf: _Parity, seed: dict) -> dict:
    """Input or output side for every related axis: a pinned member decides, else
    the first product's contracted side is the input side (``x @ W``)."""
    roles, sides = dict(pinned), {}
    for ax in list(uf.parent):
        root, par = uf.find(ax)
        if pinned.get(ax) in (A, B):
            want = 0 if pinned[ax] == A else 1
            if sides.setdefault(root, want ^ par) != want ^ par:
                raise _Contradiction(f"axis {ax} is {_ROLE[pinned[ax]]} for "
                                     f"{facts.pins[ax][pinned[ax]]} but the products make it "
                                     f"the other side")
    for ax in list(uf.parent):
        root, par = uf.find(ax)
        if root not in sides:
            first, par0 = seed[root]
            sides[root] = par0 ^ uf.find(first)[1]
        roles[ax] = A if (sides[root] ^ par) == 0 else B
    return roles


def solve(path: str, facts: Facts) -> Inferred:
    """The layout the uses in ``facts`` imply for one weight, or why there is none."""
    nd = len(facts.shape)
    if facts.bad:
        return Inferred(None, facts.bad[0], True)
    try:
        pinned = _pinned_roles(facts)
        roles = _orient(facts, pinned, *_relate_products(facts, pinned))
    except _Contradiction as e:
        return Inferred(None, str(e), True)
    missing = [ax for ax in range(nd) if ax not in roles]
    if not facts.uses or missing:
        why = facts.opaque[0] if facts.opaque else "the program never uses it"
        if missing and facts.uses:
            why = f"no use reads axis {missing[0]} (uses: {facts.uses[0]})"
        return Inferred(None, why, False)
    order = tuple(ax for role in (S, A, B) for ax in range(nd) if roles[ax] == role)
    counts = [sum(1 for ax in range(nd) if roles[ax] == r) for r in (S, A, B)]
    if counts[1] == 0 or counts[2] == 0:
        return Inferred(None, f"the uses leave no {'input' if not counts[1] else 'output'} "
                              f"axis ({facts.uses[0]})", False)
    layout = Layout(*counts, order=None if order == tuple(range(nd)) else order)
    return Inferred(layout, "; ".join(dict.fromkeys(facts.uses)), False)


_ROLE = {S: "a stacked axis", A: "an input axis", B: "an output axis"}


def roles(layout: Layout, ndim: int) -> tuple:
    """The role (S, A or B) of each axis of a weight with ``layout``."""
    order = layout.order or tuple(range(ndim))
    kinds = [S] * layout.n_stacked + [A] * layout.n_in + [B] * layout.n_out
    out: list = [None] * ndim
    for kind, ax in zip(kinds, order, strict=True):
        out[ax] = kind
    return tuple(out)


def layout_text(layout: Layout, shape) -> str:
    """``lj.Layout(1, 1, 1)`` and what it makes of each axis, for messages."""
    names = {S: "stacked", A: "in", B: "out"}
    axes = ", ".join(f"{names[r]} {n}" for r, n in zip(roles(layout, len(shape)), shape,
                                                        strict=True))
    return f"{_code(layout)} (axes: {axes})"


def _code(layout: Layout) -> str:
    args = f"{layout.n_stacked}, {layout.n_in}, {layout.n_out}"
    return f"lj.Layout({args}" + (f", order={layout.order})" if layout.order else ")")


def _facts_for(jaxpr, targets: dict) -> dict:
    facts = {spec.path: Facts(tuple(spec.shape)) for spec in targets.values()}
    infer_jaxpr(jaxpr, {i: probe_for(spec.path, spec.shape) for i, spec in targets.items()},
                facts)
    return facts


_FIX = ("config = lj.configure(config, fn, params, *example_args) reads every layout from the "
        "program (then lj.init the adapters again), or set LoraConfig.layouts for this path")


def check_layouts(jaxpr, targets: dict, config) -> None:
    """Refuses adapters whose layout contradicts how the program uses their weight.

    ``targets`` maps positions of ``jaxpr``'s inputs to `LeafSpec`s. Layouts
    the user declared (``LoraConfig.layouts``) are trusted; default and
    inferred ones must agree with the program, so an adapter is never
    silently a different LoRA than the one asked for.
    """
    facts = _facts_for(jaxpr, targets)
    for spec in targets.values():
        source, _ = config.layout_source(spec.path)
        if source == "explicit":
            continue
        got = solve(spec.path, facts[spec.path])
        shape = tuple(spec.shape)
        if got.conflict:
            raise error(spec.path, f"the program uses this {shape} weight in ways no single "
                                   f"layout expresses: {got.why}",
                        "declare the layout you want in LoraConfig.layouts (lj.apply then "
                        "computes the other use densely), or exclude the path")
        if got.layout is not None and roles(got.layout, len(shape)) != \
                roles(spec.layout, len(shape)):
            raise error(spec.path, f"the program uses this {shape} weight as "
                                   f"{layout_text(got.layout, shape)} ({got.why}), but its "
                                   f"adapter is factored as {layout_text(spec.layout, shape)} "
                                   f"(the {source} layout): a different LoRA than the "
                                   f"program's", _FIX)
