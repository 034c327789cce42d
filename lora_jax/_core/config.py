"""`LoraConfig`: what to adapt, at which rank, with which scale.

The config is a frozen, keyword-only, hashable dataclass, so it can be a
static argument of `jax.jit` and a dictionary key. Every field is validated
on construction; a bad value raises naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Union

import jax.numpy as jnp
import numpy as np

from lora_jax._core.errors import error

__all__ = ["LoraConfig", "Layout", "INITS", "SCALE_FROM", "LoraWarning", "normalize_patterns"]


class LoraWarning(UserWarning):
    """Category of every warning lora_jax emits (filter it as one)."""


class Layout(NamedTuple):
    """How a weight's axes split into stacked, input and output axes.

    By default a weight of shape ``(*stacked, *in, *out)`` is adapted as
    ``a: (*stacked, prod(in), rank)`` and ``b: (*stacked, rank, prod(out))``.
    Weights stored in another axis order say so with ``order``: the weight's
    axis numbers listing its stacked axes, then its input axes, then its
    output axes (an Equinox ``Linear`` weight ``(out, in)`` is
    ``Layout(0, 1, 1, order=(1, 0))``). `lj.configure` reads layouts from the
    program that uses the weights.

    Attributes:
      n_stacked: axes that index independent copies (layers stacked by
        ``nn.scan`` or ``vmap``); each copy gets its own A and B.
      n_in: axes contracted with the layer's input (``x @ W``).
      n_out: the remaining axes, produced by the layer.
      order: None (axes in ``(*stacked, *in, *out)`` order), or a permutation
        of the weight's axes in that order.

    Example:
      >>> Layout(n_stacked=0, n_in=1, n_out=2)  # q kernel (d, heads, head_dim)
      Layout(n_stacked=0, n_in=1, n_out=2, order=None)
      >>> Layout(0, 1, 2, order=(1, 0, 2)).axes()   # Gemma's q (heads, d, head_dim)
      ('out', 'in', 'out')
    """

    n_stacked: int
    n_in: int
    n_out: int
    order: tuple | None = None

    @property
    def ndim(self) -> int:
        return self.n_stacked + self.n_in + self.n_out

    def __str__(self) -> str:
        head = f"({self.n_stacked}, {self.n_in}, {self.n_out}"
        return head + (")" if self.order is None else f", order={self.order})")

    def axes(self) -> tuple:
        """The role of each axis of the weight: ``"stacked"``, ``"in"`` or ``"out"``."""
        ndim = self.ndim
        order = self.order or tuple(range(ndim))
        kinds = ["stacked"] * self.n_stacked + ["in"] * self.n_in + ["out"] * self.n_out
        out = [""] * ndim
        for kind, ax in zip(kinds, order, strict=True):
            out[ax] = kind
        return tuple(out)

    def to_list(self) -> list:
        """JSON form: ``[n_stacked, n_in, n_out]`` (plus the order when there is one)."""
        head = [self.n_stacked, self.n_in, self.n_out]
        return head if self.order is None else head + [list(self.order)]


# Pattern specs accepted for `targets`, `exclude` and `train`.
PathSpec = Union[str, tuple, Callable[[str, Any], bool], None]

INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq")
"""Names accepted by `LoraConfig.init`: ``kaiming``/``gaussian`` draw A (B
starts at 0); ``pissa``/``olora`` compute A and B from W and change the base;
``loftq`` quantizes the base and fits A and B to its quantization error
(`lj.init(..., return_params=True)`)."""

SCALE_FROM = ("config", "adapters")
"""Values of `LoraConfig.scale_from`: which scale wins when the adapters' stored
scale differs from ``alpha / rank``."""


def _field_error(field: str, value: Any, why: str, fix: str, *, where: str | None = None,
                 kind: type = ValueError) -> Exception:
    """``LoraConfig.<field>: <value> is invalid: <why>``; with ``where`` (a function
    taking the same kind of argument, e.g. ``lj.quantize``) ``<where>: <field>=<value> ...``."""
    if where is None:
        return error(f"LoraConfig.{field}", f"{value!r} is invalid: {why}", fix, kind=kind)
    return error(where, f"{field}={value!r} is invalid: {why}", fix, kind=kind)


def normalize_patterns(field: str, spec: PathSpec, *, allow_none: bool,
                       where: str | None = None):
    """Returns a tuple of compiled-checked regex strings, or the callable.

    Errors name ``LoraConfig.<field>``, or ``where`` (e.g. ``lj.quantize``) when
    the patterns are another function's argument.
    """
    if spec is None:
        if allow_none:
            return ()
        raise _field_error(
            field, spec, "it is required",
            f"pass a regex fullmatched against '/'-joined paths, e.g. "
            f"{field}=r'.*/(query|value)/kernel'", where=where)
    if callable(spec) and not isinstance(spec, str):
        return spec
    if isinstance(spec, str):
        spec = (spec,)
    if isinstance(spec, (list, tuple)):
        out = []
        for p in spec:
            if not isinstance(p, str):
                raise _field_error(
                    field, spec, f"element {p!r} is a {type(p).__name__}, not a str",
                    "use regex strings, or a single (path, leaf) -> bool callable",
                    where=where)
            try:
                re.compile(p)
            except re.error as e:
                raise _field_error(field, p, f"not a valid regex ({e})",
                                   "escape special characters, e.g. re.escape(name)",
                                   where=where) from None
            out.append(p)
        if not out and not allow_none:
            raise _field_error(field, spec, "it is empty", "give at least one pattern",
                               where=where)
        return tuple(out)
    raise _field_error(
        field, spec, f"it must be a regex str, a tuple of them, or a (path, leaf) -> bool "
        f"callable; got {type(spec).__name__}",
        f"e.g. {field}=r'.*/(query|value)/kernel', or {field}=lambda path, leaf: ...",
        where=where, kind=TypeError)


def _normalize_pattern_map(field: str, mapping, check_value) -> tuple:
    if mapping is None:
        return ()
    items = mapping.items() if isinstance(mapping, Mapping) else mapping
    out = []
    try:
        items = list(items)
    except TypeError:
        raise error(
            f"LoraConfig.{field}",
            f"it must be a mapping {{regex: value}} or a sequence of (regex, value) pairs; "
            f"got {type(mapping).__name__}",
            f"pass a dict such as {field}={{r'.*/fc2/kernel': ...}}", kind=TypeError) from None
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise _field_error(field, mapping, f"entry {item!r} is not a (regex, value) pair",
                               "pass a dict such as {r'.*/fc2/kernel': 4}")
        pattern, value = item
        if not isinstance(pattern, str):
            raise _field_error(field, mapping, f"key {pattern!r} is not a str",
                               "keys are regexes fullmatched against '/'-joined paths")
        try:
            re.compile(pattern)
        except re.error as e:
            raise _field_error(field, pattern, f"not a valid regex ({e})",
                               "escape special characters") from None
        out.append((pattern, check_value(pattern, value)))
    return tuple(out)


def _check_rank(field, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise _field_error(field, value, "the rank must be a positive int",
                           f"use e.g. {field}=8")
    return int(value)


def _check_alpha(field, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
            or not math.isfinite(float(value)) or float(value) <= 0:
        raise _field_error(field, value, "alpha must be a finite number > 0",
                           f"use e.g. {field}=16 (scale = alpha / rank)")
    return float(value)


def _check_layout(pattern, value, field: str = "layouts"):
    if isinstance(value, Layout):
        lay = value
    elif isinstance(value, (tuple, list)) and len(value) in (3, 4):
        lay = Layout(*value)
    else:
        raise _field_error(
            field, {pattern: value}, "a layout is (n_stacked, n_in, n_out[, order])",
            "use lj.Layout(n_stacked=0, n_in=1, n_out=2) for a (d, heads, head_dim) kernel")
    for name, v, lo in (("n_stacked", lay.n_stacked, 0), ("n_in", lay.n_in, 1),
                        ("n_out", lay.n_out, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise _field_error(field, {pattern: value}, f"{name}={v!r} must be an int >= {lo}",
                               "count axes: n_stacked >= 0, n_in >= 1, n_out >= 1")
    order = lay.order
    if order is not None:
        nd = int(lay.n_stacked) + int(lay.n_in) + int(lay.n_out)
        ok = isinstance(order, (tuple, list)) and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in order)
        if not ok or sorted(int(i) for i in order) != list(range(nd)):
            raise _field_error(field, {pattern: value},
                               f"order={order!r} must list each of the {nd} axes once",
                               "give the axis numbers of the stacked, then input, then output "
                               "axes, e.g. order=(1, 0) for an (out, in) weight")
        order = tuple(int(i) for i in order)
        order = None if order == tuple(range(nd)) else order
    return Layout(int(lay.n_stacked), int(lay.n_in), int(lay.n_out), order)


def _check_inferred(pattern, value):
    if isinstance(value, tuple) and len(value) == 2 and not isinstance(value[0], int):
        lay, note = value
    else:
        lay, note = value, ""
    if not isinstance(note, str):
        raise _field_error("inferred_layouts", {pattern: value}, "the source note must be a str",
                           "pass (Layout, 'what it was read from') pairs (lj.configure does)")
    return (_check_layout(pattern, lay, "inferred_layouts"), note)


def _check_tied(value) -> tuple:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(p, str) for p in value):
        raise _field_error("tied", value, "it must be a tuple of '/'-joined paths",
                           "pass e.g. tied=('params/embed/embedding',), or let lj.configure "
                           "find the weights the program ties")
    return tuple(value)


def _first_match(pairs: tuple, path: str):
    for pattern, value in pairs:
        if re.fullmatch(pattern, path):
            return value
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which weights get LoRA adapters, and how.

    ``scale = alpha / rank`` (or ``alpha / sqrt(rank)`` with ``use_rslora``);
    the adapted weight is ``W + scale * a @ b`` with ``a: (..., in, rank)``
    and ``b: (..., rank, out)``.

    Args:
      targets: which leaves to adapt. A regex fullmatched against each leaf's
        ``'/'``-joined path (``'params/block_0/q/kernel'``), a tuple of them,
        or a ``(path, leaf) -> bool`` callable.
      rank: rank of the update; ``rank_pattern`` overrides it per path.
      alpha: scale numerator; ``alpha_pattern`` overrides it per path.
      exclude: paths never adapted even if they match ``targets`` (same forms).
      rank_pattern: ``{regex: rank}``; the first fullmatching regex wins.
      alpha_pattern: ``{regex: alpha}``; the first fullmatching regex wins.
      dropout: dropout rate on the LoRA branch input only, as in PEFT's
        ``B(A(dropout(x)))``; in ``[0, 1)``.
      init: how the factors start: ``"kaiming"`` (A uniform in
        ``+-1/sqrt(in)``, B = 0; PEFT's default), ``"gaussian"`` (A with std
        ``1/rank``, B = 0), ``"pissa"`` (A, B from the top-``rank`` SVD of W)
        or ``"olora"`` (from the QR of W). The last two move ``scale * a @ b``
        out of the base, so `lj.init` must return the new base:
        ``params, adapters = lj.init(params, cfg, return_params=True)``.
        ``"loftq"`` (LoftQ, Li et al. 2023) quantizes the base and fits
        ``scale * a @ b`` to what the quantization loses, so that the
        quantized base plus the adapter is closer to W than the quantized
        base alone: ``q, adapters = lj.init(params, cfg, return_params=True,
        quantized=lj.quantize(params, config=cfg))``.
      loftq_iters: LoftQ's alternating rounds (quantize ``W - scale * a @ b``,
        then refit ``a, b`` by SVD); an int >= 1, 1 by default (PEFT's
        ``loftq_iter``). Only ``init="loftq"`` reads it, so another value
        with another init is an error.
      use_rslora: scale by ``alpha / sqrt(rank)`` (rank-stabilized LoRA).
      use_dora: DoRA (weight-decomposed LoRA): each adapter also trains a
        magnitude ``m`` per output unit, and the weight becomes
        ``m * (W + scale * a @ b) / ||W + scale * a @ b||`` (norm over the
        input axes, treated as a constant in the backward pass).
      dtype: dtype of A and B (float32 by default, whatever the base dtype).
      train: leaves trained fully, not through LoRA (a classifier head, norms:
        PEFT's ``modules_to_save``). Same forms as ``targets``.
      layouts: ``{regex: Layout}`` axis splits you declare (they always win):
        stacked layers, multi-head ``DenseGeneral``/``Einsum`` kernels, other
        axis orders. Defaults: 2-D ``(in, out)``; N-D ``(*in, out)`` (conv
        kernels ``(*spatial, in, out)``, out-projections ``(heads, head_dim,
        d)``). `lj.apply` refuses a default layout the program contradicts.
      inferred_layouts: layouts read from the program by `lj.configure`, as
        ``{path: (Layout, what it was read from)}``; used where ``layouts``
        says nothing. Set by `lj.configure`, rarely by hand.
      tied: paths of weights the model also uses transposed as its output
        projection (an embedding tied to the LM head); `lj.configure` finds
        them, and `lj.export_peft` then writes PEFT's ``ensure_weight_tying``.
        Each must be the path of a leaf of the params.
      scale_from: which side's scale wins. ``"config"`` (the default): the
        scale is ``alpha / rank`` and a concrete ``LoraWeights.scale`` that
        differs is an error (adapters paired with the wrong config).
        ``"adapters"``: each adapter's stored scale is used as it is, whatever
        alpha and rank say -- an adapter set's config, whose members keep
        their own alphas and ranks (`lj.select_adapter` without ``trim``).

    Every pattern must apply somewhere, or resolving the config against
    params raises listing real paths: each ``targets`` pattern matches a leaf
    (one of several matching nothing only warns), each ``exclude`` pattern a
    leaf that ``targets`` matches, each ``rank_pattern``, ``alpha_pattern``
    and ``layouts`` key a targeted leaf, and each ``inferred_layouts`` key
    and ``tied`` path a leaf of the params.

    Example:
      >>> import lora_jax as lj
      >>> cfg = lj.LoraConfig(rank=8, alpha=16, targets=r".*/(q|v)/kernel")
      >>> cfg.scale_for("params/block_0/q/kernel")
      2.0
      >>> lj.LoraConfig(rank=8, alpha=16, targets=".*", use_rslora=True).scale_for("w")
      5.65685424949238
    """

    targets: PathSpec = None
    rank: int = 8
    alpha: float = 8.0
    exclude: PathSpec = ()
    rank_pattern: Any = ()
    alpha_pattern: Any = ()
    dropout: float = 0.0
    init: str = "kaiming"
    loftq_iters: int = 1
    use_rslora: bool = False
    use_dora: bool = False
    dtype: Any = np.float32
    train: PathSpec = ()
    layouts: Any = ()
    inferred_layouts: Any = ()
    tied: Any = ()
    scale_from: str = "config"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("targets", normalize_patterns("targets", self.targets, allow_none=False))
        set_("exclude", normalize_patterns("exclude", self.exclude, allow_none=True))
        set_("train", normalize_patterns("train", self.train, allow_none=True))
        set_("rank", _check_rank("rank", self.rank))
        set_("alpha", _check_alpha("alpha", self.alpha))
        set_("rank_pattern", _normalize_pattern_map(
            "rank_pattern", self.rank_pattern, lambda p, v: _check_rank(f"rank_pattern[{p!r}]", v)))
        set_("alpha_pattern", _normalize_pattern_map(
            "alpha_pattern", self.alpha_pattern,
            lambda p, v: _check_alpha(f"alpha_pattern[{p!r}]", v)))
        set_("layouts", _normalize_pattern_map("layouts", self.layouts, _check_layout))
        set_("inferred_layouts", _normalize_pattern_map("inferred_layouts",
                                                        self.inferred_layouts, _check_inferred))
        set_("tied", _check_tied(self.tied))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= float(self.dropout) < 1.0:
            raise _field_error("dropout", self.dropout, "dropout must be in [0, 1)",
                               "use e.g. dropout=0.05, or 0.0 for none")
        set_("dropout", float(self.dropout))
        if self.init not in INITS:
            raise _field_error("init", self.init, f"known inits are {INITS}",
                               'use init="kaiming" (PEFT\'s default) or init="gaussian"')
        if isinstance(self.loftq_iters, bool) \
                or not isinstance(self.loftq_iters, (int, np.integer)) or self.loftq_iters < 1:
            raise _field_error("loftq_iters", self.loftq_iters,
                               "LoftQ's alternating rounds must be an int >= 1",
                               "use e.g. loftq_iters=5 (1, the default, is one quantization "
                               "and one SVD)")
        set_("loftq_iters", int(self.loftq_iters))
        if self.loftq_iters != 1 and self.init != "loftq":
            raise _field_error("loftq_iters", self.loftq_iters,
                               f"only init='loftq' reads it, and init={self.init!r}",
                               "use init='loftq' to start from LoftQ, or leave loftq_iters at "
                               "its default (1)")
        if self.scale_from not in SCALE_FROM:
            raise _field_error("scale_from", self.scale_from, f"it must be one of {SCALE_FROM}",
                               'use scale_from="config" (scale = alpha / rank; the default), or '
                               '"adapters" to use the scales stored in the adapters')
        if not isinstance(self.use_dora, bool):
            raise _field_error("use_dora", self.use_dora, "it must be a bool",
                               "use use_dora=True or False")
        if not isinstance(self.use_rslora, bool):
            raise _field_error("use_rslora", self.use_rslora, "it must be a bool",
                               "use use_rslora=True or False")
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            raise _field_error("dtype", self.dtype, "not a dtype",
                               "use jnp.float32 or jnp.bfloat16") from None
        if not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
            raise _field_error("dtype", self.dtype, "adapters must be floating point",
                               "use jnp.float32 (default) or jnp.bfloat16")
        set_("dtype", dtype)

    # -- per-path resolution ------------------------------------------------
    def rank_for(self, path: str) -> int:
        """The rank used for the leaf at ``path`` (``rank_pattern`` first)."""
        r = _first_match(self.rank_pattern, path)
        return self.rank if r is None else r

    def alpha_for(self, path: str) -> float:
        """The alpha used for the leaf at ``path`` (``alpha_pattern`` first)."""
        a = _first_match(self.alpha_pattern, path)
        return self.alpha if a is None else a

    def scale_for(self, path: str) -> float:
        """``alpha / rank`` for ``path`` (``alpha / sqrt(rank)`` with rsLoRA)."""
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.use_rslora else r)

    def layout_for(self, path: str) -> Layout | None:
        """The layout of ``path``: declared (``layouts``) first, then read from the
        program (``inferred_layouts``); None for the default."""
        lay = _first_match(self.layouts, path)
        if lay is None:
            hit = _first_match(self.inferred_layouts, path)
            lay = None if hit is None else hit[0]
        return lay

    def layout_source(self, path: str) -> tuple[str, str]:
        """Where ``path``'s layout comes from: ``("explicit", "")`` (``layouts``),
        ``("inferred", what it was read from)`` (`lj.configure`) or ``("default", "")``.

        Example:
          >>> import lora_jax as lj
          >>> cfg = lj.LoraConfig(targets=".*", layouts={"w": lj.Layout(1, 1, 1)})
          >>> cfg.layout_source("w"), cfg.layout_source("v")
          (('explicit', ''), ('default', ''))
        """
        if _first_match(self.layouts, path) is not None:
            return ("explicit", "")
        hit = _first_match(self.inferred_layouts, path)
        return ("default", "") if hit is None else ("inferred", hit[1])

    def with_ranks(self, ranks: Mapping[str, int], *, paths=None,
                   unit_scale: bool = False) -> LoraConfig:
        """A copy giving rank ``ranks[path]`` at each path in ``ranks``.

        Paths in ``paths`` (default: those of ``ranks``) that ``ranks`` does not
        name keep their rank. When every one of ``paths`` ends up at one rank
        (and no other ``rank_pattern`` entry is needed) that becomes ``rank``;
        otherwise exact-path ``rank_pattern`` entries are added in front.
        ``alpha`` is kept (so the scale follows the new rank), unless
        ``unit_scale``: then ``alpha = rank`` per path and rsLoRA is off, so
        every scale is 1 (PEFT's combined adapters).

        Example:
          >>> import lora_jax as lj
          >>> cfg = lj.LoraConfig(rank=8, targets=".*")
          >>> c = cfg.with_ranks({"q/kernel": 4}, paths=["q/kernel", "v/kernel"])
          >>> c.rank_for("q/kernel"), c.rank_for("v/kernel")
          (4, 8)
          >>> cfg.with_ranks({"q/kernel": 2, "v/kernel": 2}).rank
          2
        """
        if not ranks and not unit_scale:
            return self
        paths = list(ranks) if paths is None else list(paths)
        for p, r in ranks.items():
            _check_rank(f"with_ranks[{p!r}]", r)
        final = {p: int(ranks.get(p, self.rank_for(p))) for p in paths}
        covers = set(ranks) >= set(paths)
        values = set(final.values())
        changes: dict = {}
        if len(values) == 1 and (covers or not self.rank_pattern):
            changes.update(rank=values.pop(), rank_pattern=())
        else:
            keep = () if covers else tuple(self.rank_pattern)
            changes.update(rank_pattern=tuple((re.escape(p), int(r)) for p, r in ranks.items())
                           + keep)
        if unit_scale:
            # Every scale is 1 = alpha / rank again: the config's scale is right.
            changes.update(use_rslora=False, alpha_pattern=(), scale_from="config")
            if "rank" in changes:
                changes.update(alpha=float(changes["rank"]))
            else:
                changes.update(alpha_pattern=tuple((re.escape(p), float(r))
                                                   for p, r in final.items()))
        return self.replace(**changes)

    def replace(self, **changes) -> LoraConfig:
        """A copy with some fields changed (validated again).

        Example:
          >>> import lora_jax as lj
          >>> lj.LoraConfig(targets=".*").replace(rank=4).rank
          4
        """
        return dataclasses.replace(self, **changes)

    # -- serialization --------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dict (fails for callable path specs, which can't be saved).

        Example:
          >>> import lora_jax as lj
          >>> d = lj.LoraConfig(targets=r".*/q/kernel", rank=4).to_dict()
          >>> d["rank"], d["targets"]
          (4, ['.*/q/kernel'])
          >>> lj.LoraConfig.from_dict(d) == lj.LoraConfig(targets=r".*/q/kernel", rank=4)
          True
        """
        out = {}
        for f in dataclasses.fields(self):
            v: Any = getattr(self, f.name)
            if f.name in ("scale_from", "loftq_iters") and v == f.default:
                continue  # the default is left out: such files stay as older versions wrote them
            if callable(v) and not isinstance(v, (str, tuple)):
                raise error(
                    f"LoraConfig.{f.name}",
                    f"it is a callable ({v!r}), which can't be written to a file",
                    f"express it as regexes, e.g. {f.name}=r'.*/q/kernel'")
            if f.name in ("rank_pattern", "alpha_pattern"):
                v = {p: x for p, x in v}
            elif f.name == "layouts":
                v = {p: lay.to_list() for p, lay in self.layouts}
            elif f.name == "inferred_layouts":
                v = {p: {"layout": lay.to_list(), "from": note}
                     for p, (lay, note) in self.inferred_layouts}
            elif f.name == "dtype":
                v = self.dtype.name
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> LoraConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise error(
                "LoraConfig.from_dict",
                f"unknown fields {unknown}; known fields are {sorted(names)} (the data was "
                f"written by a newer lora_jax, or edited)",
                "remove the unknown keys or upgrade lora_jax")
        kw = dict(data)
        for name in ("targets", "exclude", "train"):
            if isinstance(kw.get(name), list):
                kw[name] = tuple(kw[name])
        if isinstance(kw.get("layouts"), Mapping):
            kw["layouts"] = {p: tuple(v) for p, v in kw["layouts"].items()}
        if isinstance(kw.get("inferred_layouts"), Mapping):
            kw["inferred_layouts"] = {
                p: (tuple(v["layout"]), v.get("from", "")) if isinstance(v, Mapping) else v
                for p, v in kw["inferred_layouts"].items()}
        return cls(**kw)
