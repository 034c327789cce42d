"""Reporting: `describe` (what a config will do) and `summary` (what it did).

Both return small objects whose ``str`` is a table; their fields are plain
Python values for programs.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import jax
import numpy as np

from lora_jax._core.config import LoraConfig
from lora_jax._core.fmt import table
from lora_jax._core.leaf import is_container
from lora_jax._core.paths import leaves_with_paths, resolve
from lora_jax._core.weights import is_lora, pair_with_params

__all__ = ["describe", "summary", "Description", "Summary"]


def _nbytes(x) -> int:
    if is_container(x):  # a quantized weight: its storage
        return int(x.nbytes)
    return int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _storage(x) -> str:
    return x.method if is_container(x) else np.dtype(x.dtype).name


def _size(x) -> int:
    return int(np.prod(np.shape(x), dtype=np.int64))


_AXIS = {"stacked": "stk", "in": "in", "out": "out"}


def _axes(spec) -> str:
    """``stk/in/out`` per axis of the weight as stored (``out/in`` for an (out, in) one)."""
    return "/".join(_AXIS[a] for a in spec.layout.axes())


@dataclasses.dataclass(frozen=True)
class Description:
    """What `describe` found: the targeted leaves and the fully-trained ones.

    ``sources`` maps each target to where its layout comes from:
    ``("explicit", "")`` (``LoraConfig.layouts``), ``("inferred", what it was
    read from)`` (`lj.configure`) or ``("default", "")``.
    """

    specs: dict          # path -> LeafSpec
    train: tuple         # paths trained fully
    n_params: int        # all leaves of params
    n_adapter_params: int
    sources: dict = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        rows = []
        for s in self.specs.values():
            kind = self.sources.get(s.path, ("default", ""))[0]
            rows.append([s.path, "x".join(map(str, s.shape)) or "()", np.dtype(s.dtype).name,
                         _axes(s), kind, s.rank, f"{s.alpha:g}", f"{s.scale:g}",
                         f"{s.n_adapter_params:,}"])
        out = [table(["path", "shape", "dtype", "axes", "layout", "rank", "alpha", "scale",
                      "adapter params"], rows, "<<<<<>>>>")]
        inferred = [(p, note) for p, (kind, note) in self.sources.items() if kind == "inferred"]
        if inferred:
            out.append("layouts read from the program (lj.configure):")
            out += [f"  {p}: {note}" for p, note in inferred]
        for p in self.train:
            out.append(f"trained fully: {p}")
        pct = 100.0 * self.n_adapter_params / max(self.n_params, 1)
        out.append(f"{len(self.specs)} targets, {self.n_adapter_params:,} adapter parameters "
                   f"({pct:.4f}% of {self.n_params:,})")
        return "\n".join(out)

    __repr__ = __str__


def describe(params, config: LoraConfig) -> Description:
    """Which leaves ``config`` adapts in ``params``, and how.

    Shows each target's path, shape, dtype, the role of each axis
    (``stk``/``in``/``out``) and where that layout comes from (``explicit``:
    ``LoraConfig.layouts``; ``inferred``: read from the program by
    `lj.configure`, with what it was read from; ``default``), rank, alpha,
    scale and adapter parameter count. Errors exactly as `init` would (no
    match, unfactorizable leaf, rank too large).

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> params = {"q": {"kernel": jnp.ones((64, 64))}, "mlp": {"kernel": jnp.ones((64, 256))}}
      >>> d = lj.describe(params, lj.LoraConfig(rank=8, alpha=16, targets=r".*/kernel"))
      >>> d.n_adapter_params, list(d.specs)
      (3584, ['mlp/kernel', 'q/kernel'])
      >>> print(d)  # doctest: +NORMALIZE_WHITESPACE
      path        shape   dtype    axes    layout   rank  alpha  scale  adapter params
      ----------  ------  -------  ------  -------  ----  -----  -----  --------------
      mlp/kernel  64x256  float32  in/out  default     8     16      2           2,560
      q/kernel    64x64   float32  in/out  default     8     16      2           1,024
      2 targets, 3,584 adapter parameters (17.5000% of 20,480)
    """
    resolved = resolve(params, config)
    n_params = sum(_size(x) for _, x in leaves_with_paths(params))
    n_ad = sum(s.n_adapter_params for s in resolved.targets.values())
    sources = {p: config.layout_source(p) for p in resolved.targets}
    return Description(dict(resolved.targets), resolved.train, n_params, n_ad, sources)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter and byte counts of a params + adapters pair (see `summary`)."""

    trainable: int              # a + b (+ DoRA m) + fully-trained leaves
    total: int                  # frozen base + LoRA factors
    lora: int                   # a + b (+ DoRA m) only
    fully_trained: int          # elements of train leaves
    adapter_bytes: dict         # dtype name -> bytes of trainable arrays
    frozen_bytes: dict          # dtype name (or nf4 / int8) -> bytes of the base
    rows: list                  # (path, a shape, b shape, rank, params, bytes)
    optimizer_state: int | None = None          # elements in non-scalar state arrays
    optimizer_scalars: int | None = None        # scalar state leaves (step counts)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        rows = [[p, "x".join(map(str, a)), "x".join(map(str, b)), r, f"{n:,}", f"{nb:,}"]
                for p, a, b, r, n, nb in self.rows]
        out = [table(["path", "a", "b", "rank", "params", "bytes"], rows, "<<<>>>")]
        out.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                   f"trainable%: {self.percent:.4f}")
        out.append(f"LoRA factors: {self.lora:,}; fully trained leaves: {self.fully_trained:,}")
        fmt = lambda d: ", ".join(f"{k} {v:,} B" for k, v in sorted(d.items())) or "-"  # noqa
        out.append(f"trainable bytes: {fmt(self.adapter_bytes)}")
        out.append(f"frozen bytes: {fmt(self.frozen_bytes)}")
        if self.optimizer_state is not None:
            ratio = self.optimizer_state / max(self.trainable, 1)
            out.append(f"optimizer state: {self.optimizer_state:,} values "
                       f"({ratio:.2f}x trainable) + {self.optimizer_scalars} scalars")
        return "\n".join(out)

    __repr__ = __str__


