"""The adapter tree: `LoraWeights` nodes mirroring a params tree.

An adapter tree has the structure of ``params`` down to its leaves; at each
leaf position it holds

* ``LoraWeights(a, b, scale)`` for a LoRA-adapted weight,
* an array for a leaf trained fully (``LoraConfig.train``), which replaces
  the frozen value, or
* ``None`` for a frozen leaf.

``scale`` lives in the tree as a float32 array, not in Python: swapping in
an adapter with another alpha changes data, never the compiled program. It
is never trained. It must agree with the config (``alpha / rank``):
`check_adapters` compares every concrete scale with ``config.scale_for``,
unless the config says the adapters' scales win (``scale_from="adapters"``,
an adapter set's config). Under ``jit`` the scale is a tracer and is not
compared.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core

from lora_jax._core.errors import error
from lora_jax._core.leaf import from_matrix
from lora_jax._core.paths import (
    LeafSpec,
    Resolved,
    leaves_with_paths,
    mirror,
    path_str,
    register_adapter_node,
    resolve,
)

__all__ = ["LoraWeights", "AdaLoraWeights", "is_lora", "is_adalora", "is_node",
           "flatten_adapters", "map_adapters", "pair_with_params", "check_adapters",
           "check_floating", "check_scales", "delta", "scale_array", "adalora_error",
           "lora_shaped"]


@register_adapter_node   # resolve refuses params holding one (swapped arguments)
class LoraWeights(NamedTuple):
    """Low-rank factors of one adapted weight: ``W + scale * a @ b``.

    With DoRA (``LoraConfig(use_dora=True)``) the weight is
    ``m * (W + scale * a @ b) / ||W + scale * a @ b||``, the norm taken over
    the input axes of each output unit (see `lj.dora_norms`).

    Attributes:
      a: ``(*stacked, in, rank)``, the down-projection (trained).
      b: ``(*stacked, rank, out)``, the up-projection (trained; starts at 0).
      scale: float32 array, ``alpha / rank`` (never trained). Scalar for one
        adapter; a leading adapter axis in an adapter set.
      m: DoRA's magnitude ``(*stacked, out)`` (trained; starts at the column
        norms of W), or None without DoRA. None is an empty pytree node, so
        a tree without DoRA has exactly the leaves ``a, b, scale``.

    Example:
      >>> import jax.numpy as jnp
      >>> w = LoraWeights(jnp.ones((4, 2)), jnp.zeros((2, 3)), jnp.float32(2.0))
      >>> w.a.shape, w.b.shape, float(w.scale), w.m
      ((4, 2), (2, 3), 2.0, None)
    """

    a: Any
    b: Any
    scale: Any
    m: Any = None

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def __repr__(self) -> str:
        # Without DoRA, show the three fields (as before m existed).
        fields = f"a={self.a!r}, b={self.b!r}, scale={self.scale!r}"
        return f"LoraWeights({fields}" + (")" if self.m is None else f", m={self.m!r})")


@register_adapter_node
class AdaLoraWeights(NamedTuple):
    """AdaLoRA's factors of one adapted weight: ``W + scale * (a * e) @ b``.

    The update is kept in an SVD-like form ``P Λ Q`` (Zhang et al., 2023):
    ``a`` plays P, ``e`` the diagonal Λ and ``b`` Q. Pruning triplet ``i``
    sets ``e[..., i]`` to 0, so shapes never change while ranks do. Built by
    `lj.adalora_init`; `lj.adalora_view` turns a tree of them into the
    `LoraWeights` tree ``lj.apply`` and ``lj.merge`` take.

    Attributes:
      a: ``(*stacked, in, rank)``, P (trained).
      e: ``(*stacked, rank)``, Λ's diagonal (trained; starts at 0; a pruned
        triplet holds 0).
      b: ``(*stacked, rank, out)``, Q (trained).
      scale: float32 scalar, ``alpha / rank`` with the initial rank (never
        trained; it does not change as triplets are pruned, as in PEFT).

    Example:
      >>> import jax.numpy as jnp
      >>> w = AdaLoraWeights(jnp.ones((4, 2)), jnp.zeros(2), jnp.ones((2, 3)), jnp.float32(1))
      >>> w.a.shape, w.e.shape, w.b.shape, w.rank
      ((4, 2), (2,), (2, 3), 2)
    """

    a: Any
    e: Any
    b: Any
    scale: Any

    @property
    def rank(self) -> int:
        return self.a.shape[-1]


def is_adalora(x) -> bool:
    """True for an `AdaLoraWeights` node (use as ``is_leaf=`` in tree maps).

    Example:
      >>> import jax.numpy as jnp
      >>> w = AdaLoraWeights(jnp.ones((4, 2)), jnp.zeros(2), jnp.ones((2, 3)), jnp.float32(1))
      >>> is_adalora(w), is_adalora(LoraWeights(w.a, w.b, w.scale))
      (True, False)
    """
    return isinstance(x, AdaLoraWeights)


def is_lora(x) -> bool:
    """True for a `LoraWeights` node (use as ``is_leaf=`` in tree maps).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = {"w": LoraWeights(jnp.ones((4, 2)), jnp.zeros((2, 3)), jnp.float32(1)), "b": None}
      >>> jax.tree.map(lambda n: n.a.shape if is_lora(n) else n, ad, is_leaf=is_lora)
      {'b': None, 'w': (4, 2)}
    """
    return isinstance(x, LoraWeights)


def is_node(x) -> bool:
    """True for what an adapter tree holds at a params leaf that is not an array:
    a `LoraWeights` or ``None`` (use as ``is_leaf=`` when walking adapter trees)."""
    return x is None or is_lora(x)


def flatten_adapters(adapters, *, adalora: bool = False):
    """``([(path, node), ...], treedef)`` of an adapter-shaped tree.

    Nodes are `LoraWeights`, arrays (fully-trained leaves) or ``None``;
    `LoraWeights` stay whole. Works on adapter sets' trees and flat
    ``{path: node}`` dicts alike. `AdaLoraWeights` nodes are refused with
    `adalora_error`, unless ``adalora=True`` (checkpoints store them whole).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        adapters, is_leaf=lambda x: is_node(x) or is_adalora(x))
    for p, n in flat:
        if is_adalora(n) and not adalora:
            raise adalora_error(path_str(p))
    return [(path_str(p), n) for p, n in flat], treedef


