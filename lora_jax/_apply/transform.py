"""`apply`: run any JAX function of a params tree with LoRA adapters, low-rank.

``lj.apply(fn, config)(params, adapters, *args)`` equals
``fn(lj.merge(params, adapters, config), *args)`` but never forms
``W + scale * a @ b``: ``fn`` is traced to a jaxpr (`jax.make_jaxpr`) and
re-evaluated with every targeted weight held as a `LazyWeight`, so a matmul
becomes ``x @ W + scale * (x @ a) @ b``, a convolution a conv with an
r-channel kernel then a 1x1 up-projection, an embedding lookup
``W[ids] + scale * a[ids] @ b``. The backward pass then never forms the
dense ``dW = x.T @ dy`` either, which is where the FLOPs go (see
``benchmarks/RESULTS.md``). Any other use materializes the sum at that
use only; `explain` lists every use, ``strict=True`` refuses fallbacks.

How it is built (the modules, for whoever extends it):

* `lora_jax._apply.lazy` -- `LazyWeight`, "a lazily adapted weight": the
  frozen weight in its current view plus ``a``, ``b``, ``scale`` and one
  label per view axis (stacked / input / output). Shape-only ops are pushed
  into the factors.
* `lora_jax._apply.lowrank` -- `lowrank_dot`, `lowrank_conv`,
  `lowrank_gather` and `lowrank_ragged_dot` (MoE experts), the only places a
  low-rank product is formed.
* `lora_jax._apply.kernel` -- the matmul kernel. Matmuls that flatten to
  ``(M, K) @ (K, N)`` (Dense, DenseGeneral, Einsum, tied projections) go
  through one ``custom_vjp``: its training forward is a single dot of
  ``[x | x a]`` with ``[W ; s b]`` and its backward keeps every transpose on
  an ``(N, r)`` operand. Left to autodiff, XLA:CPU keeps both addends of
  ``x W + s (x a) b`` alive until the backward pass and transposes every
  output cotangent to form ``b``'s gradient; the kernel removes both
  (``custom_grad=False`` gives the autodiff form back, e.g. for
  forward-mode differentiation).
* `lora_jax._apply.interp` -- the interpreter (`evaluate`, `Trace`, `Record`).
* `lora_jax._apply.rules` -- `RULES` maps each primitive (by identity, from
  `jax.extend.core.primitives`) to a rule; jit bodies are inlined, remat
  re-wrapped with the same policy, scan rebuilt with the sliced factors as
  extra ``xs``, cond rebuilt branch by branch; everything else materializes
  and is recorded.
* this module -- argument handling, the public functions, reporting.

Where the variants hook in, and where to extend:

* Quantized frozen weights (QLoRA, `lj.quantize`): a container leaf is
  traced as the dense weight it stands for (`_trace_value`); a targeted one
  lives in `LazyWeight.w` and densifies itself (``dequantize()``) where it is
  used (shape ops on it are queued in `LazyWeight.pending`); the kernel
  recomputes the dense view in its backward instead of saving it.
* DoRA: `LazyWeight.g` holds ``m / ||W + s a b||`` (norm from
  `lora_jax._variants.dora.column_norm`, detached) and moves through every
  shape op as ``b`` does; the products multiply their result by it over the
  weight's output axes (or ``x``, when a product contracts them).
* Mixed-batch serving: an adapter *set* has a leading adapter axis on
  ``a``, ``b``, ``scale``; `lj.apply_mixed` vmaps `apply` over examples.
  `apply` itself rejects sets (`_check_single`).
* Mixtures of adapters (`lj.apply_mixture`, through `apply_gated`): a set's
  ``n`` adapters at a weight become one rank ``n r`` pair plus
  `LazyWeight.router` (moved by every shape op as ``a`` is); the generic path
  of `lowrank_dot` weights each token's block ``i`` of ``x a`` by its gate
  (`lora_jax._apply.gating`). Every other product refuses it, and so does
  `LazyWeight.materialize`: a per-token mixture has no dense weight.
* Sharding: a ``sharding_constraint`` on a weight stays on the frozen part;
  the kernel names its products' output shardings on meshes with Explicit
  axes.
* New primitives: add a rule to `lora_jax._apply.rules.RULES` keyed by the
  primitive object; a rule returns the outputs or raises `NotLowRank`.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable

import jax
import numpy as np

from lora_jax._apply.infer import check_layouts
from lora_jax._apply.interp import Record, Trace, densify_output, evaluate
from lora_jax._apply.lazy import LazyWeight
from lora_jax._apply.rules import FALLBACK_WHY, RULES, SHARED
from lora_jax._core.config import LoraConfig, LoraWarning
from lora_jax._core.errors import error, message
from lora_jax._core.leaf import is_container
from lora_jax._core.paths import flatten_params, unflatten_params
from lora_jax._core.weights import LoraWeights, check_adapters, flatten_adapters

__all__ = ["apply", "apply_gated", "explain", "Explanation"]

# ----------------------------------------------------------------------------- reporting


@dataclasses.dataclass(frozen=True)
class Explanation:
    """How `apply` treated each targeted leaf (see `explain`).

    Attributes:
      rules: ``{path: {rule: count}}`` for every targeted leaf; rules are
        ``"lowrank_dot"``, ``"lowrank_conv"``, ``"lowrank_gather"``,
        ``"lowrank_ragged_dot"``, ``"materialized"`` (see ``fallbacks``) and ``"unused"``.
      fallbacks: ``{path: [(primitive, why), ...]}`` for each use that
        materialized ``W + scale * a @ b``.
    """

    rules: dict
    fallbacks: dict

    @property
    def n_fallbacks(self) -> int:
        """Number of uses that materialized a weight."""
        return sum(len(v) for v in self.fallbacks.values())

    def __str__(self) -> str:
        width = max([len(p) for p in self.rules] + [4])
        lines = [f"{'path'.ljust(width)}  rule (uses)", f"{'-' * width}  -----------"]
        for path, rules in self.rules.items():
            txt = ", ".join(f"{r} ({n})" for r, n in rules.items())
            lines.append(f"{path.ljust(width)}  {txt}")
            for prim, why in self.fallbacks.get(path, ()):
                lines.append(f"{' ' * width}    materialized at `{prim}`: {why}")
        n = sum(len(v) for v in self.fallbacks.values())
        lines.append(f"{len(self.rules)} targets, {n} fallback{'s' * (n != 1)}")
        return "\n".join(lines)

    __repr__ = __str__


def _explanation(record: Record, paths) -> Explanation:
    counts = record.rule_counts()
    falls = record.fallback_list()
    rules = {}
    for path in paths:
        c = dict(counts.get(path, {}))
        if path in falls:
            c["materialized"] = len(falls[path])
        rules[path] = c or {"unused": 1}
    return Explanation(rules, {p: falls[p] for p in paths if p in falls})


def _warn(record: Record):
    for path, uses in record.fallback_list().items():
        where = ", ".join(sorted({f"`{prim}`" for prim, _ in uses}))
        warnings.warn(message(
            path, f"lj.apply materialized W + scale * a @ b at {where} ({uses[0][1]}); the "
                  f"result is correct, but that use costs a dense update (lj.explain(...) shows "
                  f"every rule taken)", "pass strict=True to make this an error, or use the "
                  "weight through a matmul, convolution or row lookup"),
            LoraWarning, stacklevel=4)


# ----------------------------------------------------------------------------- the rewrite


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _aval(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, weak_type=jax.typeof(x).weak_type)


def _check_single(path, node, spec):
    if np.ndim(node.a) != len(spec.a_shape):
        raise error(path, f"adapters hold a set of {np.shape(node.a)[0]} adapters (a has shape "
                          f"{tuple(np.shape(node.a))}, one adapter's is {spec.a_shape}); "
                          f"lj.apply runs one adapter",
                    "select one, lj.select_adapter(aset, name), or serve the set with "
                    "lj.apply_mixed")


def _trace_value(leaf, node, spec, router=None, gating=None):
    """What ``fn`` is traced with, and what the interpreter runs with, for one leaf.

    A quantized container (`LeafContainer`) is traced as the dense weight it
    stands for; a targeted one becomes a `LazyWeight` that dequantizes where
    it is used, an untargeted one is dequantized up front. With a ``router``,
    ``node`` is an adapter set's and the weight their gated mixture.
    """
    if spec is not None:
        traced = jax.ShapeDtypeStruct(spec.shape, spec.dtype) if is_container(leaf) else leaf
        if router is not None:
            return traced, LazyWeight.mixture(spec.path, leaf, node, spec, router, gating)
        return traced, LazyWeight.from_leaf(spec.path, leaf, node, spec)
    if node is not None:  # fully trained: the adapter's value replaces the leaf
        return node, node
    if is_container(leaf):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), leaf.dequantize()
    return leaf, leaf


def _rewrite(fn, config, params, adapters, args, kwargs, *, lora_rng, strict,
             custom_grad=True, check=True, routers=None, gating=None):
    """Traces ``fn`` and evaluates it low-rank; returns ``(output, record, paths)``.

    With ``check``, the adapters' layouts are compared with what the program
    implies (`check_layouts`) and adapters the program never reads are refused
    (`_check_used`) -- `explain` reports instead. With ``routers`` (``{path:
    router}`` for every targeted path, see `apply_gated`), each adapted weight
    is a gated mixture of the set's adapters (`LazyWeight.mixture`).
    """
    entries = check_adapters(params, adapters, config)
    p_treedef = flatten_params(params)[1]
    a_leaves, a_treedef = jax.tree.flatten((args, kwargs))
    traced, run, static, targets = [], [], {}, {}
    for i, (path, leaf, node, spec) in enumerate(entries):
        if spec is not None and routers is None:
            _check_single(path, node, spec)
        router = None if routers is None or spec is None else routers[path]
        t, r = _trace_value(leaf, node, spec, router, gating)
        if _is_array(t) or isinstance(t, jax.ShapeDtypeStruct):
            if spec is not None:
                targets[len(traced)] = spec
            traced.append(t)
            run.append(r)
        else:
            static[i] = t
    n_params = len(entries)
    for j, x in enumerate(a_leaves):
        if _is_array(x):
            traced.append(x)
            run.append(x)
        else:
            static[n_params + j] = x

    def flat_fn(*dynamic):
        it = iter(dynamic)
        leaves = [static[i] if i in static else next(it)
                  for i in range(n_params + len(a_leaves))]
        p = jax.tree.unflatten(p_treedef, leaves[:n_params])
        a, kw = jax.tree.unflatten(a_treedef, leaves[n_params:])
        return fn(p, *a, **kw)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*map(_aval, traced))
    if check:
        check_layouts(closed.jaxpr, targets, config)
    record = Record()
    key = None
    if lora_rng is not None and config.dropout > 0:
        key = lora_rng
    trace = Trace(record, RULES, strict=strict, dropout=config.dropout,
                  custom_grad=custom_grad, key=key, fallback_why=FALLBACK_WHY, shared=SHARED)
    outs = evaluate(trace, closed.jaxpr, closed.consts, run)
    outs = [densify_output(trace, o, "function") for o in outs]
    out = jax.tree.unflatten(jax.tree.structure(out_shape), outs)
    paths = [path for path, _, _, spec in entries if spec is not None]
    if check:
        _check_used(record, paths, strict)
    return out, record, paths


def _check_used(record: Record, paths: list, strict: bool) -> None:
    """Adapted weights the function never reads are a mistake, not a no-op."""
    used = set(record.rule_counts()) | set(record.fallback_list())
    unused = [p for p in paths if p not in used]
    if not unused or (len(unused) < len(paths) and not strict):
        return
    if len(unused) == len(paths):
        raise error(
            "lj.apply",
            f"fn never reads any of the {len(paths)} adapted weights from its params argument "
            f"(e.g. {unused[0]}), so the adapters would have no effect. It usually means fn "
            f"closes over the params (lambda p, x: model.apply(variables, x)) instead of "
            f"using the ones it is given",
            "pass them through: lj.apply(lambda p, x: model.apply(p, x), config)")
    raise error(
        "lj.apply(strict=True)",
        f"fn never reads {len(unused)} of the adapted weights from its params argument: "
        f"{unused[:6]}{' ...' if len(unused) > 6 else ''}",
        "narrow LoraConfig.targets to the weights fn uses, or pass strict=False")


def _check_fn(fn, config, where):
    if not callable(fn):
        raise error(where, f"fn must be callable; got {type(fn).__name__}",
                    "pass the model's function, e.g. model.apply", kind=TypeError)
    if not isinstance(config, LoraConfig):
        raise error(where, f"config must be a lj.LoraConfig; got {type(config).__name__}",
                    "lj.apply(fn, lj.LoraConfig(...))", kind=TypeError)


def apply(fn: Callable, config: LoraConfig, *, strict: bool = False,
          custom_grad: bool = True) -> Callable:
    """Returns ``f(params, adapters, *args, lora_rng=None, **kwargs)``, low-rank.

    ``f`` computes ``fn(params, *args, **kwargs)`` with every targeted
    weight ``W`` replaced by ``W + scale * a @ b`` -- the same result as
    ``fn(lj.merge(params, adapters, config), *args, **kwargs)`` -- without
    forming that sum: products with ``W`` are computed as
    ``x @ W + scale * (x @ a) @ b`` (also through transposes, reshapes,
    casts, slices, ``jit``, ``remat``, ``scan`` and ``cond``; embeddings as
    ``W[ids] + scale * a[ids] @ b``; convolutions through an r-channel
    kernel). Fully-trained (``config.train``) leaves of ``adapters``
    replace their params leaves. Array leaves of ``args``/``kwargs`` are
    traced; anything else (flags, strings) is passed through as static.

    Each trace of ``f`` (each ``jit`` compile) re-traces ``fn``; nothing is
    cached, and ``scale`` is an array, so swapping adapters or changing
    alpha reuses the compiled function.

    Args:
      fn: ``fn(params, *args, **kwargs)`` -- e.g. ``model.apply`` of a
        Linen model, or a function that does ``nnx.merge`` inside.
      config: the `LoraConfig` the adapters were made with. Its ``dropout``
        applies to the LoRA branch's input only (``B(A(dropout(x)))``, as
        PEFT), and only when ``f`` gets a ``lora_rng`` key.
      strict: raise (``ValueError`` naming the path and the primitive)
        instead of materializing a weight at a use with no low-rank rule.
        By default such uses work densely and `LoraWarning` names the path
        once per trace.
      custom_grad: matmuls that flatten to ``(M, K) @ (K, N)`` (``Dense``,
        ``DenseGeneral``, ``Einsum``, tied output projections) use a
        hand-written backward pass that XLA runs markedly faster than the
        autodiff of the low-rank form and with less memory (see
        ``benchmarks/RESULTS.md``). Its cost: forward-mode differentiation
        (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) of ``f`` raises; pass
        ``custom_grad=False`` for those.

    The returned function reserves the keyword ``lora_rng``: a PRNG key
    for LoRA dropout (``None``, the default, means no dropout: exact and
    deterministic). Use a fresh key per step.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
      >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
      >>> cfg = lj.LoraConfig(rank=2, alpha=4, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(1))
      >>> ad = {"w": ad["w"]._replace(b=jnp.ones((2, 4)))}
      >>> x = jnp.ones((3, 8))
      >>> y = jax.jit(lj.apply(fn, cfg))(params, ad, x)
      >>> bool(jnp.allclose(y, fn(lj.merge(params, ad, cfg), x), atol=1e-6))
      True
    """
    _check_fn(fn, config, "lj.apply")
    for name, value in (("strict", strict), ("custom_grad", custom_grad)):
        if not isinstance(value, bool):
            raise error("lj.apply", f"{name} must be a bool; got {value!r}",
                        f"pass {name}=True or {name}=False", kind=TypeError)

    @functools.wraps(fn)
    def adapted(params, adapters, *args, lora_rng=None, **kwargs):
        out, record, _ = _rewrite(fn, config, params, adapters, args, kwargs,
                                  lora_rng=lora_rng, strict=strict, custom_grad=custom_grad)
        _warn(record)
        return out

    return adapted


def apply_gated(fn: Callable, config: LoraConfig, gating) -> Callable:
    """`apply` with every adapted weight a mixture gated per token: the engine of
    `lj.apply_mixture`.

    Returns ``f(params, adapters, routers, *args, lora_rng=None, **kwargs)``.
    ``adapters`` is an adapter set's tree (``aset.adapters``, plain LoRA: a
    leading axis of ``n`` adapters) and ``config`` its config; ``routers`` is
    ``{path: router (*stacked, in, n)}`` for every adapted path; ``gating`` a
    `lora_jax._apply.gating.Gating`. Every product goes through the generic
    low-rank path (``custom_grad=False``: the matmul kernels have no gates), and
    a use with no gated form raises (a mixture has no dense weight to fall back
    to).
    """
    def gated(params, adapters, routers, *args, lora_rng=None, **kwargs):
        out, _, _ = _rewrite(fn, config, params, adapters, args, kwargs, lora_rng=lora_rng,
                             strict=False, custom_grad=False, routers=routers, gating=gating)
        return out

    return gated


def explain(fn: Callable, config: LoraConfig, params, adapters, *args, **kwargs
            ) -> Explanation:
    """Which rule `apply` takes for each targeted leaf, and every fallback.

    Traces ``apply(fn, config)(params, adapters, *args, **kwargs)``
    abstractly (nothing is computed) and reports, per targeted path, how
    many uses went through each rule, and for each materialized use the
    primitive and why.

    Args:
      fn: the function given to `apply`.
      config: the `LoraConfig`.
      params: the frozen params (arrays, or `jax.ShapeDtypeStruct`s).
      adapters: the adapter tree (`lj.init`'s form).
      *args: example positional arguments of ``fn``; array leaves are traced
        abstractly, anything else is passed as is.
      **kwargs: example keyword arguments, likewise.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.ones((8, 4)), "v": jnp.ones((8, 4))}
      >>> fn = lambda p, x: x @ p["w"] + jnp.sin(p["v"]).sum()
      >>> cfg = lj.LoraConfig(rank=2, targets=("w", "v"))
      >>> ad = lj.init(params, cfg, key=jax.random.key(0))
      >>> e = lj.explain(fn, cfg, params, ad, jnp.ones((3, 8)))
      >>> e.rules
      {'v': {'materialized': 1}, 'w': {'lowrank_dot': 1}}
      >>> e.fallbacks["v"]
      [('sin', 'it has no low-rank rule')]
    """
    _check_fn(fn, config, "lj.explain")
    got = {}
    # params (containers whole), adapters (LoraWeights whole) and the call's args
    p_leaves = [x for _, x in flatten_params(params)[0]]
    ad_flat, ad_treedef = flatten_adapters(adapters)
    ad_leaves = [n for _, n in ad_flat]
    arg_leaves, arg_treedef = jax.tree.flatten((args, kwargs))
    groups = (p_leaves, ad_leaves, arg_leaves)

    def dynamic(x) -> bool:
        return _is_array(x) or is_container(x) or isinstance(x, LoraWeights)

    def run(values):
        it = iter(values)
        p, ad, rest = ([next(it) if dynamic(x) else x for x in g] for g in groups)
        a, kw = jax.tree.unflatten(arg_treedef, rest)
        out, record, paths = _rewrite(fn, config, unflatten_params(params, p),
                                      jax.tree_util.tree_unflatten(ad_treedef, ad), a, kw,
                                      lora_rng=None, strict=False, check=False)
        got["record"], got["paths"] = record, paths
        return out

    jax.eval_shape(run, [x for g in groups for x in g if dynamic(x)])
    return _explanation(got["record"], got["paths"])
