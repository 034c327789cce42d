"""Optimizers that only ever see the trainable leaves, and the train step.

Built on ``optax.partition``: A, B and fully-trained leaves go to the user's
transformation; each `LoraWeights.scale` goes to ``optax.set_to_zero()``,
which keeps no state. Frozen params are not in the adapter tree at all, so
they get no optimizer state and no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np
import optax

from lora_jax._core.errors import error
from lora_jax._core.weights import AdaLoraWeights, LoraWeights, is_adalora, is_lora, is_node

__all__ = ["trainable_labels", "optimizer", "make_train_step"]

TRAIN, FROZEN = "train", "frozen"


def trainable_labels(adapters):
    """``"train"`` / ``"frozen"`` labels mirroring an adapter tree.

    ``a``, ``b``, DoRA's ``m``, AdaLoRA's ``e`` and fully-trained leaves are
    ``"train"``; ``scale`` is ``"frozen"``.

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
        if is_adalora(node):
            return AdaLoraWeights(TRAIN, TRAIN, TRAIN, FROZEN)
        return None if node is None else TRAIN

    return jax.tree.map(label, adapters, is_leaf=_is_node)


def _is_node(x) -> bool:
    return is_node(x) or is_adalora(x)


def optimizer(tx: optax.GradientTransformation, *,
              b_lr_ratio: float = 1.0) -> optax.GradientTransformation:
    """Wraps ``tx`` so it updates only trainable adapter leaves.

    The state holds entries for A, B (DoRA: and m) and fully-trained leaves only (Adam:
    exactly 2x the trainable parameters, plus step counts); the updates for
    each `LoraWeights.scale` are zero.

    ``b_lr_ratio=λ`` is LoRA+ (Hayou et al., 2024; PEFT's ``loraplus_lr_ratio``):
    B learns at ``λ`` times A's learning rate. lora_jax multiplies the B updates
    ``tx`` returns by ``λ``, which is exactly a learning rate of ``λ·lr`` for every
    transformation whose update is proportional to its learning rate (sgd, adam,
    adamw with its decoupled weight decay, lion, ... with any schedule); for one that
    keeps the learning rate in its state (schedule-free, Prodigy) build the split
    yourself with ``optax.partition``. DoRA's magnitude ``m`` gets B's rate, as in
    PEFT (which gives every 1-D parameter B's rate); fully-trained leaves keep
    ``tx``'s rate (PEFT would give the 1-D ones B's), and so do the factors of
    embedding updates (PEFT gives them a fixed 1e-6). The state is the same as
    without LoRA+.

    Args:
      tx: the optax transformation for the trainable leaves.
      b_lr_ratio: ``lr_B / lr_A``, a positive number (default 1: plain LoRA). The
        LoRA+ paper suggests 2-16 with a somewhat smaller ``lr`` than plain LoRA's.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> params = {"w": jnp.ones((32, 32))}
      >>> cfg = lj.LoraConfig(rank=4, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(0))
      >>> state = lj.optimizer(optax.adam(1e-3)).init(ad)
      >>> lj.summary(params, ad, opt_state=state).optimizer_state  # 2 x (128 + 128)
      512
      >>> tx = lj.optimizer(optax.sgd(0.5), b_lr_ratio=16.0)       # LoRA+
      >>> g = jax.tree.map(jnp.ones_like, ad)
      >>> u, _ = tx.update(g, tx.init(ad), ad)
      >>> float(u["w"].a[0, 0]), float(u["w"].b[0, 0])
      (-0.5, -8.0)
    """
    if isinstance(b_lr_ratio, bool) or not isinstance(b_lr_ratio, (int, float, np.number)) \
            or not math.isfinite(float(b_lr_ratio)) or float(b_lr_ratio) <= 0:
        raise error("lj.optimizer", f"b_lr_ratio={b_lr_ratio!r} must be a positive number "
                    "(lr_B / lr_A)", "e.g. b_lr_ratio=16.0 for LoRA+, or 1.0 for plain LoRA")
    inner = optax.partition({TRAIN: tx, FROZEN: optax.set_to_zero()}, trainable_labels)
    ratio = float(b_lr_ratio)
    if ratio == 1.0:
        return inner

    def faster_b(node):
        if is_adalora(node):     # PEFT: lora_B gets the ratio, lora_E (r, 1) A's rate
            return node._replace(b=node.b * ratio)
        if not is_lora(node):
            return node
        return node._replace(b=node.b * ratio, m=None if node.m is None else node.m * ratio)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, state, params)
        return jax.tree.map(faster_b, updates, is_leaf=_is_node), state

    return optax.GradientTransformation(inner.init, update)


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
