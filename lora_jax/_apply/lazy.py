"""`LazyWeight`: a frozen weight plus its low-rank update, never summed.

This is the value the `lj.apply` interpreter carries in place of an adapted
weight: ``W + scale * a @ b`` kept as its parts. Shape-only operations on the
weight (transpose, reshape, casts, broadcasts, slices) are pushed into the
parts; the products the model forms with it are computed in low-rank form
(`lowrank_dot`, `lowrank_conv`, `lowrank_gather`); anything else gets the
dense sum from `materialize`, at that use only.

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

Nothing here knows about jaxprs; `lora_jax._apply.interp` maps primitives
onto these functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax._variants import dora as _dora
from lora_jax._core.leaf import as_matrix, dense_float32, is_container

__all__ = ["LazyWeight", "NotLowRank", "lowrank_dot", "lowrank_conv", "lowrank_gather"]

S, A, B = "S", "A", "B"


class NotLowRank(Exception):
    """An operation on a `LazyWeight` has no low-rank form; the message says why."""


def _is_array(x) -> bool:
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

    # -- construction -------------------------------------------------------
    @classmethod
    def from_leaf(cls, path, w, weights, spec) -> LazyWeight:
        """The lazy form of one params leaf with its `LoraWeights`."""
        lay = spec.layout
        stacked, ins, outs = spec.stacked_shape, spec.in_shape, spec.out_shape
        a = jnp.reshape(weights.a, (*stacked, *ins, spec.rank))
        b = jnp.reshape(weights.b, (*stacked, spec.rank, *outs))
        scale = lax.stop_gradient(jnp.asarray(weights.scale, jnp.float32))
        dims = tuple((S, k) for k in range(lay.n_stacked)) + \
            tuple((A, k) for k in range(lay.n_in)) + tuple((B, k) for k in range(lay.n_out))
        g = None
        if weights.m is not None:
            norm = _dora.column_norm(as_matrix(dense_float32(w), spec),
                                     jnp.reshape(weights.a, (*stacked, spec.in_size, spec.rank)),
                                     jnp.reshape(weights.b, (*stacked, spec.rank, spec.out_size)),
                                     scale)
            g = jnp.asarray(weights.m, jnp.float32) / lax.stop_gradient(norm)
            g = jnp.reshape(g, (*stacked, 1, *outs))
        return cls(path, w, jnp.dtype(spec.dtype), a, b, scale, dims, g=g)

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
        elif not _is_array(w):
            raise TypeError(
                f"lj.apply: a frozen weight of type {type(w).__name__} is neither an array "
                f"nor a lora_jax LeafContainer. Fix: store it as an array, or as a subclass "
                f"of lora_jax.LeafContainer with a dequantize() method.")
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
        d = _transpose_to(d, order, self.dims)
        return self.scale * d

    def materialize(self):
        """``W + scale * a @ b`` summed in float32 (DoRA: times ``g``), in the view's dtype."""
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
        own = [lab for lab in _factor_labels(self, False) if lab != "r"]
        g = jnp.squeeze(self.g, self.count(S))         # drop the size-1 rank axis
        if any(lab not in labels for lab in own):
            raise NotLowRank("DoRA: the product keeps only part of the weight's output axes")
        where = [labels.index(lab) for lab in own]
        shape = [1] * len(labels)
        for pos, n in zip(where, g.shape):
            shape[pos] = n
        return jnp.reshape(jnp.transpose(g, np.argsort(where)), shape)

    # -- shape-only ops (each returns a LazyWeight or raises NotLowRank) -------
    def _with(self, op, **changes) -> LazyWeight:
        """Applies ``op`` to the frozen weight (now, or queued for a container)."""
        if _is_array(self.w):
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
        return dataclasses.replace(self, a=jnp.transpose(self.a, a_perm),
                                   b=jnp.transpose(self.b, b_perm), dims=dims, g=g)

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
        blocks = _reshape_blocks(lw.shape, new_shape)
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
        return dataclasses.replace(
            lw._with(lambda w: lax.broadcast_in_dim(w, shape, bdims)),
            a=a, b=b, dims=new_dims, g=g)

    def window(self, starts, limits, strides=None) -> LazyWeight:
        """Static slice of the view (``lax.slice``)."""
        strides = tuple(strides) if strides is not None else (1,) * self.ndim
        a_args = self._factor_window(starts, limits, strides, "a")
        b_args = self._factor_window(starts, limits, strides, "b")
        lw = self._with(lambda w: lax.slice(w, tuple(starts), tuple(limits), strides))
        g = None
        if self.g is not None:
            g = lax.slice(self.g, *self._factor_window(starts, limits, strides, "b", self.g))
        return dataclasses.replace(lw, a=lax.slice(self.a, *a_args),
                                   b=lax.slice(self.b, *b_args), g=g)

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
        return dataclasses.replace(lw, a=factor(self.a, self.a_axis, B),
                                   b=factor(self.b, self.b_axis, A), g=g)

    def _relabel(self, new_kind, new_shape, w_op) -> LazyWeight:
        """New view with per-axis kinds; factors reshaped to match (canonical order)."""
        new_dims = _label(new_kind)
        if any(sum(1 for kd, _ in new_dims if kd == kind) == 0 for kind in (A, B)):
            raise NotLowRank(f"reshape to {new_shape} leaves no input or no output axis")
        r = self.a.shape[-1]
        sizes = {kind: [n for (kd, _), n in zip(new_dims, new_shape) if kd == kind]
                 for kind in (S, A, B)}
        if math.prod(sizes[S]) != math.prod(self.a.shape[: self.count(S)]):
            raise NotLowRank(f"reshape to {new_shape} moves elements across stacked axes")
        a = jnp.reshape(self.a, (*sizes[S], *sizes[A], r))
        b = jnp.reshape(self.b, (*sizes[S], r, *sizes[B]))
        g = None if self.g is None else jnp.reshape(self.g, (*sizes[S], 1, *sizes[B]))
        return dataclasses.replace(self._with(w_op), a=a, b=b, dims=new_dims, g=g)

    # -- flattening, for control flow -----------------------------------------
    def arrays(self) -> list:
        """The traced values (``rebuild`` takes them back): w, a, b, scale[, g]."""
        return [self.w, self.a, self.b, self.scale] + ([] if self.g is None else [self.g])

    def rebuild(self, arrays) -> LazyWeight:
        w, a, b, scale, *g = arrays
        return dataclasses.replace(self, w=w, a=a, b=b, scale=scale, g=g[0] if g else None)

    def unstack_leading(self) -> LazyWeight:
        """Moves the stacked axis that is view axis 0 to the front of a and b.

        Used by scan, which slices axis 0 of every ``xs``; returns None when
        view axis 0 is not stacked.
        """
        if not self.dims or self.dims[0][0] != S:
            raise NotLowRank("scanned over an axis that is not a stacked (layer) axis; "
                             "set LoraConfig.layouts with n_stacked >= 1 for it")
        lw = self.canonical()
        return lw if lw.dims[0] == (S, 0) else None

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


