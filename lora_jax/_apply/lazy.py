"""`LazyWeight`: a frozen weight plus its low-rank update, never summed.

This is the value the `lj.apply` interpreter carries in place of an adapted
weight: ``W + scale * a @ b`` kept as its parts. Shape-only operations on the
weight (transpose, reshape, casts, broadcasts, slices) are pushed into the
parts; the products the model forms with it are computed in low-rank form
(`lora_jax._apply.lowrank`); anything else gets the dense sum from
`materialize`, at that use only.

Axis bookkeeping. The weight, as the model currently sees it (its *view*),
has axes of three kinds, recorded per view axis in ``LazyWeight.dims``:

* ``("S", k)`` -- the k-th stacked axis (``nn.scan`` layers): present in W,
  ``a`` and ``b`` alike;
* ``("A", k)`` -- the k-th axis of ``a``'s input part;
* ``("B", k)`` -- the k-th axis of ``b``'s output part.

``a`` is laid out ``(*S, *A, r)`` and ``b`` ``(*S, r, *B)``. A transpose of
the weight only permutes ``dims``; the factors move only when an operation
needs their axes in view order (`LazyWeight.canonical`). A contraction over
exactly the ``A`` axes is ``(x @ a) @ b``; over exactly the ``B`` axes (a
tied embedding used as the output projection, ``x @ W.T``) it is
``(x @ b.T) @ a.T``: the same code with the factors' roles swapped.

Nothing here knows about jaxprs; `lora_jax._apply.rules` maps primitives
onto these operations and onto the products of `lora_jax._apply.lowrank`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax._core.errors import error
from lora_jax._core.leaf import as_matrix, dense_float32, is_container
from lora_jax._core.weights import LoraWeights
from lora_jax._variants import dora as _dora

__all__ = ["LazyWeight", "NotLowRank", "S", "A", "B", "is_array", "transpose_to", "factor_labels",
           "reshape_blocks"]

S, A, B = "S", "A", "B"


class NotLowRank(Exception):
    """An operation on a `LazyWeight` has no low-rank form; the message says why."""


def is_array(x) -> bool:
    """A concrete or traced array (not a container, not a ShapeDtypeStruct)."""
    return isinstance(x, (jax.Array, np.ndarray))


@dataclasses.dataclass(frozen=True)
class LazyWeight:
    """``W + scale * a @ b`` in one view of the weight (see the module doc).

    Attributes:
      path: the leaf's ``'/'``-joined path (for reports and errors).
      w: the frozen weight in this view, in its *source* dtype (casts are
        applied at use, so a fallback sums in float32 and rounds once, like
        `lj.merge`); or a quantized container (`LeafContainer`), densified
        with its own ``dequantize()`` where it is used.
      dtype: the dtype the model sees (after ``convert_element_type``).
      a: ``(*S, *A, r)``; b: ``(*S, r, *B)`` (see ``dims``).
      scale: float32 array, already behind ``stop_gradient``.
      dims: one ``(kind, index)`` label per view axis.
      pending: shape ops queued for a non-array ``w`` (QLoRA).
      g: DoRA only (else None): ``m / ||W + s a b||`` per output unit, the
        norm behind ``stop_gradient``; shaped like ``b`` with a size-1 rank
        axis, so every shape op moves it exactly as it moves ``b``. The
        adapted weight is ``(W + s a b) * g`` over the output axes: products
        scale their result (or, contracting the output axes, their input).
      router: a mixture of adapters only (else None; `lj.apply_mixture`):
        ``(*S, *A, n)``, laid out like ``a`` with its rank axis replaced by the
        ``n`` adapters, so every shape op moves it exactly as it moves ``a``.
        ``a`` then holds the ``n`` adapters' factors side by side along its
        rank axis (adapter ``i``'s block is columns ``i r .. (i + 1) r``), ``b``
        their ``b``s, each times its own scale, and ``scale`` is 1: a matmul
        weights each token's block ``i`` of ``x a`` by its gate ``g_i(x)``, the
        softmax (top-k) of ``x router``. There is no dense form (the update
        depends on each token): `materialize` raises.
      gating: with ``router``, the static `lora_jax._apply.gating.Gating`
        (top-k, temperature).
    """

    path: str
    w: Any
    dtype: Any
    a: Any
    b: Any
    scale: Any
    dims: tuple
    pending: tuple = ()
    g: Any = None
    router: Any = None
    gating: Any = None

    # -- construction -------------------------------------------------------
    @classmethod
    def from_leaf(cls, path, w, weights, spec) -> LazyWeight:
        """The lazy form of one params leaf with its `LoraWeights`."""
        lay = spec.layout
        stacked, ins, outs = spec.stacked_shape, spec.in_shape, spec.out_shape
        a = jnp.reshape(weights.a, (*stacked, *ins, spec.rank))
        b = jnp.reshape(weights.b, (*stacked, spec.rank, *outs))
        scale = lax.stop_gradient(jnp.asarray(weights.scale, jnp.float32))
        # one label per axis of the weight as stored: the layout's order lists the
        # stacked, then input, then output axes, which is the factors' order
        canonical = tuple((S, k) for k in range(lay.n_stacked)) + \
            tuple((A, k) for k in range(lay.n_in)) + tuple((B, k) for k in range(lay.n_out))
        labels: list = [None] * len(canonical)
        for label, ax in zip(canonical, spec.order, strict=True):
            labels[ax] = label
        dims = tuple(labels)
        g = None
        if weights.m is not None:
            norm = _dora.column_norm(as_matrix(dense_float32(w), spec),
                                     jnp.reshape(weights.a, (*stacked, spec.in_size, spec.rank)),
                                     jnp.reshape(weights.b, (*stacked, spec.rank, spec.out_size)),
                                     scale)
            g = jnp.asarray(weights.m, jnp.float32) / lax.stop_gradient(norm)
            g = jnp.reshape(g, (*stacked, 1, *outs))
        return cls(path, w, jnp.dtype(spec.dtype), a, b, scale, dims, g=g)

    @classmethod
    def mixture(cls, path, w, weights, spec, router, gating) -> LazyWeight:
        """The lazy form of one leaf of an adapter *set* gated per token (see ``router``).

        ``weights``: the set's `LoraWeights` here, ``a (n, *stacked, in, r)``,
        ``b (n, *stacked, r, out)``, ``scale (n,)`` (plain LoRA: DoRA sets are
        refused by the caller); ``router``: ``(*stacked, in, n)``; ``gating``: a
        `lora_jax._apply.gating.Gating`. The ``n`` adapters become one rank
        ``n r`` pair (each ``b`` times its own scale, scale 1), with the router
        reshaped as ``a`` is.
        """
        n, r = weights.a.shape[0], weights.a.shape[-1]
        a = jnp.moveaxis(weights.a, 0, -2)                       # (*S, in, n, r)
        a = jnp.reshape(a, (*a.shape[:-2], n * r))
        scale = lax.stop_gradient(jnp.asarray(weights.scale, jnp.float32))
        b = weights.b * jnp.reshape(scale, (n,) + (1,) * (weights.b.ndim - 1)).astype(
            weights.b.dtype)
        b = jnp.moveaxis(b, 0, -3)                               # (*S, n, r, out)
        b = jnp.reshape(b, (*b.shape[:-3], n * r, b.shape[-1]))
        one = LoraWeights(a, b, jnp.ones((), jnp.float32))
        lw = cls.from_leaf(path, w, one, spec._replace(rank=n * r))
        router = jnp.reshape(router, (*lw.a.shape[:-1], router.shape[-1]))
        return dataclasses.replace(lw, router=router, gating=gating)

    # -- geometry -------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.dims)

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.dims if k == kind)

    @property
    def shape(self) -> tuple:
        return tuple(self.size_of(d) for d in self.dims)

    def a_axis(self, label) -> int:
        """Position of a ``S``/``A`` label (or ``"r"``) among ``a``'s axes."""
        ns, na = self.count(S), self.count(A)
        if label == "r":
            return ns + na
        kind, k = label
        return k if kind == S else ns + k

    def b_axis(self, label) -> int:
        """Position of a ``S``/``B`` label (or ``"r"``) among ``b``'s axes."""
        ns = self.count(S)
        if label == "r":
            return ns
        kind, k = label
        return k if kind == S else ns + 1 + k

    def size_of(self, label) -> int:
        kind, _ = label
        if kind == B:
            return self.b.shape[self.b_axis(label)]
        return self.a.shape[self.a_axis(label)]

    # -- the dense forms ------------------------------------------------------
    @staticmethod
    def frozen_value(w, dtype, pending):
        if is_container(w):
            w = w.dequantize()
        elif not is_array(w):
            raise error("lj.apply", f"a frozen weight of type {type(w).__name__} is neither an "
                                    f"array nor a lora_jax LeafContainer",
                        "store it as an array, or as a subclass of lj.LeafContainer with a "
                        "dequantize() method", kind=TypeError)
        for op in pending:
            w = op(w)
        return w.astype(dtype)

    def frozen(self):
        """The frozen weight as the model sees it (dtype applied)."""
        return self.frozen_value(self.w, self.dtype, self.pending)

    def delta(self):
        """``scale * a @ b`` in float32, in view order (what `merge` adds)."""
        ns = self.count(S)
        a = self.a.astype(jnp.float32)
        b = self.b.astype(jnp.float32)
        d = lax.dot_general(a, b, (((self.a_axis("r"),), (self.b_axis("r"),)),
                                   (tuple(range(ns)), tuple(range(ns)))),
                            precision=lax.Precision.HIGHEST)
        # d: (*S, *A, *B) -> view order
        order = [(S, k) for k in range(ns)] + [(A, k) for k in range(self.count(A))] + \
            [(B, k) for k in range(self.count(B))]
        d = transpose_to(d, order, self.dims)
        return self.scale * d

    def materialize(self):
        """``W + scale * a @ b`` summed in float32 (DoRA: times ``g``), in the view's dtype."""
        if self.router is not None:
            raise error(
                self.path, "lj.apply_mixture would need this weight dense here, but a mixture "
                           "of adapters gated per token has no dense weight (W + sum_i g_i(x) "
                           "s_i a_i b_i depends on each token's input x); it is gated through "
                           "matmuls that contract the weight's input axes only, and this use "
                           "is another (an elementwise op, a loop, a custom_vjp, a conv, a "
                           "row lookup, an expert gather, or the weight as an output)",
                "use the weight only through matmuls of its input (Dense, DenseGeneral, "
                "einsum); lj.explain(fn, aset.config, params, lj.select_adapter(aset, 0), "
                "*args) names each use; or leave this path out of the adapter set")
        w = self.frozen_value(self.w, jnp.float32, self.pending)
        v = w + self.delta()
        if self.g is not None:
            v = v * self.g_along(self.dims)
        return v.astype(self.dtype)

    def g_along(self, labels):
        """DoRA's ``g`` arranged along ``labels`` (one per axis of the target array).

        A label of this view's stacked or output axes takes that axis of
        ``g``; anything else (input axes, batch/free axes, None) gets size 1.
        Every stacked and output axis must appear once.
        """
        own = [lab for lab in factor_labels(self, False) if lab != "r"]
        g = jnp.squeeze(self.g, self.count(S))         # drop the size-1 rank axis
        if any(lab not in labels for lab in own):
            raise NotLowRank("DoRA: the product keeps only part of the weight's output axes")
        where = [labels.index(lab) for lab in own]
        shape = [1] * len(labels)
        for pos, n in zip(where, g.shape, strict=True):
            shape[pos] = n
        return jnp.reshape(jnp.transpose(g, tuple(int(i) for i in np.argsort(where))), shape)

    # -- shape-only ops (each returns a LazyWeight or raises NotLowRank) -------
    def _with(self, op, **changes) -> LazyWeight:
        """Applies ``op`` to the frozen weight (now, or queued for a container)."""
        if is_array(self.w):
            return dataclasses.replace(self, w=op(self.w), **changes)
        return dataclasses.replace(self, pending=self.pending + (op,), **changes)

    def canonical(self) -> LazyWeight:
        """Moves the factors' axes into view order (labels increasing per kind)."""
        order = {kind: [k for kd, k in self.dims if kd == kind] for kind in (S, A, B)}
        if all(v == sorted(v) for v in order.values()):
            return self
        ns, na = len(order[S]), len(order[A])
        a_perm = order[S] + [ns + k for k in order[A]] + [ns + na]
        b_perm = order[S] + [ns] + [ns + 1 + k for k in order[B]]
        rank = {kind: {k: i for i, k in enumerate(v)} for kind, v in order.items()}
        dims = tuple((kd, rank[kd][k]) for kd, k in self.dims)
        g = None if self.g is None else jnp.transpose(self.g, b_perm)
        router = None if self.router is None else jnp.transpose(self.router, a_perm)
        return dataclasses.replace(self, a=jnp.transpose(self.a, a_perm),
                                   b=jnp.transpose(self.b, b_perm), dims=dims, g=g,
                                   router=router)

    def astype(self, dtype) -> LazyWeight:
        if not jnp.issubdtype(dtype, jnp.floating):
            raise NotLowRank(f"cast to {jnp.dtype(dtype).name}, not a float type")
        return dataclasses.replace(self, dtype=jnp.dtype(dtype))

    def transpose(self, perm) -> LazyWeight:
        perm = tuple(perm)
        return self._with(lambda w: lax.transpose(w, perm),
                          dims=tuple(self.dims[p] for p in perm))

    def reshape(self, new_shape) -> LazyWeight:
        new_shape = tuple(int(n) for n in new_shape)
        lw = self.canonical()
        blocks = reshape_blocks(lw.shape, new_shape)
        if blocks is None:
            raise NotLowRank(f"reshape {self.shape} -> {new_shape} is not a split/merge of axes")
        new_kind: list = [None] * len(new_shape)
        for olds, news in blocks:
            kinds = {lw.dims[i][0] for i in olds}
            if len(kinds) > 1:
                raise NotLowRank(f"reshape {self.shape} -> {new_shape} merges input with "
                                 f"output (or stacked) axes")
            kind = kinds.pop() if kinds else B  # a new size-1 axis joins b
            for j in news:
                new_kind[j] = kind
        return lw._relabel(new_kind, new_shape, lambda w: lax.reshape(w, new_shape))

    def squeeze(self, dimensions) -> LazyWeight:
        drop = set(int(d) % self.ndim for d in dimensions)
        return self.reshape([n for i, n in enumerate(self.shape) if i not in drop])

    def broadcast(self, shape, broadcast_dimensions) -> LazyWeight:
        shape, bdims = tuple(shape), tuple(broadcast_dimensions)
        lw = self.canonical()
        new_kind = [B] * len(shape)  # new axes join b
        for i, j in enumerate(bdims):
            new_kind[j] = lw.dims[i][0]
        # Every factor axis is either an old axis (maybe expanded) or new.
        old_of = {j: i for i, j in enumerate(bdims)}
        new_dims = _label(new_kind)
        a_shape, b_shape, a_map, b_map = _factor_shapes(lw, new_dims, shape, old_of)
        a = lax.broadcast_in_dim(lw.a, a_shape, a_map)
        b = lax.broadcast_in_dim(lw.b, b_shape, b_map)
        g = None
        if lw.g is not None:
            ns = sum(1 for kd, _ in new_dims if kd == S)
            g = lax.broadcast_in_dim(lw.g, b_shape[:ns] + (1,) + b_shape[ns + 1:], b_map)
        router = None
        if lw.router is not None:
            router = lax.broadcast_in_dim(lw.router, a_shape[:-1] + lw.router.shape[-1:], a_map)
        return dataclasses.replace(
            lw._with(lambda w: lax.broadcast_in_dim(w, shape, bdims)),
            a=a, b=b, dims=new_dims, g=g, router=router)

    def rev(self, dimensions) -> LazyWeight:
        """The view reversed along ``dimensions`` (``lax.rev``): each factor is
        reversed along the axes it shares with them."""
        dims = tuple(int(d) for d in dimensions)
        a_axes = tuple(self.a_axis(self.dims[d]) for d in dims if self.dims[d][0] in (S, A))
        b_axes = tuple(self.b_axis(self.dims[d]) for d in dims if self.dims[d][0] in (S, B))
        g = None if self.g is None else lax.rev(self.g, b_axes)
        router = None if self.router is None else lax.rev(self.router, a_axes)
        return dataclasses.replace(self._with(lambda w: lax.rev(w, dims)),
                                   a=lax.rev(self.a, a_axes), b=lax.rev(self.b, b_axes), g=g,
                                   router=router)

    def window(self, starts, limits, strides=None) -> LazyWeight:
        """Static slice of the view (``lax.slice``)."""
        strides = tuple(strides) if strides is not None else (1,) * self.ndim
        a_args = self._factor_window(starts, limits, strides, "a")
        b_args = self._factor_window(starts, limits, strides, "b")
        lw = self._with(lambda w: lax.slice(w, tuple(starts), tuple(limits), strides))
        g = None
        if self.g is not None:
            g = lax.slice(self.g, *self._factor_window(starts, limits, strides, "b", self.g))
        router = None
        if self.router is not None:
            router = lax.slice(self.router,
                               *self._factor_window(starts, limits, strides, "a", self.router))
        return dataclasses.replace(lw, a=lax.slice(self.a, *a_args),
                                   b=lax.slice(self.b, *b_args), g=g, router=router)

    def _factor_window(self, starts, limits, strides, which, f=None):
        if f is None:
            f = self.a if which == "a" else self.b
        pos = self.a_axis if which == "a" else self.b_axis
        lo, hi, st = [0] * f.ndim, list(f.shape), [1] * f.ndim
        for i, d in enumerate(self.dims):
            if which == "a" and d[0] == B or which == "b" and d[0] == A:
                continue
            p = pos(d)
            lo[p], hi[p], st[p] = starts[i], limits[i], strides[i]
        return tuple(lo), tuple(hi), tuple(st)

    def dynamic_window(self, starts, sizes) -> LazyWeight:
        """Dynamic slice of the view (``lax.dynamic_slice``)."""
        sizes = tuple(sizes)

        def factor(f, pos, skip):
            zero = jnp.zeros((), jnp.int32)
            st, sz = [zero] * f.ndim, list(f.shape)
            for i, d in enumerate(self.dims):
                if d[0] != skip:
                    st[pos(d)], sz[pos(d)] = starts[i], sizes[i]
            return lax.dynamic_slice(f, st, sz, allow_negative_indices=False)

        lw = self._with(lambda w: lax.dynamic_slice(w, list(starts), sizes,
                                                    allow_negative_indices=False))
        g = None if self.g is None else factor(self.g, self.b_axis, A)
        router = None if self.router is None else factor(self.router, self.a_axis, B)
        return dataclasses.replace(lw, a=factor(self.a, self.a_axis, B),
                                   b=factor(self.b, self.b_axis, A), g=g, router=router)

    def take_stacked(self, indices, params) -> LazyWeight:
        """``W[ids]`` along the one stacked axis (``lax.gather``): an MoE layer that
        gathers each token's expert weight. The factors are gathered the same way,
        so ``a[ids]``, ``b[ids]`` are the tokens' own experts' factors; the index
        axes become the view's stacked axes (a product then batches over them).
        Raises `NotLowRank` for any other gather from a stacked weight."""
        if self.router is not None:
            raise NotLowRank("an expert gather W[ids] of a mixture of adapters")
        gdn = params["dimension_numbers"]
        sizes = tuple(params["slice_sizes"])
        lw = self.canonical()
        if lw.count(S) != 1:
            raise NotLowRank("a gather from a weight with several stacked axes")
        spos = lw.dims.index((S, 0))
        whole = all(sizes[i] == n for i, n in enumerate(lw.shape) if i != spos)
        if (not whole or sizes[spos] != 1 or tuple(gdn.collapsed_slice_dims) != (spos,)
                or tuple(gdn.start_index_map) != (spos,) or gdn.operand_batching_dims
                or indices.shape[-1:] != (1,)):
            raise NotLowRank("a gather from a stacked weight that does not take whole "
                             "slices along its stacked axis (only W[ids] is low-rank)")
        kw = dict(indices_are_sorted=params["indices_are_sorted"],
                  unique_indices=params["unique_indices"], mode=params["mode"],
                  fill_value=params["fill_value"])
        n_batch = indices.ndim - 1

        def take(f):          # f: (E, ...): its slices for every index, index axes first
            dn = lax.GatherDimensionNumbers(
                offset_dims=tuple(range(n_batch, n_batch + f.ndim - 1)),
                collapsed_slice_dims=(0,), start_index_map=(0,))
            return lax.gather(f, indices, dn, (1, *f.shape[1:]), **kw)

        kept = [d for i, d in enumerate(lw.dims) if i != spos]
        out_rank = n_batch + len(kept)
        dims, k_kept, k_batch = [], iter(kept), iter(range(n_batch))
        for j in range(out_rank):
            dims.append(next(k_kept) if j in gdn.offset_dims else (S, next(k_batch)))
        g = None if lw.g is None else take(lw.g)
        out = lw._with(lambda w: lax.gather(w, indices, gdn, sizes, **kw))
        return dataclasses.replace(out, a=take(lw.a), b=take(lw.b), dims=tuple(dims), g=g)

    def _relabel(self, new_kind, new_shape, w_op) -> LazyWeight:
        """New view with per-axis kinds; factors reshaped to match (canonical order)."""
        new_dims = _label(new_kind)
        if any(sum(1 for kd, _ in new_dims if kd == kind) == 0 for kind in (A, B)):
            raise NotLowRank(f"reshape to {new_shape} leaves no input or no output axis")
        r = self.a.shape[-1]
        sizes = {kind: [n for (kd, _), n in zip(new_dims, new_shape, strict=True) if kd == kind]
                 for kind in (S, A, B)}
        if math.prod(sizes[S]) != math.prod(self.a.shape[: self.count(S)]):
            raise NotLowRank(f"reshape to {new_shape} moves elements across stacked axes")
        a = jnp.reshape(self.a, (*sizes[S], *sizes[A], r))
        b = jnp.reshape(self.b, (*sizes[S], r, *sizes[B]))
        g = None if self.g is None else jnp.reshape(self.g, (*sizes[S], 1, *sizes[B]))
        router = None if self.router is None else jnp.reshape(
            self.router, (*sizes[S], *sizes[A], self.router.shape[-1]))
        return dataclasses.replace(self._with(w_op), a=a, b=b, dims=new_dims, g=g,
                                   router=router)

    # -- flattening, for control flow -----------------------------------------
    def arrays(self) -> list:
        """The traced values (``rebuild`` takes them back): w, a, b, scale[, g][, router].

        The scale is index 3 (scan keeps it whole); every later array is laid
        out like ``a`` or ``b``, its stacked axes first once `canonical`."""
        return [self.w, self.a, self.b, self.scale] + [x for x in (self.g, self.router)
                                                       if x is not None]

    def rebuild(self, arrays) -> LazyWeight:
        """This weight's template holding ``arrays`` (the form `arrays` gives)."""
        w, a, b, scale, *rest = arrays
        g = rest.pop(0) if self.g is not None else None
        router = rest.pop(0) if self.router is not None else None
        return dataclasses.replace(self, w=w, a=a, b=b, scale=scale, g=g, router=router)

    def unstack_leading(self) -> LazyWeight:
        """Moves the stacked axis that is view axis 0 to the front of a and b.

        Used by scan, which slices axis 0 of every ``xs``; raises `NotLowRank`
        when view axis 0 is not stacked.
        """
        if not self.dims or self.dims[0][0] != S:
            raise NotLowRank("scanned over an axis that is not a stacked (layer) axis; "
                             "set LoraConfig.layouts with n_stacked >= 1 for it")
        return self.canonical()    # view axis 0 is then the first stacked axis, (S, 0)

    def sliced_leading(self) -> LazyWeight:
        """The per-iteration form: view axis 0 (stacked axis 0) removed."""
        dims = tuple((kd, k - 1 if kd == S else k) for kd, k in self.dims[1:])
        return dataclasses.replace(self, dims=dims)


def _label(kinds) -> tuple:
    seen = {S: 0, A: 0, B: 0}
    out = []
    for kd in kinds:
        out.append((kd, seen[kd]))
        seen[kd] += 1
    return tuple(out)


def _factor_shapes(lw, new_dims, shape, old_of):
    """Shapes of a, b after a broadcast, and where their old axes go."""
    r = lw.a.shape[-1]
    ns = sum(1 for kd, _ in new_dims if kd == S)
    na = sum(1 for kd, _ in new_dims if kd == A)
    nb = sum(1 for kd, _ in new_dims if kd == B)
    a_shape, b_shape = [0] * (ns + na + 1), [0] * (ns + nb + 1)
    a_shape[-1], b_shape[ns] = r, r
    a_map, b_map = [None] * lw.a.ndim, [None] * lw.b.ndim
    a_map[-1], b_map[lw.count(S)] = ns + na, ns

    def apos(d):
        return d[1] if d[0] == S else ns + d[1]

    def bpos(d):
        return d[1] if d[0] == S else ns + 1 + d[1]

    for j, d in enumerate(new_dims):
        if d[0] in (S, A):
            a_shape[apos(d)] = shape[j]
        if d[0] in (S, B):
            b_shape[bpos(d)] = shape[j]
        if j in old_of:
            old = lw.dims[old_of[j]]
            if old[0] in (S, A):
                a_map[lw.a_axis(old)] = apos(d)
            if old[0] in (S, B):
                b_map[lw.b_axis(old)] = bpos(d)
    # A new axis of size n only exists in b, where broadcasting is free.
    return tuple(a_shape), tuple(b_shape), tuple(a_map), tuple(b_map)


def reshape_blocks(old, new):
    """Pairs of (old axes, new axes) with equal products, in order; None if odd.

    Example:
      >>> reshape_blocks((6, 4), (2, 3, 4))
      [([0], [0, 1]), ([1], [2])]
    """
    blocks, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
            blocks.append(([i], []))
            i += 1
            continue
        if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
            blocks.append(([], [j]))
            j += 1
            continue
        if i >= len(old) or j >= len(new):
            return None
        olds, news = [i], [j]
        po, pn = old[i], new[j]
        i, j = i + 1, j + 1
        while po != pn:
            if po < pn:
                if i >= len(old):
                    return None
                po *= old[i]
                olds.append(i)
                i += 1
            else:
                if j >= len(new):
                    return None
                pn *= new[j]
                news.append(j)
                j += 1
        blocks.append((olds, news))
    return blocks


def transpose_to(x, have, want):
    """Transposes ``x`` whose axes are labelled ``have`` into label order ``want``."""
    perm = [list(have).index(lab) for lab in want]
    return x if perm == list(range(len(perm))) else jnp.transpose(x, perm)


def factor_labels(lw: LazyWeight, of_a: bool) -> list:
    """Labels of ``a``'s (or ``b``'s) axes in their storage order."""
    ns = lw.count(S)
    stack = [(S, k) for k in range(ns)]
    if of_a:
        return stack + [(A, k) for k in range(lw.count(A))] + ["r"]
    return stack + ["r"] + [(B, k) for k in range(lw.count(B))]
