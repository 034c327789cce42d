"""Mixed batches: one forward pass in which every example uses its own adapter.

`apply_mixed` maps the low-rank apply (`lj.apply`) over the examples with
`jax.vmap`, each example's adapter gathered from an `lj.AdapterSet` by its
index: the frozen products ``x @ W`` stay single matmuls over the whole
batch, the low-rank products become batched matmuls over the gathered
per-example factors (the gather-batched form of Punica's BGMV / S-LoRA).
No Python loop over adapters, and the indices are data, so a new
assignment of adapters to examples reuses the compiled program.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core
from jax import lax

from lora_jax._apply.transform import apply
from lora_jax._core.errors import error
from lora_jax._core.weights import LoraWeights, check_adapters, is_node
from lora_jax._multi.set import AdapterSet, adapter_ids, check_set
from lora_jax._variants.dora import dora_norms

__all__ = ["apply_mixed"]


def _ids_array(aset: AdapterSet, ids):
    if isinstance(ids, (list, tuple)) and ids and all(isinstance(n, str) for n in ids):
        return adapter_ids(aset, ids)
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise error("lj.apply_mixed", f"adapter_ids must be one int per example (shape "
                                      f"(batch,)), got {ids.dtype.name}{tuple(ids.shape)}",
                    "lj.adapter_ids(aset, names)")
    if not isinstance(ids, jax_core.Tracer):
        bad = np.asarray(ids)
        bad = bad[(bad < -1) | (bad >= aset.n)]
        if bad.size:
            raise error("lj.apply_mixed", f"adapter_ids hold {sorted(set(bad.tolist()))[:5]}, "
                                          f"outside [-1, {aset.n}) for a set of {aset.n} "
                                          f"adapters (-1 means the base)",
                        "lj.adapter_ids(aset, names)")
    return ids.astype(jnp.int32)


def _example_adapters(aset: AdapterSet, i, base_norms=None):
    """The adapter of one example (a vmapped index): zero scale for the base (and,
    in a DoRA set, the base weight's own column norms as magnitude: ``g = 1``)."""
    n = aset.n
    valid = (i >= 0) & (i < n)
    j = jnp.clip(i, 0, n - 1)

    def one(node, norm):
        if node is None:
            return None
        a = lax.dynamic_index_in_dim(node.a, j, 0, keepdims=False)
        b = lax.dynamic_index_in_dim(node.b, j, 0, keepdims=False)
        s = lax.dynamic_index_in_dim(node.scale, j, 0, keepdims=False)
        m = None
        if node.m is not None:
            m = lax.dynamic_index_in_dim(node.m, j, 0, keepdims=False)
            m = jnp.where(valid, m, norm.astype(m.dtype))
        return LoraWeights(a, b, jnp.where(valid, s, jnp.zeros_like(s)), m)
    norms = base_norms if base_norms is not None else jax.tree.map(
        lambda node: None, aset.adapters, is_leaf=is_node)
    return jax.tree.map(one, aset.adapters, norms, is_leaf=is_node)


def _base_norms(params, aset: AdapterSet):
    """A DoRA set's base column norms ``||W||`` per adapted leaf (None for plain LoRA)."""
    if not aset.config.use_dora:
        return None
    zero = jax.tree.map(lambda node: None if node is None else LoraWeights(
        node.a[0], node.b[0], jnp.zeros((), jnp.float32), node.m[0]), aset.adapters,
        is_leaf=is_node)
    return dora_norms(params, zero, aset.config)


def _arg_axes(in_axes, args) -> list:
    if in_axes is None or (isinstance(in_axes, int) and not isinstance(in_axes, bool)):
        return [in_axes] * len(args)
    if isinstance(in_axes, (tuple, list)) and len(in_axes) == len(args) and all(
            a is None or (isinstance(a, int) and not isinstance(a, bool)) for a in in_axes):
        return list(in_axes)
    raise error("lj.apply_mixed", f"in_axes={in_axes!r} must be an int, None, or a tuple with "
                                  f"one int/None per positional argument of fn after params "
                                  f"({len(args)} given)",
                "e.g. in_axes=0 when every array argument has the examples on axis 0")


def _check_options(fn, in_axes, out_axes, strict) -> None:
    """apply_mixed's own arguments (checked when it is called, not at the first batch)."""
    if not callable(fn):
        raise error("lj.apply_mixed", f"fn must be callable; got {type(fn).__name__}",
                    "pass the model's function, e.g. lj.apply_mixed(model.apply)",
                    kind=TypeError)
    if isinstance(out_axes, bool) or not isinstance(out_axes, int) or out_axes < 0:
        raise error("lj.apply_mixed", f"out_axes={out_axes!r} must be an int >= 0",
                    "set out_axes to the outputs' batch axis, e.g. out_axes=0")
    if not isinstance(strict, bool):
        raise error("lj.apply_mixed", f"strict must be a bool; got {strict!r}",
                    "strict=True or strict=False", kind=TypeError)
    if (not (in_axes is None or isinstance(in_axes, (int, tuple, list)))
            or isinstance(in_axes, bool)):
        _arg_axes(in_axes, ())  # raises, naming the accepted forms


def _split_args(args: tuple, axes: list, n_ex: int):
    """``(leaves, where, per_arg)``: all leaves of ``args``, the ``(position, axis)`` of
    those holding the ``n_ex`` examples, and each argument's ``(leaves, treedef)``."""
    leaves, where = [], []
    per_arg = [jax.tree.flatten(a) for a in args]
    for j, ((flat, _), ax) in enumerate(zip(per_arg, axes, strict=True)):
        for leaf in flat:
            if ax is not None and hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
                if leaf.ndim <= ax or leaf.shape[ax] != n_ex:
                    raise error("lj.apply_mixed",
                                f"argument {j} has a leaf of shape {tuple(leaf.shape)} whose "
                                f"axis {ax} should hold the {n_ex} examples that adapter_ids "
                                f"names",
                                "one id per example, or in_axes=(...) with None for arguments "
                                "shared by all examples")
                where.append((len(leaves), ax))
            leaves.append(leaf)
    return leaves, where, per_arg


def _example_args(leaves: list, where: list, per_arg: list, batched: list) -> list:
    """One example's positional arguments: its slices of the batched leaves, each
    a batch of one, and the shared leaves as they are."""
    full = list(leaves)
    for (pos, ax), x in zip(where, batched, strict=True):
        full[pos] = jnp.expand_dims(x, ax)
    it = iter(full)
    return [jax.tree.unflatten(td, [next(it) for _ in flat]) for flat, td in per_arg]


def _squeeze_examples(out, out_axes: int):
    """fn's output for one example without its example axis (which must have size 1)."""
    def squeeze(y):
        if jnp.ndim(y) <= out_axes or jnp.shape(y)[out_axes] != 1:
            raise error("lj.apply_mixed", f"fn's output for one example has shape "
                                          f"{tuple(jnp.shape(y))}, with no example axis "
                                          f"{out_axes} of size 1",
                        "set out_axes to the outputs' batch axis; fn must keep one output per "
                        "example")
        return jnp.squeeze(y, out_axes)
    return jax.tree.map(squeeze, out)


def apply_mixed(fn: Callable, *, in_axes=0, out_axes: int = 0,
                strict: bool = False) -> Callable:
    """Returns ``f(params, adapter_set, adapter_ids, *args, **kwargs)``: one adapter per example.

    ``f`` runs ``fn`` on a batch in which example ``e`` uses adapter
    ``adapter_ids[e]`` of the set (``-1``: none, the base model), all in one
    call: output ``e`` equals ``lj.apply(fn, aset.config)(params,
    lj.select_adapter(aset, adapter_ids[e]), *args_e)`` for that example
    alone. ``fn`` is mapped over the examples with `jax.vmap` (each example
    sees a batch of one), every example's factors gathered from the set by
    its index: the frozen matmuls stay whole-batch matmuls, and the
    low-rank ones become batched matmuls over the gathered factors (no loop
    over adapters). ``adapter_ids`` is data: jit ``f`` once and any
    assignment of adapters runs without recompiling.

    Cost: the gathered factors take batch x the adapter's size of temporary
    memory. On the reference decoder (2 CPU cores, ``benchmarks/RESULTS.md``)
    a mixed batch of 64 x 128 tokens runs at the single-adapter speed; at one
    token per example the gathers dominate (0.65x a single adapter, still 3x
    a loop over the adapters).

    ``fn`` must treat examples independently (inference: no batch
    statistics, no cross-example ops). Array leaves of ``args`` carry the
    examples on axis ``in_axes``; ``kwargs`` are the same for every example.

    Args:
      fn: ``fn(params, *args, **kwargs)`` as for `lj.apply`.
      in_axes: the example axis of the array leaves of ``args``: an int for
        all, or a tuple with one int (or None: shared by all examples) per
        positional argument.
      out_axes: the example axis of every output leaf.
      strict: as for `lj.apply`: raise instead of materializing a weight at
        a use with no low-rank rule.

    The returned ``f`` takes the base ``params``, an `AdapterSet`, the
    per-example indices (an int array from `adapter_ids`, or a list of names
    outside ``jit``), then ``fn``'s arguments.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
      >>> fn = lambda p, x: x @ p["w"]
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> def adapter(seed):
      ...     ad = lj.init(params, cfg, key=jax.random.key(seed))
      ...     return {"w": ad["w"]._replace(b=jnp.ones((2, 4)))}, cfg
      >>> aset = lj.adapter_set({"x": adapter(1), "y": adapter(2)})
      >>> xs = jax.random.normal(jax.random.key(3), (3, 5, 8))     # 3 examples
      >>> ids = lj.adapter_ids(aset, ["y", "__base__", "x"])
      >>> out = jax.jit(lj.apply_mixed(fn))(params, aset, ids, xs)
      >>> alone = lj.apply(fn, aset.config)(params, lj.select_adapter(aset, "y"), xs[:1])
      >>> as_alone = jnp.allclose(out[0], alone[0], atol=1e-5)
      >>> bool(as_alone), bool(jnp.allclose(out[1], fn(params, xs[1])))
      (True, True)
    """
    _check_options(fn, in_axes, out_axes, strict)

    def mixed(params, adapter_set, adapter_ids, *args, **kwargs):
        check_set(adapter_set, "apply_mixed")
        check_adapters(params, adapter_set.adapters, adapter_set.config)
        ids = _ids_array(adapter_set, adapter_ids)
        leaves, where, per_arg = _split_args(args, _arg_axes(in_axes, args), ids.shape[0])
        inner = apply(fn, adapter_set.config, strict=strict)
        norms = _base_norms(params, adapter_set)

        def one(i, batched):
            ex_args = _example_args(leaves, where, per_arg, batched)
            out = inner(params, _example_adapters(adapter_set, i, norms), *ex_args, **kwargs)
            return _squeeze_examples(out, out_axes)

        batched = [leaves[pos] for pos, _ in where]
        try:
            return jax.vmap(one, in_axes=(0, [ax for _, ax in where]), out_axes=out_axes)(
                ids, batched)
        except NotImplementedError as e:
            if "ragged_dot" not in str(e):
                raise
            raise error("lj.apply_mixed", f"fn uses lax.ragged_dot, which jax.vmap cannot map "
                                          f"over examples in this jax ({e})",
                        "write the experts as a gather (W[ids]) or a batched einsum for mixed "
                        "batches, or run one adapter at a time with lj.apply",
                        kind=NotImplementedError) from None

    return mixed