def _reshape_blocks(old, new):
    """Pairs of (old axes, new axes) with equal products, in order; None if odd."""
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


def _transpose_to(x, have, want):
    """Transposes ``x`` whose axes are labelled ``have`` into label order ``want``."""
    perm = [list(have).index(lab) for lab in want]
    return x if perm == list(range(len(perm))) else jnp.transpose(x, perm)


# ----------------------------------------------------------------------------- matmul kernel
#
# The common case -- x's trailing axes contracted with all of one factor's
# axes, no batch axes -- is flattened to 2-D and goes through `_matmul`, a
# custom_vjp with a hand-written backward. Left to autodiff, XLA:CPU forms
# db = t.T @ g as dot(g, t) contracting g's rows, i.e. with a transposed
# copy of every output cotangent g, and recomputes the sums base + delta
# (forward) and g @ W.T + dt @ a.T (backward) inside every consumer,
# keeping both addends alive until the backward pass (more temp memory than
# full fine-tuning). Here every transpose lands on an (N, r) operand, and
# the training forward is one dot over [x | x a] and [W ; s b].
# benchmarks/RESULTS.md has the measurements.


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
def _matmul(precision, out_dtype, concat: bool):
    """``y = x @ view(w) + (xl @ a) @ (s * b)`` on 2-D operands, with its VJP.

    ``view(w)`` is the frozen weight as a (K, N) array: ``w`` is the stored
    leaf (an array, or a quantized container that ``view`` dequantizes),
    so the backward pass recomputes the view instead of keeping a dense copy
    alive. ``x``: (M, K); ``xl``: the LoRA input (dropout applied); ``a``:
    (K, r); ``b``: (r, N); ``s``: scalar. The low-rank terms are formed in
    the adapters' dtype; ``concat`` (all dtypes equal) computes the training
    forward as one dot over ``[x | xl a]`` and ``[W ; s b]``.
    """
    def dot(u, v, cu, cv, dtype=None, like=None, flip=False):
        # On a mesh with Explicit axes a product that contracts a sharded
        # axis must name its output's sharding: that of ``like`` (the array
        # the result is the cotangent of), transposed with ``flip``.
        spec = None if like is None else _explicit_spec(like, flip)
        return lax.dot_general(u, v, (((cu,), (cv,)), ((), ())), precision=precision,
                               preferred_element_type=dtype, out_sharding=spec)

    def forward(x, xl, w, a, sb, train):
        ad = a.dtype
        t = dot(xl.astype(ad), a, 1, 0, ad)
        if train:
            y = dot(jnp.concatenate([x, t], 1), jnp.concatenate([w, sb], 0), 1, 0, out_dtype)
        else:
            acc = jnp.promote_types(out_dtype, ad)
            y = (dot(x, w, 1, 0, acc) + dot(t, sb, 1, 0, ad).astype(acc)).astype(out_dtype)
        return y, t

    def dense(view, w, after):
        # A stored container is densified where it is used, tied to the
        # activation (`after`: x forward, the cotangent backward) by a data
        # dependency, so that XLA neither hoists every dequantization to the
        # start nor merges the backward's recomputation with the forward's
        # (either keeps all dense weights alive). An optimization barrier
        # does not do it: XLA:CPU removes barriers before scheduling.
        if not _is_array(w):
            w = _tied_to(w, after)
        return view(w)

    def matmul(view, x, xl, w, a, b, s):
        return forward(x, xl, dense(view, w, x), a, s * b, False)[0]

    def fwd(view, x, xl, w, a, b, s):
        sb = s * b
        y, t = forward(x, xl, dense(view, w, x), a, sb, concat and _is_array(w))
        return y, (x, xl, w, a, b, s, sb, t)

    def bwd(view, res, g):
        x, xl, w_src, a, b, s, sb, t = res
        w, pull = jax.vjp(lambda w: dense(view, w, g), w_src)
        ad = a.dtype
        ga = g.astype(ad)
        dt = dot(ga, sb, 1, 1, ad, like=t)                  # (M, r)
        dx = dot(g, w, 1, 1, jnp.promote_types(g.dtype, x.dtype), like=x).astype(x.dtype)
        dxl = dot(dt, a, 1, 1, ad, like=xl).astype(xl.dtype)
        # via (r, K): transposes dt only
        da = dot(dt, xl.astype(ad), 0, 0, ad, like=a, flip=True).T
        db = (s * dot(t, ga, 0, 0, ad, like=b)).astype(b.dtype)     # transposes t only
        # The frozen weight's cotangent is dead code unless params are
        # differentiated too (XLA then drops it).
        (dw,) = pull(dot(x, g, 0, 0, jnp.promote_types(g.dtype, w.dtype), like=w)
                     .astype(w.dtype))
        return dx, dxl, dw, da.astype(a.dtype), db, jnp.zeros_like(s)

    kernel = jax.custom_vjp(matmul, nondiff_argnums=(0,))
    kernel.defvjp(fwd, bwd)
    return kernel