def lora_shaped(adapters):
    """``adapters`` with each `AdaLoraWeights` seen as ``LoraWeights(a, b, scale)``:
    the shapes the config's checks (`check_adapters`) expect, no arithmetic (it works
    on ``jax.ShapeDtypeStruct`` skeletons too). What the update *is* comes from
    ``lj.adalora_view``."""
    return jax.tree.map(lambda n: LoraWeights(n.a, n.b, n.scale) if is_adalora(n) else n,
                        adapters, is_leaf=lambda x: is_node(x) or is_adalora(x))


def adalora_error(path: str) -> Exception:
    """The error for AdaLoRA adapters passed where LoraWeights are expected."""
    return error(path, "the adapters hold AdaLoraWeights (AdaLoRA's P, Λ, Q) where a "
                 "LoraWeights is expected",
                 "pass lj.adalora_view(adapters) to apply, merge and explain while training, "
                 "and lora, config = lj.adalora_to_lora(adapters, config) to save, export "
                 "or summarize the result")


def map_adapters(fn, adapters):
    """``fn(path, node)`` at every node of an adapter tree (see `flatten_adapters`)."""
    flat, treedef = flatten_adapters(adapters)
    return jax.tree_util.tree_unflatten(treedef, [fn(p, n) for p, n in flat])


_REBUILD = ("build adapters with lj.init(params, config, key=...) from these params (or "
            "restore them with the params as the skeleton).")


def pair_with_params(params, adapters) -> list[tuple[str, Any, Any]]:
    """``[(path, param_leaf, adapter_node), ...]`` over the leaves of params.

    Raises:
      ValueError: ``adapters`` does not mirror ``params`` (showing where).
    """
    nodes = mirror(params, adapters, what="the adapter tree", fix=_REBUILD,
                   is_leaf=lambda x: is_node(x) or is_adalora(x))
    for (path, _), n in zip(leaves_with_paths(params), nodes, strict=True):
        if is_adalora(n):
            raise adalora_error(path)
    return [(path, x, n) for (path, x), n in zip(leaves_with_paths(params), nodes,
                                                            strict=True)]


