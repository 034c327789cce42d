"""`infer_layouts` and `configure`: every adapted weight's layout, read from the program.

``lj.configure(config, fn, params, *example_args)`` traces ``fn`` abstractly
(`jax.make_jaxpr` on ``ShapeDtypeStruct``s: no FLOPs, no device memory),
reads each targeted weight's stacked / input / output axes from how the
program uses it (`lora_jax._apply.infer`) and returns the config with those
layouts recorded, so `lj.init` builds per-layer adapters for an ``nn.scan``
stack, per-head-preserving factors for a multi-axis ``DenseGeneral`` kernel,
an ``(in, out)`` split for an Equinox ``(out, in)`` weight, and so on.
Layouts the user declared (``LoraConfig.layouts``) win and are not read.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np

from lora_jax._apply.infer import Facts, infer_jaxpr, layout_text, probe_for, solve
from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.fmt import table
from lora_jax._core.paths import leaves_with_paths, matcher, unflatten_params

__all__ = ["LayoutReport", "infer_layouts", "configure"]


@dataclasses.dataclass(frozen=True)
class LayoutReport:
    """What `infer_layouts` read from a program.

    Attributes:
      layouts: ``{path: Layout}`` for every weight the program gives a layout.
      sources: ``{path: str}``: the uses each layout was read from.
      unknown: ``{path: str}``: weights with no layout from the program, and why
        (only opaque uses, or none).
      shapes: ``{path: shape}`` of every weight looked at.
      tied: paths the program uses both as a row lookup and in a matmul (an
        embedding tied to the output projection).
    """

    layouts: dict
    sources: dict
    unknown: dict
    shapes: dict
    tied: tuple = ()

    def __str__(self) -> str:
        rows = [[p, "x".join(map(str, self.shapes[p])), layout_text(lay, self.shapes[p]),
                 self.sources[p]] for p, lay in self.layouts.items()]
        rows += [[p, "x".join(map(str, self.shapes[p])), "-", f"unknown: {why}"]
                 for p, why in self.unknown.items()]
        return table(["path", "shape", "layout", "read from"], rows, "<<<<")

    __repr__ = __str__


def _abstract(leaf):
    return jax.ShapeDtypeStruct(tuple(leaf.shape), np.dtype(leaf.dtype))


def _selected(params, config, *, with_declared: bool = False):
    """``[(position among traced leaves, path, leaf)]`` of the weights to read
    (targets with a declared layout only ``with_declared``)."""
    if config is None:
        def wanted_leaf(path, leaf):
            return len(leaf.shape) >= 2 and np.issubdtype(np.dtype(leaf.dtype), np.floating)
    else:
        is_target, is_excluded = matcher(config.targets), matcher(config.exclude)

        def wanted_leaf(path, leaf):
            return is_target(path, leaf) and not is_excluded(path, leaf)
    out, pos = [], 0
    for path, leaf in leaves_with_paths(params):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            continue
        wanted = wanted_leaf(path, leaf)
        if wanted and (config is None or with_declared or
                       config.layout_source(path)[0] != "explicit"):
            out.append((pos, path, leaf))
        pos += 1
    return out


def infer_layouts(fn, params, *args, config: LoraConfig | None = None,
                  **kwargs) -> LayoutReport:
    """The layout of each weight of ``params``, read from how ``fn`` uses it.

    ``fn(params, *args, **kwargs)`` is traced abstractly (nothing runs); each
    weight is followed through transposes, reshapes, casts, slices, ``jit``,
    ``remat``, ``scan`` and ``cond`` to its products: a ``scan`` over one of
    its axes makes that axis stacked, a matmul's contracted axes are the
    input axes and its kept axes the output axes (a batch axis of the matmul
    is stacked), a convolution kernel's spatial and input-feature axes are
    input axes, an embedding lookup's rows are the input axis. Any axis
    order is read (an Equinox ``(out, in)`` weight gets
    ``Layout(0, 1, 1, order=(1, 0))``).

    Args:
      fn: the function `lj.apply` will run, ``fn(params, *args, **kwargs)``.
      params: the params (arrays, quantized containers or
        ``jax.ShapeDtypeStruct``s); only shapes and dtypes are read.
      *args: example positional arguments (arrays or ``ShapeDtypeStruct``s;
        anything else is passed as is).
      config: read only the leaves it targets, skipping those with a declared
        layout; default: every floating leaf with two or more axes.
      **kwargs: example keyword arguments, likewise.

    Returns:
      A `LayoutReport`; ``.layouts`` goes into ``LoraConfig(layouts=...)``
      (or use `configure`).

    Raises:
      ValueError: naming the path and both uses, when the program uses a
        weight in two ways no single layout expresses.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"q": jnp.ones((16, 4, 8)), "emb": jnp.ones((100, 16))}
      >>> def fn(p, ids):
      ...     h = p["emb"][ids]                              # (batch, 16): rows of emb
      ...     q = jnp.einsum("bd,dhk->bhk", h, p["q"])      # heads kept apart
      ...     return q.sum() + (h @ p["emb"].T).sum()        # emb tied as the output head
      >>> rep = lj.infer_layouts(fn, params, jnp.zeros((2,), jnp.int32))
      >>> print(rep.layouts["q"], rep.layouts["emb"])     # (n_stacked, n_in, n_out)
      (0, 1, 2) (0, 1, 1)
    """
    p_leaves = leaves_with_paths(params)
    dynamic = [(path, leaf) for path, leaf in p_leaves
               if hasattr(leaf, "shape") and hasattr(leaf, "dtype")]
    a_leaves, a_treedef = jax.tree.flatten((args, kwargs))

    def flat_fn(p_dyn, a_dyn):
        it = iter(p_dyn)
        leaves = [next(it) if hasattr(x, "shape") and hasattr(x, "dtype") else x
                  for _, x in p_leaves]
        it_a = iter(a_dyn)
        rest = [next(it_a) if hasattr(x, "shape") else x for x in a_leaves]
        a, kw = jax.tree.unflatten(a_treedef, rest)
        return fn(unflatten_params(params, leaves), *a, **kw)

    closed = jax.make_jaxpr(flat_fn)([_abstract(x) for _, x in dynamic],
                                     [_abstract(x) for x in a_leaves if hasattr(x, "shape")])
    chosen = _selected(params, config)
    facts = {path: Facts(tuple(leaf.shape)) for _, path, leaf in chosen}
    infer_jaxpr(closed.jaxpr, {pos: probe_for(path, leaf.shape) for pos, path, leaf in chosen},
                facts)
    layouts, sources, unknown = {}, {}, {}
    for _, path, leaf in chosen:
        got = solve(path, facts[path])
        if got.conflict:
            raise error(path, f"the program uses this {tuple(leaf.shape)} weight in ways no "
                              f"single layout expresses: {got.why}",
                        f"declare the layout you want, LoraConfig(layouts={{r'{re.escape(path)}': "
                        f"lj.Layout(...)}}) (lj.apply then computes the other use densely), "
                        f"or exclude the path")
        if got.layout is None:
            unknown[path] = got.why
        else:
            layouts[path], sources[path] = got.layout, got.why
    shapes = {path: tuple(leaf.shape) for _, path, leaf in chosen}
    tied = tuple(p for p, f in facts.items() if f.lookups and f.products)
    return LayoutReport(layouts, sources, unknown, shapes, tied)


def configure(config: LoraConfig, fn, params, *args, **kwargs) -> LoraConfig:
    """``config`` with every targeted weight's layout read from ``fn`` (see `infer_layouts`).

    The layouts are recorded in ``config.inferred_layouts`` (with what they
    were read from, which `lj.describe` shows); those in ``config.layouts``
    (declared) win and are not read. Weights the program uses both as a row
    lookup and in a matmul (an embedding tied to the output projection) are
    added to ``config.tied``, which `lj.export_peft` reads. Call it once, before `lj.init`, with
    example arguments of the function `lj.apply` will run.

    Args:
      config: the `LoraConfig`.
      fn: ``fn(params, *args, **kwargs)``, e.g. ``model.apply``.
      params: the params (arrays, containers or ``ShapeDtypeStruct``s).
      *args: example positional arguments (shapes and dtypes are what count).
      **kwargs: example keyword arguments.

    Returns:
      The new `LoraConfig`.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.ones((3, 16, 8))}                      # 3 stacked layers
      >>> def fn(p, x):
      ...     step = lambda h, w: (jnp.tanh(h @ w) @ w.T, None)
      ...     return jax.lax.scan(step, x, p["w"])[0]
      >>> cfg = lj.configure(lj.LoraConfig(rank=2, targets="w"), fn, params, jnp.ones((4, 16)))
      >>> cfg.layout_for("w")
      Layout(n_stacked=1, n_in=1, n_out=1, order=None)
      >>> lj.init(params, cfg, key=jax.random.key(0))["w"].a.shape   # one adapter per layer
      (3, 16, 2)
    """
    if not isinstance(config, LoraConfig):
        raise error("lj.configure", f"config must be a lj.LoraConfig, got "
                                    f"{type(config).__name__}",
                    "lj.configure(lj.LoraConfig(...), fn, params, *example_args)",
                    kind=TypeError)
    if not _selected(params, config, with_declared=True):
        raise error("lj.configure", f"config.targets={config.targets!r} matched no leaf of "
                                    f"params", "write targets against the '/'-joined paths "
                                    "lj.describe lists")
    report = infer_layouts(fn, params, *args, config=config, **kwargs)
    inferred = {re.escape(p): (lay, report.sources[p]) for p, lay in report.layouts.items()}
    tied = tuple(dict.fromkeys((*config.tied, *report.tied)))
    return config.replace(inferred_layouts=inferred, tied=tied)