def summary(params, adapters, *, opt_state=None) -> Summary:
    """Trainable vs total parameters, bytes by dtype and a per-target table.

    The numbers PEFT prints with ``print_trainable_parameters``, plus bytes
    and (given ``opt_state``) the optimizer state's size, which with
    `lj.optimizer` is exactly 2x the trainable count for Adam.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.ones((64, 64)), "head": jnp.ones((64, 4))}
      >>> cfg = lj.LoraConfig(rank=8, targets="w", train="head")
      >>> s = lj.summary(params, lj.init(params, cfg, key=jax.random.key(0)))
      >>> s.trainable, s.total, s.lora
      (1280, 5376, 1024)
    """
    trainable = lora = fully = total = 0
    ad_bytes, fr_bytes = Counter(), Counter()
    rows = []
    for path, leaf, node in pair_with_params(params, adapters):
        total += _size(leaf)
        fr_bytes[_storage(leaf)] += _nbytes(leaf)
        if is_lora(node):
            factors = [x for x in (node.a, node.b, node.m) if x is not None]
            n = sum(_size(x) for x in factors)
            nb = sum(_nbytes(x) for x in factors)
            lora += n
            trainable += n
            total += n
            for x in factors:
                ad_bytes[np.dtype(x.dtype).name] += _nbytes(x)
            rows.append((path, tuple(np.shape(node.a)), tuple(np.shape(node.b)),
                         int(np.shape(node.a)[-1]), n, nb))
        elif node is not None:
            fully += _size(node)
            trainable += _size(node)
            ad_bytes[np.dtype(node.dtype).name] += _nbytes(node)
    opt_n = opt_s = None
    if opt_state is not None:
        arrays = [x for x in jax.tree.leaves(opt_state) if hasattr(x, "shape")]
        opt_n = sum(_size(x) for x in arrays if np.ndim(x) > 0)
        opt_s = sum(1 for x in arrays if np.ndim(x) == 0)
    return Summary(trainable, total, lora, fully, dict(ad_bytes), dict(fr_bytes), rows,
                   opt_n, opt_s)