def _shape(x):
    return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def check_adapters(params, adapters, config, *, resolved: Resolved | None = None
                   ) -> list[tuple[str, Any, Any, LeafSpec | None]]:
    """Validates ``adapters`` against ``params`` and ``config``.

    Returns ``[(path, param_leaf, adapter_node, spec_or_None), ...]``.

    Raises:
      ValueError: naming the path, for a targeted leaf without LoraWeights, an
        adapter on a leaf the config doesn't target, a shape mismatch (both
        shapes shown), factors that are not floating point, or a concrete
        scale that differs from ``config.scale_for(path)`` (unless
        ``config.scale_from == "adapters"``); see `resolve` for the params'
        own errors (swapped arguments among them).
    """
    resolved = resolved or resolve(params, config)
    train = set(resolved.train)
    out, scales = [], []
    for path, leaf, node in pair_with_params(params, adapters):
        spec = resolved.targets.get(path)
        if spec is not None:
            if _check_lora(path, node, spec, config):
                scales.append((path, node.scale, spec.rank))
        elif path in train:
            if node is None or is_lora(node):
                raise error(
                    path, f"LoraConfig.train names this leaf but adapters hold "
                    f"{type(node).__name__} there", "build adapters with lj.init for this config")
            if _shape(node) != _shape(leaf):
                raise error(
                    path, f"fully-trained leaf has shape {_shape(node)}, the base has "
                    f"{_shape(leaf)}", "use adapters made for this base")
        elif node is not None:
            raise error(
                path, f"adapters hold {type(node).__name__} here but the config neither "
                f"targets nor trains this leaf", "pass the config the adapters were created with")
        out.append((path, leaf, node, spec))
    check_scales(scales, config)
    return out


def _check_lora(path: str, node, spec: LeafSpec, config) -> bool:
    """One targeted leaf's node: LoraWeights of the spec's shapes, floating factors,
    a scale per adapter. True when its scale is to be compared with the config's."""
    if is_adalora(node):
        raise adalora_error(path)
    if not is_lora(node):
        raise error(
            path, f"the config targets this leaf but adapters hold "
            f"{type(node).__name__} there",
            "build adapters with lj.init for this config, or restore them with the "
            "config they were saved with")
    # An adapter *set* adds one leading axis to a, b and scale.
    extra = _shape(node.a)[: max(0, len(_shape(node.a)) - len(spec.a_shape))]
    if _shape(node.a) != (*extra, *spec.a_shape) or \
            _shape(node.b) != (*extra, *spec.b_shape):
        raise error(
            path, f"adapter shapes do not fit the weight {spec.shape} "
            f"(layout {spec.layout}, rank {spec.rank}):\n"
            f"  expected a {spec.a_shape}, b {spec.b_shape}\n"
            f"  got      a {_shape(node.a)}, b {_shape(node.b)}",
            "use the config and base the adapter was created for")
    check_floating(path, node)
    _check_magnitude(path, node, spec, extra, config)
    if _shape(node.scale) != extra:
        raise error(
            path, f"the adapter's scale has shape {_shape(node.scale)}, expected {extra} "
            f"(a scalar for one adapter, one value per adapter in a set; a is "
            f"{_shape(node.a)})",
            "keep the scale lj.init gives, jnp.float32(alpha / rank)")
    # Sets keep each member's own scale; only a single adapter's is the config's.
    return not extra and config.scale_from == "config"


def _dtype(x):
    return jnp.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def check_floating(path: str, node) -> None:
    """LoRA factors are trained by gradient descent: floating point only (a, b and
    DoRA's m may differ in dtype; `lj.apply` and `lj.merge` compute in float32)."""
    for field in ("a", "e", "b", "m"):
        x = getattr(node, field, None)
        if x is None:
            continue
        dtype = _dtype(x)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise error(
                path, f"the adapter's {field} has dtype {dtype.name} {_shape(x)}; LoRA "
                f"factors must be floating point (integer, bool or complex factors can't "
                f"be trained by gradient descent)",
                f"build adapters with lj.init (their dtype is LoraConfig.dtype), or cast "
                f"the factor, e.g. node._replace({field}=node.{field}.astype(jnp.float32))")


