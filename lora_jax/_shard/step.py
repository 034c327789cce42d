"""The sharded train step: adapters and optimizer state that stay put.

`make_sharded_train_step` jits `lj.make_train_step`'s step with explicit
``in_shardings`` and ``out_shardings`` (from `train_shardings`) and donates
the adapter and optimizer buffers. With the outputs pinned to the inputs'
shardings, each step's adapters are exactly what the next step expects:
nothing is resharded and nothing recompiles. Left to itself, XLA picks
output shardings by propagation, the next call sees different input
shardings and compiles again (measured on the prototype).

The first step is the one that usually goes wrong: ``scale`` and Adam's
step count are created as uncommitted single-device scalars, so the first
call moves them and the arrays it returns are not those it was given.
`shard_train_state` places everything up front.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.leaf import is_container
from lora_jax._core.paths import map_params
from lora_jax._init import init
from lora_jax._optim import make_train_step
from lora_jax._shard.rules import adapter_shardings, opt_state_shardings, replicated

__all__ = ["TrainShardings", "train_shardings", "shard_train_state",
           "make_sharded_train_step"]


class TrainShardings(NamedTuple):
    """Where every argument and result of a sharded train step lives.

    Attributes:
      params: a tree of shardings mirroring the base params.
      adapters: mirroring the adapter tree (see `lj.adapter_shardings`).
      opt_state: mirroring the optimizer state (see `lj.opt_state_shardings`).
      batch: a tuple with one sharding (or a tree prefix of them) per batch
        argument of the loss.
      scalar: the replicated sharding of the loss.
    """

    params: Any
    adapters: Any
    opt_state: Any
    batch: tuple
    scalar: Sharding


def _param_shardings(params, shardings):
    if shardings is not None:
        return shardings

    def one(path, leaf):
        if is_container(leaf):   # its storage arrays carry the shardings
            return jax.tree.map(lambda c: getattr(c, "sharding", None), leaf)
        sh = getattr(leaf, "sharding", None)
        if not isinstance(sh, Sharding):
            raise error(
                path, f"this params leaf ({type(leaf).__name__}) carries no sharding",
                "place params with jax.device_put(params, lj.param_shardings(params, mesh, "
                "rules=rules)), or pass shardings=", kind=TypeError)
        return sh

    return map_params(one, params)


def _mesh_of(param_sh):
    for sh in jax.tree.leaves(param_sh):
        if isinstance(sh, NamedSharding):
            return sh.mesh
    return None


def _batch_shardings(batch, mesh) -> tuple:
    items = batch if isinstance(batch, tuple) else (batch,)
    out = []
    for i, b in enumerate(items):
        if isinstance(b, PartitionSpec):
            if mesh is None:
                raise error(
                    "lj.train_shardings", f"batch[{i}] is a PartitionSpec but no params leaf "
                    f"has a NamedSharding to take the mesh from",
                    f"pass batch=NamedSharding(mesh, {b})", kind=TypeError)
            b = NamedSharding(mesh, b)
        elif not (isinstance(b, Sharding) or isinstance(b, (dict, list)) or b is None):
            raise error(
                "lj.train_shardings", f"batch[{i}] is a {type(b).__name__}; use a "
                f"PartitionSpec, a Sharding, or a tree of them (one entry per batch argument)",
                "e.g. batch=P('data')", kind=TypeError)
        out.append(b)
    return tuple(out)


def _not_train_shardings(shardings) -> str:
    return (f"shardings must be a lj.TrainShardings (from lj.train_shardings); "
            f"got {type(shardings).__name__}")


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def train_shardings(params, config: LoraConfig, tx: optax.GradientTransformation, *, batch,
                    shardings=None, overrides=None) -> TrainShardings:
    """All the shardings a sharded LoRA train step needs, from the params'.

    Args:
      params: the base params (``jax.Array``s with ``NamedSharding``s, or
        ``jax.ShapeDtypeStruct``s with ``sharding=``; only shapes, dtypes
        and shardings are read).
      config: the `LoraConfig`.
      tx: the optimizer (from `lj.optimizer`); its state's structure is
        derived abstractly, nothing is allocated.
      batch: the sharding of the loss's batch argument(s): a
        ``PartitionSpec`` (on the params' mesh), a ``Sharding``, or a tuple
        with one per batch argument, e.g. ``P("data")`` for tokens split by
        example.
      shardings: a tree of shardings mirroring ``params``, used instead of
        the leaves' own.
      overrides: per-path adapter shardings, see `lj.adapter_shardings`.

    Returns:
      A `TrainShardings`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> params = {"w": jnp.ones((8, 8))}
      >>> params = jax.device_put(params, lj.param_shardings(params, mesh,
      ...                                                    rules={"w": P("data", "model")}))
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> sh = lj.train_shardings(params, cfg, lj.optimizer(optax.adam(1e-3)), batch=P("data"))
      >>> sh.adapters["w"].a.spec, sh.batch[0].spec, sh.scalar.spec
      (P('data', None), P('data',), P())
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise error("lj.train_shardings",
                    f"tx must be an optax.GradientTransformation; got {type(tx).__name__}",
                    "e.g. tx=lj.optimizer(optax.adam(1e-3))", kind=TypeError)
    param_sh = _param_shardings(params, shardings)
    ad_sh = adapter_shardings(params, config, shardings=param_sh, overrides=overrides)
    abstract_ad = jax.eval_shape(lambda p: init(p, config, key=jax.random.key(0)),
                                 _abstract(params))
    abstract_opt = jax.eval_shape(tx.init, abstract_ad)
    opt_sh = opt_state_shardings(abstract_opt, abstract_ad, ad_sh)
    first = jax.tree.leaves(param_sh)[0]
    return TrainShardings(param_sh, ad_sh, opt_sh, _batch_shardings(batch, _mesh_of(param_sh)),
                          replicated(first))


def shard_train_state(adapters, opt_state, shardings: TrainShardings):
    """Places adapters and optimizer state on their shardings, scalars included.

    Call it once before the first step (and after restoring without
    ``shardings=``): every array is then committed where the step keeps it,
    so not even the first step moves anything.

    Args:
      adapters: the adapter tree.
      opt_state: the optimizer state (``tx.init(adapters)``).
      shardings: a `TrainShardings` (from `lj.train_shardings`).

    Returns:
      ``(adapters, opt_state)``, placed.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("data",))
      >>> params = {"w": jnp.ones((8, 8))}
      >>> params = jax.device_put(params, lj.param_shardings(params, mesh, rules={"w": P("data")}))
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> tx = lj.optimizer(optax.adam(1e-3))
      >>> sh = lj.train_shardings(params, cfg, tx, batch=P("data"))
      >>> ad = lj.init(params, cfg, key=jax.random.key(0))
      >>> ad, opt = lj.shard_train_state(ad, tx.init(ad), sh)
      >>> ad["w"].scale.sharding == sh.adapters["w"].scale
      True
    """
    if not isinstance(shardings, TrainShardings):
        raise error("lj.shard_train_state", _not_train_shardings(shardings),
                    "shardings = lj.train_shardings(params, config, tx, batch=...)",
                    kind=TypeError)
    return (jax.device_put(adapters, shardings.adapters),
            jax.device_put(opt_state, shardings.opt_state))


def make_sharded_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                            shardings: TrainShardings, *, has_aux: bool = False,
                            donate: bool = True):
    """Builds ``step(params, adapters, opt_state, *batch)``, jitted on a mesh.

    Same step as `lj.make_train_step` (gradients with respect to the
    adapters only; returns ``(adapters, opt_state, loss[, aux])``), jitted
    with ``in_shardings`` and ``out_shardings`` from ``shardings`` and with
    the adapter and optimizer buffers donated: the updated adapters and
    state come back on exactly the shardings they went in with, so the
    step compiles once. Arguments committed to other shardings are
    rejected by ``jax.jit`` rather than silently moved; place them with
    `lj.shard_train_state`.

    Meshes with ``AxisType.Auto`` axes (``jax.sharding.Mesh``'s default)
    are what this is tested with: XLA propagates shardings through the
    model. ``jax.make_mesh`` defaults to ``Explicit`` axes in jax 0.10,
    where every op of the model must resolve its output sharding itself
    (the reference decoder's embedding lookup does not; `lj.apply` is
    tested there for data-parallel, FSDP-style and tensor-parallel layouts
    of models that name their products' ``out_sharding``); pass
    ``axis_types=(AxisType.Auto,) * n``.

    Args:
      loss_fn: ``loss_fn(params, adapters, *batch)`` returning the loss
        (``(loss, aux)`` with ``has_aux``), e.g. built on
        ``lj.apply(model.apply, config)``.
      tx: the optimizer (from `lj.optimizer`).
      shardings: a `TrainShardings` (from `lj.train_shardings`).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; aux comes back with the
        sharding XLA chooses.
      donate: donate the adapter and optimizer buffers (update in place).

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> from jax.sharding import AxisType, PartitionSpec as P
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> params = jax.device_put(params, lj.param_shardings(params, mesh,
      ...                                                    rules={"w": P(None, "model")}))
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> tx = lj.optimizer(optax.adam(1e-2))
      >>> sh = lj.train_shardings(params, cfg, tx, batch=P("data"))
      >>> fwd = lj.apply(lambda p, x: x @ p["w"], cfg)
      >>> def loss(params, adapters, x):
      ...     return jnp.mean((fwd(params, adapters, x) - x) ** 2)
      >>> step = lj.make_sharded_train_step(loss, tx, sh)
      >>> ad = lj.init(params, cfg, key=jax.random.key(1))
      >>> ad, opt = lj.shard_train_state(ad, tx.init(ad), sh)
      >>> x = jax.device_put(jnp.ones((4, 8)), sh.batch[0])
      >>> ad, opt, l0 = step(params, ad, opt, x)
      >>> for _ in range(10):
      ...     ad, opt, l1 = step(params, ad, opt, x)
      >>> bool(l1 < l0), ad["w"].b.sharding == sh.adapters["w"].b
      (True, True)
    """
    if not isinstance(shardings, TrainShardings):
        raise error("lj.make_sharded_train_step", _not_train_shardings(shardings),
                    "shardings = lj.train_shardings(params, config, tx, batch=...)",
                    kind=TypeError)
    body = make_train_step(loss_fn, tx, has_aux=has_aux, jit=False)
    sh = shardings
    in_sh = (sh.params, sh.adapters, sh.opt_state, *sh.batch)
    out_sh = (sh.adapters, sh.opt_state, sh.scalar) + ((None,) if has_aux else ())
    return jax.jit(body, in_shardings=in_sh, out_shardings=out_sh,
                   donate_argnums=(1, 2) if donate else ())
