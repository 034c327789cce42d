"""Quantized frozen weights (QLoRA): `NF4Weight`, `Int8Weight`, `quantize`.

`quantize` replaces chosen weights of a params tree by containers that
store them in 4 or 8 bits; everything else in lora_jax (`resolve`, `init`,
`merge`, `describe`, `summary`, `apply`) sees a container as one leaf with
the weight's logical ``shape`` and ``dtype`` (see `lora_jax._core.paths.LeafContainer`).
`lj.apply` dequantizes each weight where the model uses it, inside the
traced function, so a dense copy of one weight exists at a time; the LoRA
factors stay in their own dtype.

NF4 (QLoRA, Dettmers et al. 2023): each block of 64 consecutive elements
(row-major, per stacked slice) is scaled by its absolute maximum and every
element is stored as a 4-bit index into the 16 NormalFloat levels (`nf4_levels`,
built from normal quantiles exactly as the paper does). The block maxima
are "double quantized": their mean is subtracted and the rest stored as
int8 with one float32 scale per 256 blocks. Storage per element:
``4 + 8/64 + 32/(64*256) = 4.127`` bits (plus 4 bytes per stacked slice).
Unlike bitsandbytes, which stores the block maxima in its 8-bit dynamic
(tree) float format, the int8 codes here are linear -- the same bits, and
for block maxima, which cluster tightly, a smaller error -- and the 4-bit
codes are chosen against the *dequantized* maxima, so the second level's
rounding is not compounded.

Int8: symmetric absmax quantization per output channel (the maximum over
the input axes of each output unit, as `LoraConfig.layouts` splits them).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core

from lora_jax._core.config import Layout, LoraConfig, LoraWarning, normalize_patterns
from lora_jax._core.errors import error, message
from lora_jax._core.fmt import sample_paths
from lora_jax._core.leaf import LeafContainer, is_container, register_container
from lora_jax._core.paths import flatten_params, map_params, matcher, path_str

__all__ = ["NF4Weight", "Int8Weight", "quantize", "dequantize", "is_quantized",
           "nf4_levels", "quantize_as", "requantize_merged", "METHODS"]

METHODS = ("nf4", "int8")
"""Names accepted by `quantize(..., method=)`."""

_NF4_OFFSET = 0.5 * ((1 - 1 / 32) + (1 - 1 / 30))   # QLoRA's 0.9677083


def nf4_levels() -> np.ndarray:
    """The 16 NormalFloat (NF4) levels, from QLoRA's quantile construction (float64).

    8 positive levels are the normal quantiles at ``linspace(d, 0.5, 9)[:-1]``
    and 7 negative ones at ``linspace(d, 0.5, 8)[:-1]``, with
    ``d = (1 - 1/32 + 1 - 1/30) / 2``, plus an exact zero; all divided by
    the largest, so they span ``[-1, 1]``.

    Example:
      >>> import lora_jax as lj
      >>> v = lj.nf4_levels()
      >>> len(v), float(v[0]), float(v[7]), float(v[-1])
      (16, -1.0, 0.0, 1.0)
      >>> round(float(v[8]), 6)   # bitsandbytes' table: 0.07958029955625534
      0.07958
    """
    nd = NormalDist()
    pos = [nd.inv_cdf(p) for p in np.linspace(_NF4_OFFSET, 0.5, 9)[:-1]]
    neg = [-nd.inv_cdf(p) for p in np.linspace(_NF4_OFFSET, 0.5, 8)[:-1]]
    v = np.sort(np.array(pos + [0.0] + neg, np.float64))
    return v / v.max()


_NF4 = nf4_levels().astype(np.float32)
_NF4_MID = ((_NF4[1:] + _NF4[:-1]) / 2).astype(np.float32)


def _prod(shape) -> int:
    return int(math.prod(shape))


@register_container
class NF4Weight(LeafContainer):
    """A frozen weight stored in 4-bit NormalFloat with double-quantized scales.

    Built by `quantize` (``method="nf4"``); a registered pytree, so it goes
    through ``jit``, ``scan`` and ``device_put`` like an array. Slicing the
    leading (stacked) axis of every child gives the container of one slice,
    which is how ``nn.scan`` stacks are dequantized layer by layer.

    Attributes:
      codes: ``(*stacked, n_blocks * block_size // 2)`` uint8, two 4-bit
        level indices per byte (high nibble first).
      absmax_codes: ``(*stacked, n_blocks)`` int8: each block's absolute
        maximum minus ``absmax_offset``, in units of its ``absmax_scale``.
      absmax_scale: ``(*stacked, ceil(n_blocks / scale_block))`` float32.
      absmax_offset: ``(*stacked,)`` float32, the mean of the block maxima.
      inner_shape: the shape of one stacked slice (static).
      block_size: elements per block (64); scale_block: blocks per
        second-level scale (256).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> w = jax.random.normal(jax.random.key(0), (256, 128), jnp.bfloat16)
      >>> q = lj.quantize({"w": w}, targets="w")["w"]
      >>> q.shape, q.dtype, q.nbytes / (w.size * 2)   # bytes vs bfloat16
      ((256, 128), dtype(bfloat16), 0.25799560546875)
      >>> float(jnp.abs(q.dequantize() - w).max() / jnp.abs(w).max()) < 0.15
      True
    """

    _children = ("codes", "absmax_codes", "absmax_scale", "absmax_offset")
    method = "nf4"

    def _aux(self):
        return (self.inner_shape, self._dtype, self.block_size, self.scale_block)

    def _set_aux(self, aux):
        self.inner_shape, self._dtype, self.block_size, self.scale_block = aux

    def __init__(self, codes, absmax_codes, absmax_scale, absmax_offset, *, inner_shape,
                 dtype, block_size: int = 64, scale_block: int = 256):
        self.codes, self.absmax_codes = codes, absmax_codes
        self.absmax_scale, self.absmax_offset = absmax_scale, absmax_offset
        self._set_aux((tuple(int(n) for n in inner_shape), jnp.dtype(dtype).name,
                       int(block_size), int(scale_block)))

    @property
    def dtype(self):
        """The logical dtype (what `dequantize` returns)."""
        return jnp.dtype(self._dtype)

    @property
    def shape(self) -> tuple:
        """The logical shape: ``(*stacked, *inner_shape)``."""
        return tuple(self.codes.shape[:-1]) + self.inner_shape


    def absmax(self):
        """The dequantized block maxima, ``(*stacked, n_blocks)`` float32."""
        return _nf4_absmax(self.absmax_codes, self.absmax_scale, self.absmax_offset,
                           self.scale_block)

    def dequantize(self, *, dtype=None):
        """The dense weight, in ``dtype`` (default: the logical dtype)."""
        return _nf4_dequantize(self.codes, self.absmax(), self.inner_shape, self.block_size,
                               jnp.dtype(dtype or self.dtype))

    def requantize(self, dense) -> NF4Weight:
        """``dense`` (this container's shape) quantized with the same settings."""
        return _quantize_nf4(dense, len(self.shape) - len(self.inner_shape), self.dtype,
                             self.block_size, self.scale_block)

    def settings(self) -> dict:
        """The JSON-able settings `quantize_as` rebuilds this storage from."""
        return {"method": "nf4", "n_stacked": len(self.shape) - len(self.inner_shape),
                "block_size": self.block_size, "scale_block": self.scale_block}

    def rounding_bound(self) -> float:
        """A bound on ``|dequantize() - original|`` over every element: half the
        widest gap between NF4 levels times the largest block maximum."""
        return float(jnp.max(self.absmax())) * float(np.max(np.diff(_NF4))) / 2 * (1 + 1e-6)

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={self.shape}, dtype={self.dtype.name}, "
                f"block_size={self.block_size})")


@register_container
class Int8Weight(LeafContainer):
    """A frozen weight stored as int8 with one float32 scale per output unit.

    Built by `quantize` (``method="int8"``). ``q * scale`` is the weight;
    the scale is the absolute maximum over the input axes of each output
    unit, divided by 127.

    Attributes:
      q: int8, the weight's shape ``(*stacked, *in, *out)``.
      scale: float32, the weight's shape with its input axes of size 1.
      in_axes: the weight's input axes (static): the scale is the maximum over
        them, one per output unit (and stacked copy).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> w = jax.random.normal(jax.random.key(0), (256, 128), jnp.bfloat16)
      >>> q = lj.quantize({"w": w}, targets="w", method="int8")["w"]
      >>> q.scale.shape, q.nbytes / (w.size * 2)
      ((1, 128), 0.5078125)
    """

    _children = ("q", "scale")
    method = "int8"

    def _aux(self):
        return (self.in_axes, self._dtype)

    def _set_aux(self, aux):
        self.in_axes, self._dtype = aux

    def __init__(self, q, scale, *, in_axes, dtype):
        self.q, self.scale = q, scale
        self._set_aux((tuple(int(a) for a in in_axes), jnp.dtype(dtype).name))

    @property
    def dtype(self):
        """The logical dtype (what `dequantize` returns)."""
        return jnp.dtype(self._dtype)

    @property
    def shape(self) -> tuple:
        return tuple(self.q.shape)


    def dequantize(self, *, dtype=None):
        """The dense weight, in ``dtype`` (default: the logical dtype)."""
        return (self.q.astype(jnp.float32) * self.scale).astype(jnp.dtype(dtype or self.dtype))

    def requantize(self, dense) -> Int8Weight:
        """``dense`` (this container's shape) quantized with the same settings."""
        return _quantize_int8(dense, self.in_axes, self.dtype)

    def settings(self) -> dict:
        """The JSON-able settings `quantize_as` rebuilds this storage from."""
        return {"method": "int8", "in_axes": list(self.in_axes)}

    def rounding_bound(self) -> float:
        """A bound on ``|dequantize() - original|``: half the largest step."""
        return float(jnp.max(self.scale)) / 2 * (1 + 1e-6)

    def __repr__(self) -> str:
        return f"Int8Weight(shape={self.shape}, dtype={self.dtype.name})"


def is_quantized(x) -> bool:
    """True for a quantized weight (`NF4Weight`, `Int8Weight`); use as ``is_leaf=``.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> p = lj.quantize({"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}, targets="w")
      >>> lj.is_quantized(p["w"]), lj.is_quantized(p["b"])
      (True, False)
    """
    return isinstance(x, (NF4Weight, Int8Weight))


# ----------------------------------------------------------------------------- the math


def _nf4_absmax(codes, scale, offset, scale_block):
    n_blocks = codes.shape[-1]
    n2 = scale.shape[-1]
    pad = n2 * scale_block - n_blocks
    q = jnp.pad(codes.astype(jnp.float32), [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    q = q.reshape(*codes.shape[:-1], n2, scale_block) * scale[..., None]
    return q.reshape(*codes.shape[:-1], n2 * scale_block)[..., :n_blocks] + offset[..., None]


def _nf4_dequantize(codes, absmax, inner_shape, block_size, dtype):
    lead = codes.shape[:-1]
    hi = (codes >> 4).astype(jnp.int32)
    lo = (codes & 0xF).astype(jnp.int32)
    idx = jnp.stack([hi, lo], axis=-1).reshape(*lead, absmax.shape[-1], block_size)
    vals = jnp.asarray(_NF4)[idx] * absmax[..., None]
    n = _prod(inner_shape)
    return vals.reshape(*lead, -1)[..., :n].reshape(*lead, *inner_shape).astype(dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_nf4_arrays(x, n_stacked, inner_shape, block_size, scale_block):
    lead = x.shape[:n_stacked]
    n = _prod(inner_shape)
    n_blocks = -(-n // block_size)
    flat = x.astype(jnp.float32).reshape(*lead, n)
    flat = jnp.pad(flat, [(0, 0)] * n_stacked + [(0, n_blocks * block_size - n)])
    blocks = flat.reshape(*lead, n_blocks, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    # Double quantization of the block maxima: mean offset, int8 per 256 blocks.
    offset = jnp.mean(absmax, axis=-1)
    n2 = -(-n_blocks // scale_block)
    dev = jnp.pad(absmax - offset[..., None],
                  [(0, 0)] * n_stacked + [(0, n2 * scale_block - n_blocks)])
    dev = dev.reshape(*lead, n2, scale_block)
    scale = jnp.max(jnp.abs(dev), axis=-1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q_abs = jnp.clip(jnp.round(dev / scale[..., None]), -127, 127)
    q_abs = q_abs.reshape(*lead, n2 * scale_block)[..., :n_blocks].astype(jnp.int8)
    # Codes are chosen against the maxima as dequantization will see them.
    used = _nf4_absmax(q_abs, scale, offset, scale_block)
    safe = jnp.where(used != 0, used, 1.0)
    idx = jnp.searchsorted(jnp.asarray(_NF4_MID), blocks / safe[..., None]).astype(jnp.uint8)
    packed = (idx[..., 0::2] << 4) | idx[..., 1::2]
    return packed.reshape(*lead, n_blocks * block_size // 2), q_abs, scale, offset


def _quantize_nf4(x, n_stacked: int, dtype, block_size: int = 64, scale_block: int = 256):
    inner = tuple(int(n) for n in x.shape[n_stacked:])
    codes, q_abs, scale, offset = _quantize_nf4_arrays(x, n_stacked, inner, block_size,
                                                       scale_block)
    return NF4Weight(codes, q_abs, scale, offset, inner_shape=inner, dtype=dtype,
                     block_size=block_size, scale_block=scale_block)


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_int8_arrays(x, in_axes):
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=in_axes, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def _quantize_int8(x, in_axes: tuple, dtype):
    q, scale = _quantize_int8_arrays(x, tuple(in_axes))
    return Int8Weight(q, scale, in_axes=in_axes, dtype=dtype)


def _in_axes(layout: Layout) -> tuple:
    order = layout.order or tuple(range(layout.ndim))
    return tuple(order[layout.n_stacked: layout.n_stacked + layout.n_in])


def _leading_stacked(layout: Layout) -> int:
    """How many stacked axes lead the weight (NF4 quantizes each leading slice apart)."""
    order = layout.order or tuple(range(layout.ndim))
    n = 0
    while n < layout.n_stacked and order[n] == n:
        n += 1
    return n


# ----------------------------------------------------------------------------- public


def quantize(params, *, targets=r".*kernel", method: str = "nf4", exclude=(),
             config: LoraConfig | None = None, block_size: int = 64):
    """Stores the chosen weights of ``params`` in 4-bit NF4 or int8 (QLoRA's frozen base).

    Each matched leaf becomes an `NF4Weight` or `Int8Weight` that lora_jax
    treats as the weight itself: `lj.init`, `lj.describe`, `lj.summary`,
    `lj.merge` and `lj.apply` take the returned tree as ``params`` (`apply`
    dequantizes each weight at its use inside the traced function).

    Args:
      params: the model's parameters.
      targets: which leaves to quantize: a regex fullmatched against each
        ``'/'``-joined path, a tuple of them, or a ``(path, leaf) -> bool``
        callable (as `LoraConfig.targets`). The default takes every
        ``kernel`` (Flax ``Dense``/``DenseGeneral``/``Conv``), not
        embeddings, norms or biases.
      method: ``"nf4"`` (4.127 bits per element) or ``"int8"`` (8 bits plus
        a float32 scale per output unit).
      exclude: paths never quantized although they match (same forms).
      config: the `LoraConfig` you will train with. Its ``layouts`` say
        which leading axes are stacked layers (each layer is quantized on its
        own, which is what lets ``scan`` dequantize one layer at a time) and
        which are output axes (int8's channels); its ``train`` leaves (trained
        fully) are never quantized.
      block_size: NF4 elements per absmax block (QLoRA: 64); even.

    Returns:
      ``params`` with the matched leaves replaced by containers.

    Raises:
      ValueError: a pattern matches nothing (real paths are listed), a
        matched leaf is not a floating array with at least 2 axes besides
        its stacked ones, or is already quantized; an unknown ``method``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((128, 64)), "bias": jnp.zeros(64)}}
      >>> q = lj.quantize(params)
      >>> q["dense"]["kernel"]
      NF4Weight(shape=(128, 64), dtype=float32, block_size=64)
      >>> cfg = lj.LoraConfig(rank=4, targets=r".*/kernel")
      >>> lj.init(q, cfg, key=jax.random.key(0))["dense"]["kernel"].a.shape
      (128, 4)
    """
    if method not in METHODS:
        raise error("lj.quantize", f"method={method!r} is not one of {METHODS}",
                    "use method='nf4' (QLoRA) or method='int8'")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 \
            or block_size % 2:
        raise error("lj.quantize", f"block_size={block_size!r} must be an even int >= 2",
                    "use block_size=64 (what QLoRA uses)")
    if config is not None and not isinstance(config, LoraConfig):
        raise error("lj.quantize", f"config must be a lj.LoraConfig or None, got "
                    f"{type(config).__name__}",
                    "pass the LoraConfig you will train with, or leave config out",
                    kind=TypeError)
    tspec = normalize_patterns("targets", targets, allow_none=False, where="lj.quantize")
    espec = normalize_patterns("exclude", exclude, allow_none=True, where="lj.quantize")
    is_target, is_excluded = matcher(tspec), matcher(espec)
    is_train = matcher(config.train) if config is not None and config.train else \
        (lambda p, x: False)

    flat, treedef = flatten_params(params)
    leaves, hits = [], []
    for keypath, leaf in flat:
        path = path_str(keypath)
        if not is_target(path, leaf) or is_excluded(path, leaf) or is_train(path, leaf):
            leaves.append(leaf)
            continue
        hits.append(path)
        leaves.append(_quantize_leaf(path, leaf, method, config, block_size))
    if not hits:
        arrays = [path_str(p) for p, x in flat if hasattr(x, "shape")]
        raise error(
            "lj.quantize",
            f"targets={targets!r} matched no leaf (after exclude= and the config's train "
            f"leaves); some real paths are:\n  {sample_paths(arrays)}\n"
            f"(patterns are regexes fullmatched against '/'-joined paths)",
            "write the pattern against these, e.g. targets=r'.*/kernel'")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _quantize_leaf(path, leaf, method, config, block_size):
    if is_container(leaf):
        raise error(path, f"already quantized ({leaf!r})",
                    "quantize the float params once, or lj.dequantize them first")
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise error(path, f"lj.quantize matched a {type(leaf).__name__}, not an array",
                    f"narrow targets= or add it to exclude=, e.g. exclude=r'{re.escape(path)}'")
    dtype = jnp.dtype(leaf.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise error(path, f"can't quantize a {dtype.name} leaf",
                    f"narrow targets= or exclude=r'{re.escape(path)}'")
    layout = config.layout_for(path) if config is not None else None
    shape = tuple(leaf.shape)
    if layout is None:
        layout = Layout(0, max(len(shape) - 1, 0), 1)
    if layout.ndim != len(shape) or len(shape) - layout.n_stacked < 2:
        raise error(
            path, f"can't quantize shape {shape} with layout {layout} (n_stacked, "
            f"n_in, n_out): a quantized weight needs >= 2 axes besides its stacked ones "
            f"(biases and norm scales stay as they are)",
            f"exclude=r'{re.escape(path)}', or fix LoraConfig.layouts for it")
    x = jnp.asarray(leaf)
    if method == "nf4":
        return _quantize_nf4(x, _leading_stacked(layout), dtype, block_size)
    return _quantize_int8(x, _in_axes(layout), dtype)


def quantize_as(settings: dict, dense):
    """``dense`` quantized with the settings a container's ``settings()`` gave.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> w = jax.random.normal(jax.random.key(0), (64, 32))
      >>> q = lj.quantize({"w": w}, targets="w")["w"]
      >>> again = quantize_as(q.settings(), w)
      >>> bool((again.codes == q.codes).all())
      True
    """
    dense = jnp.asarray(dense)
    method = settings.get("method")
    if method == "nf4":
        return _quantize_nf4(dense, int(settings["n_stacked"]), dense.dtype,
                             int(settings["block_size"]), int(settings["scale_block"]))
    if method == "int8":
        return _quantize_int8(dense, tuple(int(a) for a in settings["in_axes"]), dense.dtype)
    raise error("quantize_as", f"unknown quantization settings {settings!r}; this lora_jax "
                f"knows the methods {METHODS}", "upgrade lora_jax")


def dequantize(params):
    """``params`` with every quantized weight replaced by its dense value.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> q = lj.quantize({"w": jnp.full((64, 64), 0.5)}, targets="w", method="int8")
      >>> float(lj.dequantize(q)["w"][0, 0])
      0.5
    """
    return map_params(lambda _, x: x.dequantize() if is_container(x) else x, params)


def requantize_merged(path: str, leaf, dense, *, what: str):
    """``dense`` stored like ``leaf`` again, warning that it rounds (merge/unmerge)."""
    out = leaf.requantize(dense)
    why = ""
    if not isinstance(dense, jax_core.Tracer):
        back = out.dequantize(dtype=jnp.float32)
        d = jnp.asarray(dense, jnp.float32)
        err = float(jnp.linalg.norm(back - d) / jnp.maximum(jnp.linalg.norm(d), 1e-30))
        why = f" (relative error {err:.2g})"
    warnings.warn(message(
        path, f"{what} into a {leaf.method} weight: dequantized, summed in float32 and "
        f"requantized, so the result carries {leaf.method}'s rounding{why}, and an update "
        f"smaller than that is largely lost",
        "keep a float copy of the base to merge into, or serve unmerged with lj.apply"),
        LoraWarning, stacklevel=4)
    return out

