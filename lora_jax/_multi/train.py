"""Training many adapters at once: one jitted step for every adapter of a set.

`make_mixed_train_step` trains the adapters of an `lj.AdapterSet` on one
frozen base in one program: each example of the batch names its adapter (a
tenant, or one point of a sweep over ranks and learning rates), the forward
pass is `lj.apply_mixed`'s, and each adapter gets the gradient of the mean
loss over *its* examples and its own optimizer update, with its own optimizer
state. The result equals one `lj.make_train_step` step per adapter on its
sub-batch; an adapter with no example in the batch is left as it was
(factors and optimizer state), as if it had not stepped.

The optimizer state is the single-adapter state with one more leading axis,
built by `mixed_opt_state`; ``lr_scale`` gives each adapter its own learning
rate (a multiplier on its updates, exact for every optax transformation whose
update is proportional to its learning rate, as LoRA+'s ``b_lr_ratio``), and a
schedule inside ``tx`` runs on each adapter's own step count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from lora_jax._core.errors import error
from lora_jax._multi.mixed import apply_mixed
from lora_jax._multi.set import AdapterSet, adapter_ids, check_set, index_of, select_adapter

__all__ = ["make_mixed_train_step", "mixed_opt_state", "reset_opt_state"]


def mixed_opt_state(tx: optax.GradientTransformation, aset: AdapterSet):
    """The optimizer state of every adapter of ``aset``: ``tx.init`` of each, stacked.

    Leaf ``k`` of adapter ``i``'s state is ``state_leaf[i]``, so one tenant's
    state is ``jax.tree.map(lambda x: x[i], state)`` (to checkpoint it with
    its adapter, `lj.select_adapter`).

    Args:
      tx: the optax transformation of one adapter (from `lj.optimizer`), the one
        passed to `make_mixed_train_step`.
      aset: the `lj.AdapterSet` to train.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> params = {"w": jnp.ones((8, 4))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> aset = lj.adapter_set({n: (lj.init(params, cfg, key=jax.random.key(i)), cfg)
      ...                        for i, n in enumerate("abc")})
      >>> state = lj.mixed_opt_state(lj.optimizer(optax.adam(1e-3)), aset)
      >>> jax.tree.leaves(state)[0].shape     # Adam's count, one per adapter
      (3,)
    """
    check_set(aset, "mixed_opt_state")
    return jax.vmap(tx.init)(aset.adapters)


def reset_opt_state(tx: optax.GradientTransformation, aset: AdapterSet, opt_state, name):
    """``opt_state`` with adapter ``name``'s slot started afresh (``tx.init`` of it).

    For a new tenant in an existing slot: `lj.add_adapter` with ``replace=True``
    and the same config keeps the set's shapes and structure, and this resets
    its optimizer state; the jitted mixed step then runs without recompiling.

    Args:
      tx: the transformation the state was built with (`mixed_opt_state`).
      aset: the set, holding the new adapter at ``name``.
      opt_state: the set's optimizer state.
      name: the adapter's name (or index).

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> params = {"w": jnp.ones((8, 4))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> aset = lj.adapter_set({n: (lj.init(params, cfg, key=jax.random.key(i)), cfg)
      ...                        for i, n in enumerate("ab")})
      >>> tx = lj.optimizer(optax.adam(1e-3))
      >>> state = jax.tree.map(lambda x: x + 1, lj.mixed_opt_state(tx, aset))
      >>> aset = lj.add_adapter(aset, "b", lj.init(params, cfg, key=jax.random.key(9)), cfg,
      ...                       replace=True)
      >>> jax.tree.leaves(lj.reset_opt_state(tx, aset, state, "b"))[0].tolist()  # counts
      [1, 0]
    """
    check_set(aset, "reset_opt_state")
    i = index_of(aset, name, "lj.reset_opt_state")
    fresh = tx.init(select_adapter(aset, i))
    try:
        return jax.tree.map(lambda full, new: full.at[i].set(new), opt_state, fresh)
    except ValueError as e:
        raise error("lj.reset_opt_state", f"opt_state does not have the structure of tx's state "
                                          f"for this set ({e})",
                    "pass the state from lj.mixed_opt_state(tx, aset) and the same tx") from None


def _lr_scale(lr_scale, n: int):
    if lr_scale is None:
        return None
    s = jnp.asarray(lr_scale, jnp.float32)
    if s.shape != (n,):
        raise error("lj.make_mixed_train_step", f"lr_scale has shape {tuple(s.shape)}; it "
                                                f"must hold one multiplier per adapter ({n},)",
                    "pass lr_scale=jnp.array([...]) with one entry per adapter of the set")
    return s


def _as_ids(aset, ids):
    """The set checked, and ``ids`` with a list of adapter names turned into indices."""
    check_set(aset, "make_mixed_train_step")
    if isinstance(ids, (list, tuple)) and ids and all(isinstance(n, str) for n in ids):
        return adapter_ids(aset, ids)
    return ids


def _per_example_loss(loss_fn: Callable) -> Callable:
    def one(params, *args, **kwargs):
        loss = loss_fn(params, *args, **kwargs)
        if jnp.ndim(loss) != 0:
            raise error("lj.make_mixed_train_step", f"loss_fn returned shape "
                                                    f"{tuple(jnp.shape(loss))} for one example",
                        "return one scalar loss for the batch of one example it is given "
                        "(e.g. the mean over its tokens)")
        return jnp.reshape(loss, (1,))
    return one


def make_mixed_train_step(loss_fn: Callable, tx: optax.GradientTransformation, *,
                          in_axes=0, donate: bool = True, jit: bool = True) -> Callable:
    """Builds ``step(params, aset, opt_state, adapter_ids, *batch, lr_scale=None)``.

    One step trains every adapter of the set ``aset`` on its own examples:
    example ``e`` of ``batch`` uses adapter ``adapter_ids[e]`` (as in
    `lj.apply_mixed`: an int array from `lj.adapter_ids`, or a list of names;
    ``-1`` or ``"__base__"``: the example trains nothing).
    Adapter ``i`` gets the gradient of the *mean* of ``loss_fn`` over its
    examples and ``tx``'s update from its own optimizer state -- the same
    result as ``lj.make_train_step(lj.apply(loss_fn, ...), tx)`` run once per
    adapter on its sub-batch. An adapter with no example in the batch keeps
    its factors and optimizer state. ``adapter_ids`` is data: any assignment
    reuses the compiled step.

    Args:
      loss_fn: ``loss_fn(params, *example_args) -> scalar``: the model and its
        loss for *one* example, written against the base ``params`` as for
        `lj.apply` (the adapter is swapped in), and given that example's
        slice of each batched argument with its example axis kept (size 1).
        It must treat examples independently (no batch statistics).
      tx: the optax transformation of one adapter, from `lj.optimizer` (so the
        scales stay frozen). Its state for the set comes from `mixed_opt_state`.
      in_axes: the example axis of the batch arguments, as for `lj.apply_mixed`.
      donate: donate the set's and the optimizer state's buffers (updated in place).
      jit: compile the step with ``jax.jit``.

    The step returns ``(aset, opt_state, losses)``: the updated set, the
    updated state, and each adapter's mean loss over its examples (``(n,)``;
    NaN for an adapter with no example). ``lr_scale`` (``(n,)``, optional)
    multiplies adapter ``i``'s updates: a learning rate of ``lr_scale[i]``
    times ``tx``'s, exactly, for transformations whose update is proportional
    to the learning rate (sgd, adam, adamw, lion, ... with any schedule).

    Cost: the forward and backward passes are `lj.apply_mixed`'s (the frozen
    products are single matmuls over the whole batch; the low-rank ones are
    batched over the examples' gathered factors), plus one optimizer update per
    adapter in the set.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> cfg = lj.LoraConfig(rank=2, targets="w")
      >>> aset = lj.adapter_set({n: (lj.init(params, cfg, key=jax.random.key(i)), cfg)
      ...                        for i, n in enumerate(["alice", "bob"])})
      >>> def loss(p, x, y):                         # one example: x (1, 5, 8)
      ...     return jnp.mean((x @ p["w"] - y) ** 2)
      >>> tx = lj.optimizer(optax.adam(1e-2))
      >>> step = lj.make_mixed_train_step(loss, tx)
      >>> opt = lj.mixed_opt_state(tx, aset)
      >>> x = jax.random.normal(jax.random.key(1), (4, 5, 8))
      >>> ids = lj.adapter_ids(aset, ["alice", "bob", "bob", "alice"])
      >>> aset, opt, first = step(params, aset, opt, ids, x, 2 * x)
      >>> for _ in range(30):
      ...     aset, opt, losses = step(params, aset, opt, ids, x, 2 * x)
      >>> bool((losses < first).all()), losses.shape
      (True, (2,))
    """
    if not callable(loss_fn):
        raise error("lj.make_mixed_train_step", f"loss_fn must be callable; got "
                                                f"{type(loss_fn).__name__}",
                    "pass loss_fn(params, *example_args) -> scalar", kind=TypeError)
    if not isinstance(tx, optax.GradientTransformation):
        raise error("lj.make_mixed_train_step", f"tx must be an optax GradientTransformation; "
                                                f"got {type(tx).__name__}",
                    "e.g. tx = lj.optimizer(optax.adam(1e-3))", kind=TypeError)
    losses_of = apply_mixed(_per_example_loss(loss_fn), in_axes=in_axes, out_axes=0)

    def step(params, aset, opt_state, ids, *batch, lr_scale=None):
        ids = jnp.asarray(_as_ids(aset, ids))
        n = aset.n
        scale = _lr_scale(lr_scale, n)
        valid = (ids >= 0) & (ids < n)
        counts = jnp.zeros((n,), jnp.int32).at[jnp.where(valid, ids, 0)].add(
            valid.astype(jnp.int32))
        slot = jnp.clip(ids, 0, n - 1)

        def total(adapters):
            per_ex = losses_of(params, dataclasses.replace(aset, adapters=adapters), ids, *batch)
            # 1 / (the example's adapter's count), in the loss's own dtype (float64 stays exact)
            own = jnp.maximum(counts[slot], 1).astype(per_ex.dtype)
            weight = jnp.where(valid, jnp.ones_like(own) / own, jnp.zeros_like(own))
            per_adapter = jnp.zeros((n,), per_ex.dtype).at[slot].add(weight * per_ex)
            return jnp.sum(weight * per_ex), per_adapter

        grads, per_adapter = jax.grad(total, has_aux=True)(aset.adapters)
        updates, new_state = jax.vmap(tx.update)(grads, opt_state, aset.adapters)
        if scale is not None:
            updates = jax.tree.map(
                lambda u: u * scale.reshape((n,) + (1,) * (u.ndim - 1)).astype(u.dtype), updates)
        new_adapters = optax.apply_updates(aset.adapters, updates)
        active = counts > 0

        def keep_idle(new, old):
            return jnp.where(active.reshape((n,) + (1,) * (jnp.ndim(new) - 1)), new, old)

        new_adapters = jax.tree.map(keep_idle, new_adapters, aset.adapters)
        new_state = jax.tree.map(keep_idle, new_state, opt_state)
        losses = jnp.where(active, per_adapter, jnp.full_like(per_adapter, jnp.nan))
        return dataclasses.replace(aset, adapters=new_adapters), new_state, losses

    if not jit:
        return step
    compiled = jax.jit(step, donate_argnums=(1, 2) if donate else ())

    def jitted(params, aset, opt_state, ids, *batch, lr_scale=None):
        # names are host data: turned into ids before the jitted step (a jit argument
        # can't be a str)
        return compiled(params, aset, opt_state, _as_ids(aset, ids), *batch, lr_scale=lr_scale)

    return jitted