def _explicit_spec(x, flip: bool = False):
    """``x``'s PartitionSpec (axes reversed with ``flip``) on a mesh with Explicit
    axes; None elsewhere (Auto axes, no mesh), where XLA chooses."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if not any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return None
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    return jax.sharding.PartitionSpec(*(spec[::-1] if flip else spec))


@functools.lru_cache(maxsize=None)
def _fuse_concat() -> bool:
    """Whether the training forward fuses into one dot over ``[x | x a]``, ``[W ; s b]``.

    Only on a single CPU device, where it was measured faster (it saves a
    pass over the output). Under a mesh the concatenation of a sharded
    ``W`` with the replicated ``s b`` makes XLA reshuffle ``W`` (all-to-alls,
    benchmarks/RESULTS.md "Sharding"), and on accelerators it would copy
    every weight each step for no gain.
    """
    return jax.default_backend() == "cpu" and jax.device_count() == 1


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
    return jnp.dtype(preferred) if preferred is not None else jnp.result_type(x_dtype, w_dtype)


def _acc_dtype(out_dtype, adapter_dtype):
    """The dtype the low-rank sum is formed in: never below the adapters'."""
    return jnp.promote_types(out_dtype, adapter_dtype)


def lowrank_dot(x, lw: LazyWeight, *, x_is_lhs: bool, dimension_numbers, precision,
                preferred_element_type, out_sharding, lora_input=None,
                custom_grad=True):
    """``dot_general(x, W + s a b)`` as ``x W + s (x a) b``; raises `NotLowRank`.

    The one place the low-rank product of a matmul is formed; extensions
    (DoRA's column norm, per-example adapter gathers, sharding constraints)
    hook in here. ``lora_input(x)`` gives the LoRA branch's input (``x``
    after dropout); it is called only once the product is known to be
    low-rank. The weight's batch axes must be exactly
    its stacked axes, and its contracted axes all input (``A``) axes or all
    output (``B``) axes; partial contractions of one kind are fine.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    xc, wc, xb, wb = (lc, rc, lb, rb) if x_is_lhs else (rc, lc, rb, lb)
    dims = lw.dims
    if sorted(dims[i] for i in wb) != [(S, k) for k in range(lw.count(S))]:
        raise NotLowRank("the matmul's batch axes of the weight are not exactly its stacked "
                         "axes (check LoraConfig.layouts)")
    kinds = {dims[i][0] for i in wc}
    if kinds not in ({A}, {B}):
        raise NotLowRank("the matmul contracts a mix of the weight's input and output axes "
                         "(or none); check LoraConfig.layouts")
    first_is_a = kinds == {A}
    if lw.g is None:
        return _lowrank_dot(x, lw, x_is_lhs, dimension_numbers, first_is_a, precision,
                            preferred_element_type, out_sharding, lora_input, custom_grad)
    # DoRA: the weight is (W + s a b) * g over its output axes
    x_free = [i for i in range(x.ndim) if i not in xc and i not in xb]
    if not first_is_a:       # output axes contracted: scale x instead
        labels = [None] * x.ndim
        for i, j in (*zip(xc, wc), *zip(xb, wb)):
            labels[i] = dims[j]
        x = (x * lw.g_along(labels)).astype(x.dtype)
        return _lowrank_dot(x, lw, x_is_lhs, dimension_numbers, first_is_a, precision,
                            preferred_element_type, out_sharding, lora_input, custom_grad)
    w_free = [dims[i] for i in range(lw.ndim) if i not in wc and i not in wb]
    none = [None] * len(x_free)
    labels = [dims[j] for j in wb] + (none + w_free if x_is_lhs else w_free + none)
    y = _lowrank_dot(x, lw, x_is_lhs, dimension_numbers, first_is_a, precision,
                     preferred_element_type, out_sharding, lora_input, custom_grad)
    return _dora_scaled(lw, y, labels)


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
    if custom_grad and x_is_lhs and not wb:
        plan = _matmul_plan(x, lw, xc, wc, first_is_a)
        if plan is not None:
            view, w_src, f1_2d, f2_2d, out_shape = plan
            xl = x if lora_input is None else lora_input(x)
            k = f1_2d.shape[0]
            same = x.dtype == lw.dtype == f1.dtype == f2.dtype == out_dtype
            kernel = _matmul(precision, out_dtype, same and _fuse_concat())
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
    t = lax.dot_general(xl, f1, ((tuple(xc), tuple(pos1(dims[i]) for i in wc)),
                                 (tuple(xb), tuple(pos1(dims[i]) for i in wb))),
                        precision=precision, preferred_element_type=f1.dtype)
    x_free = [i for i in range(x.ndim) if i not in xc and i not in xb]
    f1_used = {pos1(dims[i]) for i in (*wc, *wb)}
    f1_labels = _factor_labels(lw, first_is_a)
    t_labels = [("batch", i) for i in range(nbat)] + [("x", i) for i in x_free] + \
        [lab for p, lab in enumerate(f1_labels) if p not in f1_used]
    r_t = t_labels.index("r")
    f2 = f2 * lw.scale.astype(f2.dtype)
    d = lax.dot_general(t, f2, (((r_t,), (pos2("r"),)),
                                (tuple(range(nbat)), tuple(pos2(dims[i]) for i in wb))),
                        precision=precision, preferred_element_type=f1.dtype)
    f2_free = [lab for lab in _factor_labels(lw, not first_is_a) if lab != "r" and lab[0] != S]
    d_labels = [("batch", i) for i in range(nbat)] + \
        [lab for lab in t_labels[nbat:] if lab != "r"] + f2_free
    w_free = [dims[i] for i in range(lw.ndim) if i not in wc and i not in wb]
    x_part = [("x", i) for i in x_free]
    want = [("batch", i) for i in range(nbat)] + \
        (x_part + w_free if x_is_lhs else w_free + x_part)
    d = _transpose_to(d, d_labels, want)
    return (base.astype(acc) + d.astype(acc)).astype(out_dtype)


def _factor_labels(lw: LazyWeight, of_a: bool) -> list:
    """Labels of ``a``'s (or ``b``'s) axes in their storage order."""
    ns = lw.count(S)
    stack = [(S, k) for k in range(ns)]
    if of_a:
        return stack + [(A, k) for k in range(lw.count(A))] + ["r"]
    return stack + ["r"] + [(B, k) for k in range(lw.count(B))]


def lowrank_conv(x, lw: LazyWeight, *, params, lora_input=None):
    """``conv(x, W + s a b)`` as ``conv(x, W) + s conv(x, a) b``; raises `NotLowRank`.

    ``a`` becomes an r-output-channel kernel with W's spatial and input axes;
    ``b`` is then a 1x1 up-projection on the output's feature axis. Needs
    W's output-feature axis to be its only ``B`` axis (the default conv
    layout) and no feature/batch groups.
    """
    dn = params["dimension_numbers"]
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1 \
            or lw.count(S) or lw.count(B) != 1:
        raise NotLowRank("grouped convolution, or a kernel whose layout is not "
                         "(*spatial, in, out)")
    out_feat = dn.rhs_spec[0]
    if lw.dims[out_feat] != (B, 0):
        raise NotLowRank("the convolution's output-feature axis is not the weight's output axis")
    conv = dict(window_strides=params["window_strides"], padding=params["padding"],
                lhs_dilation=params["lhs_dilation"], rhs_dilation=params["rhs_dilation"],
                dimension_numbers=dn, precision=params["precision"])
    out_dtype = _out_dtype(params["preferred_element_type"], x.dtype, lw.dtype)
    acc = _acc_dtype(out_dtype, lw.a.dtype)
    base = lax.conv_general_dilated(
        x, lw.frozen(), **conv,
        preferred_element_type=acc if acc != out_dtype else params["preferred_element_type"])
    kernel_labels = [lab if lab[0] == A else "r" for lab in lw.dims]
    kernel = _transpose_to(lw.a, _factor_labels(lw, True), kernel_labels)
    xl = (x if lora_input is None else lora_input(x)).astype(lw.a.dtype)
    t = lax.conv_general_dilated(xl, kernel, **conv, preferred_element_type=lw.a.dtype)
    feat = dn.out_spec[1]
    b = lw.b * lw.scale.astype(lw.b.dtype)
    d = lax.dot_general(t, b, (((feat,), (0,)), ((), ())), precision=params["precision"],
                        preferred_element_type=lw.a.dtype)
    d = jnp.moveaxis(d, -1, feat)
    return _dora_scaled(lw, (base.astype(acc) + d.astype(acc)).astype(out_dtype),
                        _feature_labels(y_ndim=base.ndim, feat=feat))


def _feature_labels(y_ndim: int, feat: int) -> list:
    """Labels of a conv/gather result: the weight's one output axis at ``feat``."""
    labels = [None] * y_ndim
    labels[feat] = (B, 0)
    return labels


