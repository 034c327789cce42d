"""The jaxpr interpreter behind `lj.apply`.

`evaluate` runs a traced jaxpr on values of which some are `LazyWeight`s;
the rules it dispatches to live in `lora_jax._apply.rules` (one table,
given to each `Trace`).
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

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from lora_jax._apply.lazy import LazyWeight, NotLowRank
from lora_jax._core.errors import error

__all__ = ["Trace", "Record", "StrictError", "evaluate", "bind", "densify_output", "is_lazy"]


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

    def __init__(self, record: Record, rules: dict, *, strict: bool = False,
                 dropout: float = 0.0, custom_grad: bool = True, key=None, site: tuple = (),
                 counters: list | None = None, fallback_why: dict | None = None,
                 shared: dict | None = None):
        self.record, self.strict, self.dropout, self.key = record, strict, dropout, key
        self.rules, self.fallback_why = rules, fallback_why or {}
        self.shared = shared or {}
        self.custom_grad = custom_grad
        self.site = site
        self._counters = [0, 0] if counters is None else counters  # keys drawn, outputs

    @property
    def dropout_active(self) -> bool:
        return self.dropout > 0.0 and self.key is not None

    def at(self, eqn) -> Trace:
        """The same state, positioned at ``eqn`` (counters shared)."""
        return Trace(self.record, self.rules, strict=self.strict, dropout=self.dropout,
                     custom_grad=self.custom_grad, key=self.key,
                     site=self.site + (id(eqn),), counters=self._counters,
                     fallback_why=self.fallback_why, shared=self.shared)

    def child(self, key=None) -> Trace:
        """Fresh state for a rebuilt body at the current site."""
        return Trace(self.record, self.rules, strict=self.strict, dropout=self.dropout,
                     custom_grad=self.custom_grad, key=key, site=self.site,
                     fallback_why=self.fallback_why, shared=self.shared)

    def next_key(self):
        """A fresh key for one dropout site or one rebuilt body."""
        if self.key is None:
            raise RuntimeError("lora_jax bug: a dropout key was drawn without lora_rng")
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
            raise error(
                lw.path, f"lj.apply(strict=True) refuses to materialize W + scale * a @ b at "
                         f"`{prim}`: {why} (lj.explain(...) lists every use)",
                "use the weight through a matmul, convolution or row lookup the model can "
                "express directly; or exclude the path with LoraConfig.exclude; or pass "
                "strict=False to accept a dense update at this use (correct, but not "
                "low-rank)", kind=StrictError)
        site = self.site + (lw.path,)
        if output:
            self._counters[1] += 1
            site += ("output", self._counters[1])
        self.record.fallbacks[site] = (lw.path, prim, why)
        return lw.materialize()


# ----------------------------------------------------------------------------- evaluation


def is_lazy(x) -> bool:
    """True for a `LazyWeight` (an adapted weight the interpreter carries)."""
    return isinstance(x, LazyWeight)


def bind(eqn, invals) -> list:
    """Evaluates one equation on plain values, as JAX's own evaluator does."""
    args, seen = [], {}
    for v, x in zip(eqn.invars, invals, strict=True):
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

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    # Products share an input only without dropout (one mask per product) and in
    # the kernel (custom_grad): otherwise nothing is evaluated out of turn.
    sharing = trace.shared if trace.custom_grad and not trace.dropout_active else {}
    siblings = _siblings(jaxpr, sharing)
    producer = {v: k for k, e in enumerate(jaxpr.eqns) for v in e.outvars} if siblings else {}
    done: set = set()

    def run(i: int):
        eqn = jaxpr.eqns[i]
        invals = [read(v) for v in eqn.invars]
        if any(is_lazy(x) for x in invals):
            outs = _apply_rule(trace.at(eqn), eqn, invals)
        else:
            outs = bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
        done.add(i)

    for i in range(len(jaxpr.eqns)):
        if i in done:
            continue
        if i in siblings:
            _run_shared(trace, jaxpr.eqns, i, siblings[i], producer, env, done, run)
            if i in done:
                continue
        run(i)
    return [read(v) for v in jaxpr.outvars]


# The equations a sibling's weight operand may need evaluated ahead of their
# turn (a cast, a reshape of the kernel: DenseGeneral, a compute dtype).
_AHEAD = 4


