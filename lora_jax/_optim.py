"""Optimizers that only ever see the trainable leaves, and the train step.

Built on ``optax.partition``: A, B and fully-trained leaves go to the user's
transformation; each `LoraWeights.scale` goes to ``optax.set_to_zero()``,
which keeps no state. Frozen params are not in the adapter tree at all, so
they get no optimizer state and no gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from lora_jax._core.weights import LoraWeights, is_lora, is_node

__all__ = ["trainable_labels", "optimizer", "make_train_step"]

TRAIN, FROZEN = "train", "frozen"


def trainable_labels(adapters):
    """``"train"`` / ``"frozen"`` labels mirroring an adapter tree.

    ``a``, ``b``, DoRA's ``m`` and fully-trained leaves are ``"train"``;
    ``scale`` is ``"frozen"``.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> ad = {"w": lj.LoraWeights(jnp.ones((4, 2)), jnp.zeros((2, 4)), jnp.float32(1)),
      ...       "head": jnp.ones(3), "bias": None}
      >>> trainable_labels(ad)["w"]
      LoraWeights(a='train', b='train', scale='frozen')
      >>> trainable_labels(ad)["head"], trainable_labels(ad)["bias"]
      ('train', None)
    """
    def label(node):
        if is_lora(node):
            return LoraWeights(TRAIN, TRAIN, FROZEN, None if node.m is None else TRAIN)
        return None if node is None else TRAIN

    return jax.tree.map(label, adapters, is_leaf=is_node)


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wraps ``tx`` so it updates only trainable adapter leaves.

    The state holds entries for A, B (DoRA: and m) and fully-trained leaves only (Adam:
    exactly 2x the trainable parameters, plus step counts); the updates for
    each `LoraWeights.scale` are zero.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> params = {"w": jnp.ones((32, 32))}
      >>> cfg = lj.LoraConfig(rank=4, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(0))
      >>> state = lj.optimizer(optax.adam(1e-3)).init(ad)
      >>> lj.summary(params, ad, opt_state=state).optimizer_state  # 2 x (128 + 128)
      512
    """
    return optax.partition({TRAIN: tx, FROZEN: optax.set_to_zero()}, trainable_labels)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, *,
                    has_aux: bool = False, donate: bool = True, jit: bool = True):
    """Builds ``step(params, adapters, opt_state, *batch)``.

    ``loss_fn(params, adapters, *batch)`` returns the loss (or ``(loss,
    aux)`` with ``has_aux``). The step differentiates with respect to the
    adapter tree only and returns ``(adapters, opt_state, loss[, aux])``.
    The frozen ``params`` are a plain argument that is never returned
    (returning them would copy them every step), and the adapter and
    optimizer buffers are donated so they are updated in place.

    ``tx`` should come from `optimizer` (so frozen scales stay frozen);
    ``opt_state = tx.init(adapters)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(1))
      >>> def loss(params, adapters, x):
      ...     w = lj.merge(params, adapters, cfg)["w"]
      ...     return jnp.mean((x @ w - x) ** 2)
      >>> tx = lj.optimizer(optax.adam(1e-2))
      >>> step = lj.make_train_step(loss, tx)
      >>> x = jnp.ones((4, 8))
      >>> opt = tx.init(ad)
      >>> ad, opt, l0 = step(params, ad, opt, x)
      >>> for _ in range(20):
      ...     ad, opt, l1 = step(params, ad, opt, x)
      >>> bool(l1 < l0)
      True
    """
    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=has_aux)

    def step(params, adapters, opt_state, *batch):
        out, grads = grad_fn(params, adapters, *batch)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        adapters = optax.apply_updates(adapters, updates)
        if has_aux:
            loss, aux = out
            return adapters, opt_state, loss, aux
        return adapters, opt_state, out

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(1, 2) if donate else ())