def _dora_scaled(lw: LazyWeight, y, labels):
    """``y`` (axes labelled ``labels``) times DoRA's ``g``; unchanged without DoRA."""
    if lw.g is None:
        return y
    return (y * lw.g_along(labels).astype(y.dtype)).astype(y.dtype)


def lowrank_gather(lw: LazyWeight, indices, *, params):
    """``(W + s a b)[ids]`` as ``W[ids] + s a[ids] b``; raises `NotLowRank`.

    The embedding lookup: rows (``A`` axes) are gathered from ``a``, then
    multiplied by ``b``. Needs one ``B`` axis, taken whole by every slice.
    """
    gdn = params["dimension_numbers"]
    sizes = tuple(params["slice_sizes"])
    if lw.count(S) or lw.count(B) != 1 or gdn.operand_batching_dims:
        raise NotLowRank("a gather from a stacked weight or one with several output axes")
    bpos = lw.dims.index((B, 0))
    if sizes[bpos] != lw.shape[bpos] or bpos in gdn.collapsed_slice_dims \
            or bpos in gdn.start_index_map:
        raise NotLowRank("the gather slices the weight's output axis (not a row lookup)")
    kw = dict(dimension_numbers=gdn, indices_are_sorted=params["indices_are_sorted"],
              unique_indices=params["unique_indices"], mode=params["mode"],
              fill_value=params["fill_value"])
    base = lax.gather(lw.frozen(), indices, slice_sizes=sizes, **kw)
    out_dtype = base.dtype
    acc = _acc_dtype(out_dtype, lw.a.dtype)
    r = lw.a.shape[-1]
    table_labels = [lab if lab[0] == A else "r" for lab in lw.dims]
    table = _transpose_to(lw.a, _factor_labels(lw, True), table_labels)
    t = lax.gather(table, indices, slice_sizes=sizes[:bpos] + (r,) + sizes[bpos + 1:], **kw)
    kept = [i for i in range(lw.ndim) if i not in gdn.collapsed_slice_dims]
    feat = gdn.offset_dims[kept.index(bpos)]
    b = lw.b * lw.scale.astype(lw.b.dtype)
    d = lax.dot_general(t, b, (((feat,), (0,)), ((), ())),
                        preferred_element_type=lw.a.dtype)
    d = jnp.moveaxis(d, -1, feat)
    return _dora_scaled(lw, (base.astype(acc) + d.astype(acc)).astype(out_dtype),
                        _feature_labels(y_ndim=base.ndim, feat=feat))