def _siblings(jaxpr, shared: dict) -> dict:
    """``{i: [j, ...]}``: later equations of eqn i's primitive that share an operand.

    Only primitives with a rule in ``shared`` (`Trace.shared`) count; the
    group is decided when eqn ``i`` is reached (`_run_shared`).
    """
    if not shared:
        return {}
    by_operand: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive in shared:
            for v in eqn.invars:
                if isinstance(v, jcore.Var):
                    by_operand.setdefault((eqn.primitive, v), []).append(i)
    out: dict = {}
    for idx in by_operand.values():
        for n, i in enumerate(idx[:-1]):
            out.setdefault(i, []).extend(j for j in idx[n + 1:] if j not in out.get(i, ()))
    return out


def _run_shared(trace: Trace, eqns, i: int, later: list, producer: dict, env: dict, done: set,
                run) -> None:
    """Evaluates eqn ``i`` together with the later ones that share its plain operand.

    A sibling whose other operand is not computed yet joins if the few
    equations producing it (`_AHEAD`) can run now; they are evaluated ahead
    of their turn (pure, so the order does not matter). The shared rule
    decides who joins; whoever does not is evaluated in its own turn.
    """
    def val(v):
        return v.val if isinstance(v, jcore.Literal) else env.get(v, _MISSING)

    first = [val(v) for v in eqns[i].invars]
    if _MISSING in first or sum(is_lazy(x) for x in first) != 1:
        return
    plain = eqns[i].invars[[is_lazy(x) for x in first].index(False)]
    group = [i]
    for j in later:
        if j in done or plain not in eqns[j].invars:
            continue
        ahead = _ahead_of(eqns, j, producer, env, done | set(group))
        if ahead is None:
            continue
        for k in ahead:
            run(k)
        group.append(j)
    invals = [[val(v) for v in eqns[k].invars] for k in group]
    if len(group) < 2 or any(_MISSING in vs for vs in invals):
        return
    outs = trace.shared[eqns[i].primitive](
        [trace.at(eqns[k]) for k in group], [eqns[k] for k in group], invals)
    for k, o in zip(group, outs, strict=True):
        if o is not None:
            for v, x in zip(eqns[k].outvars, o, strict=True):
                env[v] = x
            done.add(k)


def _has_body(eqn) -> bool:
    """A call-like equation (jit, scan, remat, cond): never evaluated out of turn."""
    return any(isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr)) or
               (isinstance(v, (tuple, list)) and any(isinstance(u, (jcore.Jaxpr, jcore.ClosedJaxpr))
                                                     for u in v))
               for v in eqn.params.values())


class _Missing:
    pass


_MISSING = _Missing()


def _ahead_of(eqns, j: int, producer: dict, env: dict, blocked: set) -> list | None:
    """The not-yet-run equations eqn ``j``'s operands need, if few, ready and none of
    ``blocked`` (run already, or members of the group); else None."""
    need: list = []
    stack = [v for v in eqns[j].invars if isinstance(v, jcore.Var) and v not in env]
    while stack:
        v = stack.pop()
        k = producer.get(v)
        if k is None or k in blocked or k >= j or eqns[k].effects or _has_body(eqns[k]):
            return None
        if k in need:
            continue
        need.append(k)
        if len(need) > _AHEAD:
            return None
        stack.extend(u for u in eqns[k].invars if isinstance(u, jcore.Var) and u not in env)
    return sorted(need)


def _apply_rule(trace: Trace, eqn, invals) -> list:
    rule = trace.rules.get(eqn.primitive)
    why = trace.fallback_why.get(eqn.primitive, "it has no low-rank rule")
    if rule is not None:
        try:
            return rule(trace, eqn, invals)
        except NotLowRank as e:
            why = str(e)
    return bind(eqn, [_densify(trace, eqn, x, why) for x in invals])


def _densify(trace: Trace, eqn, x, why: str):
    if not is_lazy(x):
        return x
    return trace.fallback(x, eqn.primitive.name, why)


def densify_output(trace: Trace, x, where: str):
    """A lazy value leaving a function or a rebuilt body must be dense."""
    if not is_lazy(x):
        return x
    return trace.fallback(x, where, f"the weight itself is an output of the {where}",
                          output=True)
