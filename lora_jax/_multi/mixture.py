"""Mixture of LoRAs: every token routed over the adapters of a set (X-LoRA / MoLE style).

Each adapted weight ``W`` of an `lj.AdapterSet` of ``n`` adapters gets a small
trained router ``R``, a linear map of that weight's own input to ``n``
logits, and every matmul with ``W`` becomes, per token ``x``::

    y = x W + sum_i g_i(x) s_i (x a_i) b_i,     g(x) = softmax(x R / temperature)

or, with ``top_k``, the softmax over the ``k`` largest logits and every other
gate exactly 0. `init_router` builds the routers (a `Router`), `apply_mixture`
runs a model with them; both the routers and the set's adapters are pytrees,
so ``jax.grad`` trains the routers alone (adapters frozen) or jointly.

How it runs (`lora_jax._apply`): the ``n`` adapters at a weight are laid side
by side as one rank ``n r`` LoRA (``r``: the set's padded rank there, each
``b`` times its own scale), ``t = x [a_1 | ... | a_n]`` is formed once, its
block ``i`` times ``g_i(x)``, then ``t [s_1 b_1; ...; s_n b_n]``. So a mixture
of ``n`` rank-``r`` adapters costs one rank ``n r`` LoRA plus an ``(in, n)``
router product per matmul, dense: top-k still computes all ``n`` blocks and
zeroes the others (grouped top-k products are not built: XLA:CPU lowers
``ragged_dot`` as a masked dense product, so they could not be faster here).
Products go through the generic low-rank path, not the fused matmul kernel.

What is refused, each with an error naming the path: DoRA sets; a weight
used other than through a matmul of its input axes (a convolution, a row
lookup, ``ragged_dot`` experts, an expert gather, ``x @ W.T``, elementwise
use, a loop, a ``custom_vjp``, the weight as an output) -- a mixture has no
dense weight to fall back to.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._apply.gating import Gating
from lora_jax._apply.transform import apply_gated
from lora_jax._core.errors import error
from lora_jax._core.weights import flatten_adapters, is_lora, map_adapters
from lora_jax._init import leaf_key
from lora_jax._multi.set import AdapterSet, check_set

__all__ = ["Router", "init_router", "apply_mixture"]


def _check_top_k(top_k, n: int, where: str):
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) \
            or not 1 <= int(top_k) <= n:
        raise error(where, f"top_k={top_k!r} must be None (softmax over all adapters) or an "
                           f"int in [1, {n}] for a set of {n} adapters",
                    "e.g. top_k=2, or top_k=None")
    return int(top_k)


def _check_temperature(temperature, where: str) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)) \
            or not math.isfinite(float(temperature)) or float(temperature) <= 0:
        raise error(where, f"temperature={temperature!r} must be a finite number > 0",
                    "e.g. temperature=1.0 (the logits are divided by it)")
    return float(temperature)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Router:
    """The routers of a mixture of adapters: one linear map per adapted weight.

    A pytree whose only data is ``weights``; ``names``, ``top_k`` and
    ``temperature`` are static (part of the tree structure), so ``jax.grad``
    of a loss with respect to a `Router` is a `Router` of gradients, optax
    transforms it like any tree, and changing ``top_k``
    (``dataclasses.replace(router, top_k=2)``) compiles anew. Build one with
    `init_router`.

    Attributes:
      weights: mirrors params: at each weight the set adapts, an array
        ``(*stacked, in, n)`` (laid out like one adapter's ``a`` with the
        rank axis replaced by the ``n`` adapters), else None.
      names: the set's adapter names, in index order: column ``i`` of every
        router belongs to adapter ``names[i]`` (`apply_mixture` checks it).
      top_k: None: gates are the softmax over all ``n`` logits; else the
        softmax over the ``top_k`` largest, every other gate exactly 0.
      temperature: logits are divided by it before the softmax.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((8, 6))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> aset = lj.adapter_set({n: (lj.init(params, cfg, key=jax.random.key(i)), cfg)
      ...                        for i, n in enumerate(["de", "fr", "it"])})
      >>> router = lj.init_router(aset, key=jax.random.key(0), top_k=2)
      >>> router
      Router(names=('de', 'fr', 'it'), paths=1, top_k=2, temperature=1.0)
      >>> router.weights["w"].shape
      (8, 3)
    """

    weights: Any
    names: tuple
    _: dataclasses.KW_ONLY
    top_k: int | None = None
    temperature: float = 1.0

    def __post_init__(self):
        names = self.names
        if not (isinstance(names, tuple) and names and all(isinstance(n, str) for n in names)):
            raise error("lj.Router", f"names must be a non-empty tuple of adapter names; got "
                                     f"{names!r:.80}",
                        "build routers with lj.init_router(aset, key=...)", kind=TypeError)
        object.__setattr__(self, "top_k", _check_top_k(self.top_k, len(names), "lj.Router"))
        object.__setattr__(self, "temperature",
                           _check_temperature(self.temperature, "lj.Router"))

    @property
    def gating(self) -> Gating:
        """How logits become gates (top-k, temperature)."""
        return Gating(self.top_k, self.temperature)

    def __repr__(self) -> str:
        paths = sum(1 for _, x in flatten_adapters(self.weights)[0] if x is not None)
        return (f"Router(names={self.names}, paths={paths}, top_k={self.top_k}, "
                f"temperature={self.temperature})")


jax.tree_util.register_dataclass(Router, data_fields=["weights"],
                                 meta_fields=["names", "top_k", "temperature"])


def init_router(aset: AdapterSet, *, key=None, top_k: int | None = None,
                temperature: float = 1.0, std: float | None = None,
                dtype=jnp.float32) -> Router:
    """Routers for every weight ``aset`` adapts: ``(*stacked, in, n)``, normal(0, std).

    Each path's router is drawn from its own key (``fold_in(key, crc32(path))``,
    as `lj.init` draws ``a``), so adding a target leaves the others' alone.
    ``std=0`` gives zero routers: every gate ``1 / n`` (softmax), the mean of
    the adapters, as B = 0 gives the base; under ``top_k`` zero logits tie and
    the lowest indices win, so a random start suits top-k better.

    Args:
      aset: the `lj.AdapterSet` to route over (plain LoRA; DoRA sets are refused
        by `apply_mixture`).
      key: a PRNG key (needed unless ``std=0``).
      top_k: None for a softmax over all adapters, else ``k`` in ``[1, n]``.
      temperature: logits are divided by it (> 0).
      std: the routers' init std; default ``1 / sqrt(in)``, logits of about
        unit size for inputs of unit size.
      dtype: the routers' dtype (gates are computed in it, at least float32).

    Returns:
      The `Router`.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((8, 6))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> aset = lj.adapter_set({n: (lj.init(params, cfg, key=jax.random.key(i)), cfg)
      ...                        for i, n in enumerate(["x", "y"])})
      >>> r = lj.init_router(aset, std=0.0)          # zero: equal gates, no key needed
      >>> r.weights["w"].shape, float(jnp.abs(r.weights["w"]).max()), r.top_k
      ((8, 2), 0.0, None)
    """
    check_set(aset, "init_router")
    top_k = _check_top_k(top_k, aset.n, "lj.init_router")
    temperature = _check_temperature(temperature, "lj.init_router")
    if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float, np.number))
                            or not math.isfinite(float(std)) or float(std) < 0):
        raise error("lj.init_router", f"std={std!r} must be a finite number >= 0",
                    "e.g. std=0.0 (zero routers: equal gates), or leave the default "
                    "1 / sqrt(in)")
    if (std is None or float(std) > 0) and key is None:
        raise error("lj.init_router", "random routers need a PRNG key",
                    "lj.init_router(aset, key=jax.random.key(0)), or std=0.0 for zero routers")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise error("lj.init_router", f"dtype={jnp.dtype(dtype).name} is not a float type",
                    "e.g. dtype=jnp.float32", kind=TypeError)

    def one(path, node):
        if node is None:
            return None
        shape = (*node.a.shape[1:-1], aset.n)          # (*stacked, in, n)
        if std is not None and float(std) == 0:
            return jnp.zeros(shape, dtype)
        s = 1.0 / math.sqrt(node.a.shape[-2]) if std is None else float(std)
        return (s * jax.random.normal(leaf_key(key, path), shape, jnp.float32)).astype(dtype)

    return Router(map_adapters(one, aset.adapters), aset.names, top_k=top_k,
                  temperature=temperature)


def _routers(aset: AdapterSet, router: Router) -> dict:
    """``{path: router}`` for every adapted path, each checked against the set."""
    if not isinstance(router, Router):
        raise error("lj.apply_mixture", f"expected an lj.Router, got {type(router).__name__}",
                    "build one with lj.init_router(aset, key=...)", kind=TypeError)
    if router.names != aset.names:
        raise error("lj.apply_mixture", f"the router was built for adapters {list(router.names)}"
                                        f" but the set holds {list(aset.names)}: column i of "
                                        f"a router gates adapter i",
                    "build (and train) a router for this set: lj.init_router(aset, key=...)")
    if aset.config.use_dora:
        raise error("lj.apply_mixture", f"the set {list(aset.names)} holds DoRA adapters; a "
                                        f"mixture gates (x a_i) b_i per token, which has no "
                                        f"form for DoRA's column norm of W + s a b",
                    "merge the DoRA adapters into the base first, or build the mixture from "
                    "plain LoRA adapters")
    flat, _ = flatten_adapters(aset.adapters)
    rflat, _ = flatten_adapters(router.weights)
    rmap = dict(rflat)
    if [p for p, _ in rflat] != [p for p, _ in flat]:
        raise error("lj.apply_mixture", "the router's weights do not mirror the set's adapter "
                                        "tree (built for other params?)",
                    "lj.init_router(aset, key=...) with this set")
    out = {}
    for path, node in flat:
        r = rmap[path]
        if node is None:
            if r is not None:
                raise error(path, "the router has a weight here but the set adapts nothing",
                            "lj.init_router(aset, key=...) with this set")
            continue
        if not is_lora(node):
            raise error(path, f"the set holds a fully-trained leaf here ({type(node).__name__}); "
                              f"a mixture gates LoRA factors only",
                        "fold such leaves into the base params and build the set with "
                        "lj.adapter_set")
        want = (*np.shape(node.a)[1:-1], aset.n)
        got = tuple(np.shape(r)) if r is not None else None
        if r is None or got != want:
            raise error(path, f"the router has shape {got}, the set needs {want} "
                              f"((*stacked, in, n) for a of shape {tuple(np.shape(node.a))})",
                        "lj.init_router(aset, key=...) with this set")
        if not jnp.issubdtype(r.dtype, jnp.floating):
            raise error(path, f"the router has dtype {jnp.dtype(r.dtype).name}; it is trained "
                              f"by gradient descent, so it must be floating point",
                        "lj.init_router(aset, key=..., dtype=jnp.float32)", kind=TypeError)
        out[path] = r
    return out


def apply_mixture(fn: Callable) -> Callable:
    """Returns ``f(params, adapter_set, router, *args, lora_rng=None, **kwargs)``: routed per token.

    ``f`` computes ``fn(params, *args, **kwargs)`` with every matmul of a
    weight ``W`` the set adapts replaced, for each token ``x`` (row of the
    matmul's input), by ``x W + sum_i g_i(x) s_i (x a_i) b_i``, the gates
    ``g(x)`` from that weight's router (see `Router`): ``softmax(x R / T)``,
    or its top-k form. Where an adapter leaves a weight alone (a set's zero
    factors), its gate there multiplies nothing. Trace, jit and
    differentiate it as `lj.apply`'s function (through ``jit``, ``remat``,
    ``scan`` over stacked layers, ``cond``); the router's and the set's leaves
    are ordinary pytree leaves, so ``jax.grad`` with respect to ``router``
    trains the routing with the adapters frozen, and with respect to
    ``(adapter_set, router)`` trains both (``lj.optimizer`` keeps the scales
    frozen).

    Cost: a mixture of ``n`` rank-``r`` adapters costs what one rank ``n r``
    LoRA costs plus an ``(in, n)`` router product per matmul, computed
    densely: top-k still forms all ``n`` blocks of ``x a`` (a grouped top-k
    product was not built; XLA:CPU lowers ``ragged_dot`` as a masked dense
    product, so it could not be faster on CPU, and it was not measured on an
    accelerator). The fused matmul kernel of `lj.apply` is not used.

    Refused, with an error naming the path: DoRA sets, and any use of an
    adapted weight other than a matmul of its input axes (convolutions, row
    lookups, ``ragged_dot``, ``x @ W.T``, elementwise use, loops, custom
    derivatives, the weight as an output): a per-token mixture has no dense
    weight to fall back to.

    Args:
      fn: ``fn(params, *args, **kwargs)`` as for `lj.apply`.

    The returned ``f`` takes the base ``params``, the `lj.AdapterSet`, its
    `Router` (from `init_router`), then ``fn``'s arguments; ``lora_rng`` is
    `lj.apply`'s LoRA-dropout key (``aset.config.dropout``; the router reads
    the input before dropout).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
      >>> fn = lambda p, x: x @ p["w"]
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> def adapter(seed):
      ...     ad = lj.init(params, cfg, key=jax.random.key(seed))
      ...     return {"w": ad["w"]._replace(b=jnp.ones((2, 4)))}, cfg
      >>> aset = lj.adapter_set({"x": adapter(1), "y": adapter(2)})
      >>> router = lj.init_router(aset, key=jax.random.key(3), top_k=1)
      >>> xs = jax.random.normal(jax.random.key(4), (5, 8))             # 5 tokens
      >>> y = jax.jit(lj.apply_mixture(fn))(params, aset, router, xs)
      >>> pick = jnp.argmax(xs @ router.weights["w"], axis=-1)          # top-1: one adapter
      >>> alone = [lj.apply(fn, aset.config)(params, lj.select_adapter(aset, int(i)), x)
      ...          for i, x in zip(pick, xs)]
      >>> bool(jnp.allclose(y, jnp.stack(alone), atol=1e-5))
      True
      >>> loss = lambda r: jnp.sum(lj.apply_mixture(fn)(params, aset, r, xs) ** 2)
      >>> jax.grad(loss)(router).weights["w"].shape                     # train the router
      (8, 2)
    """
    if not callable(fn):
        raise error("lj.apply_mixture", f"fn must be callable; got {type(fn).__name__}",
                    "pass the model's function, e.g. lj.apply_mixture(model.apply)",
                    kind=TypeError)

    def mixture(params, adapter_set, router, *args, lora_rng=None, **kwargs):
        check_set(adapter_set, "apply_mixture")
        routers = _routers(adapter_set, router)
        inner = apply_gated(fn, adapter_set.config, router.gating)
        return inner(params, adapter_set.adapters, routers, *args, lora_rng=lora_rng, **kwargs)

    return mixture