def _concrete(x) -> bool:
    """A value on this host's reach: not a tracer (inside jit) nor a ShapeDtypeStruct."""
    if isinstance(x, jax_core.Tracer):
        return False
    if isinstance(x, jax.Array):
        deleted = getattr(x, "is_deleted", lambda: False)()   # a donated buffer
        return x.is_fully_addressable and not deleted
    return isinstance(x, (np.ndarray, np.generic, int, float))


def check_scales(scales: list, config) -> None:
    """Each concrete scalar scale equals the config's ``alpha / rank`` (to the
    precision of the scale's dtype): else the adapters are paired with the wrong
    config, and apply, save and export would disagree on the model.

    ``scales`` holds ``(path, scale, rank)`` of single (not set) adapters; tracers
    and abstract values are skipped.
    """
    scales = [(path, x, rank) for path, x, rank in scales if _concrete(x)]
    if not scales:
        return
    values = jax.device_get([x for _, x, _ in scales])   # one transfer for all
    for (path, x, r), value in zip(scales, values, strict=True):
        spec = SimpleNamespace(rank=r, alpha=config.alpha_for(path),
                               scale=config.scale_for(path))
        stored, want = float(np.asarray(value, np.float64)), float(spec.scale)
        dtype = _dtype(x)
        eps = float(jnp.finfo(dtype).eps) if jnp.issubdtype(dtype, jnp.floating) else 0.0
        if abs(stored - want) <= max(1e-6, eps) * abs(want):
            continue
        rank = f"sqrt({spec.rank})" if config.use_rslora else f"{spec.rank}"
        fit = stored * (spec.rank ** 0.5 if config.use_rslora else spec.rank)
        raise error(
            path, f"the adapter's scale is {stored:.6g} but the config gives {want:.6g} = "
            f"alpha {spec.alpha:g} / rank {rank} (use_rslora={config.use_rslora}): the "
            f"adapters were made with another alpha, rank or use_rslora than this config",
            f"pass the config the adapters were made with (alpha={fit:.6g} here gives "
            f"{stored:.6g}, e.g. alpha_pattern={{r'{re.escape(path)}': {fit:.6g}}}), or "
            f"LoraConfig(scale_from='adapters') to use the adapters' scales as they are")


def _check_magnitude(path, node, spec: LeafSpec, extra: tuple, config) -> None:
    """DoRA's magnitude: present exactly when the config says, shaped (*stacked, out)."""
    if config.use_dora and node.m is None:
        raise error(
            path, "LoraConfig(use_dora=True) but the adapter has no magnitude m",
            "build adapters with lj.init for this config (it sets m to W's column norms), "
            "or pass the config they were made with")
    if not config.use_dora and node.m is not None:
        raise error(
            path, "the adapter has a DoRA magnitude m but the config has use_dora=False",
            "pass the config the adapters were made with (use_dora=True)")
    want = (*extra, *spec.stacked_shape, spec.out_size)
    if node.m is not None and _shape(node.m) != want:
        raise error(
            path, f"DoRA magnitude m has shape {_shape(node.m)}, expected {want} (one "
            f"value per output unit of the weight {spec.shape})",
            "use the adapter made for this base and config")


def scale_array(spec: LeafSpec):
    """The float32 scale of one leaf, as stored in `LoraWeights.scale`."""
    return jnp.asarray(spec.scale, jnp.float32)


def delta(weights: LoraWeights, spec: LeafSpec):
    """``scale * a @ b`` in float32, reshaped to the weight's shape.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((4, 6))}
      >>> cfg = lj.LoraConfig(rank=2, alpha=4, targets="w")
      >>> spec = lj.describe(params, cfg).specs["w"]
      >>> w = lj.LoraWeights(jnp.ones((4, 2)), jnp.ones((2, 6)), jnp.float32(2.0))
      >>> float(delta(w, spec)[0, 0])  # 2 * (1 + 1)
      4.0
    """
    if np.ndim(weights.a) != len(spec.a_shape):
        raise error(
            spec.path, f"a has shape {tuple(np.shape(weights.a))}, expected "
            f"{spec.a_shape}. An adapter set (leading adapter axis) can't be merged as "
            f"one adapter", "select one adapter from the set first")
    a = jnp.asarray(weights.a, jnp.float32)
    b = jnp.asarray(weights.b, jnp.float32)
    ab = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    scale = jax.lax.stop_gradient(jnp.asarray(weights.scale, jnp.float32))
    return from_matrix(scale * ab, spec)
