"""AdaLoRA: an SVD-shaped update ``P Λ Q`` whose rank is pruned to a global budget.

Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
(ICLR 2023), as PEFT implements it (``AdaLoraConfig``, ``RankAllocator``).
Functional here:

* `adalora_init` builds a tree of `AdaLoraWeights` (``a`` = P, ``e`` = Λ,
  ``b`` = Q) for the targets of a `LoraConfig` whose ``rank`` is the initial
  rank (PEFT's ``init_r``);
* `adalora_view` turns it into the `LoraWeights` tree every LoRA entry
  point takes (``a * e`` and ``b``), so ``lj.apply`` runs its low-rank path
  at the FLOP floor with pruned triplets contributing zero;
* `adalora` wraps an optax transformation with the rank allocator: importance
  ``|w * dL/dw|`` smoothed by two EMAs, and a cubic budget schedule that zeroes
  the least important triplets' ``e`` every ``delta_t`` steps. Its state is
  the optimizer state (pure; a pytree of arrays, checkpointed like any other);
  shapes never change, so the step never recompiles;
* `adalora_orthogonality` is the penalty on ``PᵀP`` and ``Q Qᵀ`` to add to the loss;
* `adalora_to_lora` drops the pruned triplets: a plain LoRA adapter with
  per-layer ranks and the config that says so.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.paths import path_str
from lora_jax._core.weights import AdaLoraWeights, LoraWeights, is_adalora, is_node
from lora_jax._init import init, leaf_key
from lora_jax._optim import optimizer

__all__ = ["adalora_init", "adalora_view", "adalora_orthogonality", "adalora",
           "AdaLoraState", "adalora_ranks", "adalora_to_lora"]

INIT_STD = 0.02   # PEFT: normal(0, 0.02) for P and Q, zeros for Λ


def _is_node(x) -> bool:
    return is_node(x) or is_adalora(x)


def _nodes(adapters) -> list[tuple[str, AdaLoraWeights]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=_is_node)
    return [(path_str(p), n) for p, n in flat if is_adalora(n)]


def _refuse_lora(where: str, adapters) -> None:
    flat, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=_is_node)
    for p, n in flat:
        if isinstance(n, LoraWeights):
            raise error(where, f"{path_str(p)!r} holds LoraWeights, not AdaLoraWeights",
                        "build the adapters with lj.adalora_init(params, config, key=...)")


def adalora_init(params, config: LoraConfig, *, key):
    """AdaLoRA adapters for the targets of ``config``: ``P, Q ~ N(0, 0.02)``, ``Λ = 0``.

    ``config.rank`` (and ``rank_pattern``) is the initial rank of each update
    (PEFT's ``init_r``); ``alpha`` gives ``scale = alpha / rank`` as for LoRA
    (PEFT: ``lora_alpha / ranknum``, ranknum being the initial rank). Every
    base lj.init takes works: float, NF4/int8 containers, stacked layers (one
    triplet set per layer), NNX state; fully-trained leaves (``train``) start
    at the base's values. Since Λ starts at 0 the model starts unchanged.

    Args:
      params: the frozen base.
      config: targets, initial rank, alpha, layouts. DoRA and the inits that
        move the base (PiSSA, OLoRA) are refused: AdaLoRA has its own init.
      key: a PRNG key; each leaf's draw comes from its path.

    Returns:
      An adapter tree with `AdaLoraWeights` at the targets.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.ones((16, 8))}
      >>> cfg = lj.LoraConfig(rank=4, alpha=8, targets="w")
      >>> ad = lj.adalora_init(params, cfg, key=jax.random.key(0))
      >>> ad["w"].a.shape, ad["w"].e.shape, ad["w"].b.shape, float(ad["w"].scale)
      ((16, 4), (4,), (4, 8), 2.0)
    """
    if config.use_dora:
        raise error("lj.adalora_init", "AdaLoRA with DoRA (use_dora=True) is not defined "
                    "(PEFT refuses it too)", "use LoraConfig(use_dora=False)")
    if config.init not in ("kaiming", "gaussian"):
        raise error("lj.adalora_init", f"init={config.init!r} moves the base into the "
                    f"factors; AdaLoRA draws its own (P, Q ~ N(0, 0.02), Λ = 0)",
                    'use LoraConfig(init="kaiming") (the default) with AdaLoRA')
    lora = init(params, config, key=key)

    def build(path, node):
        if not isinstance(node, LoraWeights):
            return node
        k = leaf_key(key, path)
        draw = lambda i, x: (INIT_STD * jax.random.normal(  # noqa: E731
            jax.random.fold_in(k, i), x.shape, jnp.float32)).astype(x.dtype)
        e = jnp.zeros((*node.a.shape[:-2], node.a.shape[-1]), node.a.dtype)
        return AdaLoraWeights(draw(1, node.a), e, draw(2, node.b), node.scale)

    flat, treedef = jax.tree_util.tree_flatten_with_path(lora, is_leaf=is_node)
    return jax.tree_util.tree_unflatten(treedef, [build(path_str(p), n) for p, n in flat])


def adalora_view(adapters):
    """The `LoraWeights` tree AdaLoRA adapters stand for: ``a * e`` and ``b``.

    Use it inside the loss, ``fwd(params, lj.adalora_view(adapters), x)`` with
    ``fwd = lj.apply(fn, config)``: gradients reach ``a``, ``e`` and ``b``, and
    the forward pass costs LoRA's low-rank products plus ``in * rank``
    multiplies. Also what `lj.merge` and `lj.explain` take.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> ad = {"w": lj.AdaLoraWeights(jnp.ones((3, 2)), jnp.array([2.0, 0.0]),
      ...                              jnp.ones((2, 4)), jnp.float32(1))}
      >>> lj.adalora_view(ad)["w"].a.tolist()
      [[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]]
    """
    def view(node):
        if is_adalora(node):
            return LoraWeights(node.a * node.e[..., None, :], node.b, node.scale)
        return node

    return jax.tree.map(view, adapters, is_leaf=_is_node)


def adalora_orthogonality(adapters):
    """AdaLoRA's regularizer: the mean over all P and Q matrices of
    ``||PᵀP - I||_F`` and ``||Q Qᵀ - I||_F`` (each stacked layer's own).

    Add ``orth_reg_weight * lj.adalora_orthogonality(adapters)`` to the loss
    (PEFT's default weight: 0.5). Computed in float32 (or the factors' wider dtype).

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> ad = {"w": lj.AdaLoraWeights(jnp.eye(3)[:, :2], jnp.zeros(2), jnp.eye(2, 4),
      ...                              jnp.float32(1))}
      >>> float(lj.adalora_orthogonality(ad))
      0.0
    """
    terms = []
    for _, node in _nodes(adapters):
        a, b = _wide(node.a), _wide(node.b)
        eye = jnp.eye(a.shape[-1], dtype=a.dtype)
        pp = jnp.einsum("...ir,...is->...rs", a, a, precision=jax.lax.Precision.HIGHEST)
        qq = jnp.einsum("...ro,...so->...rs", b, b, precision=jax.lax.Precision.HIGHEST)
        for g in (pp, qq):
            diff = g - jnp.broadcast_to(eye, g.shape)   # one identity per stacked layer
            terms.append(jnp.sqrt(jnp.sum(jnp.square(diff), axis=(-2, -1))).reshape(-1))
    if not terms:
        raise error("lj.adalora_orthogonality", "the tree holds no AdaLoraWeights",
                    "pass the adapters lj.adalora_init built")
    return jnp.mean(jnp.concatenate(terms))


def _wide(x):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class AdaLoraState(NamedTuple):
    """`adalora`'s optimizer state.

    Attributes:
      count: the number of updates so far (the next one acts as PEFT's
        ``update_and_allocate(count)``).
      inner: the wrapped transformation's state.
      ipt: per AdaLoRA leaf (in path order), the EMA of the sensitivity
        ``|w * g|`` of ``(a, e, b)``.
      unc: per leaf, the EMA of ``|sensitivity - ipt|`` (its uncertainty).
      mask: per leaf, ``(*stacked, rank)`` bool: the triplets the last budget
        allocation kept.
    """

    count: Any
    inner: Any
    ipt: Any
    unc: Any
    mask: Any


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise error("lj.adalora", f"{name}={value!r} must be an int >= {low}",
                    f"e.g. {name}={max(low, 1)}")


def _check_settings(target_r, total_step, tinit, tfinal, delta_t, beta1, beta2) -> None:
    _check_int("target_r", target_r, 1)
    _check_int("total_step", total_step, 1)
    _check_int("tinit", tinit, 0)
    _check_int("tfinal", tfinal, 0)
    _check_int("delta_t", delta_t, 1)
    if tinit >= total_step - tfinal:
        raise error("lj.adalora", f"tinit={tinit} leaves no budgeting phase before "
                    f"total_step - tfinal = {total_step - tfinal}",
                    "lower tinit or tfinal, or raise total_step")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating)) \
                or not 0.0 < float(beta) < 1.0:
            raise error("lj.adalora", f"{name}={beta!r} must be in (0, 1)",
                        f"e.g. {name}=0.85 (PEFT's default)")


def _budgets(init_bgt: int, target_bgt: int, total_step: int, tinit: int, tfinal: int,
             delta_t: int):
    """PEFT's schedule, step by step (Python floats, as PEFT computes it): the
    budget after each step 0..total_step and whether that step masks."""
    budget = np.empty(total_step + 1, np.int64)
    masks = np.zeros(total_step + 1, bool)
    span = total_step - tfinal - tinit
    for step in range(total_step + 1):
        if step <= tinit:
            budget[step] = init_bgt
        elif step > total_step - tfinal:
            budget[step] = target_bgt
        else:
            mul = 1 - (step - tinit) / span
            budget[step] = int((init_bgt - target_bgt) * (mul ** 3) + target_bgt)
            masks[step] = step % delta_t == 0 or step == total_step - tfinal
    return budget, masks


def adalora(tx: optax.GradientTransformation, *, target_r: int, total_step: int,
            tinit: int = 0, tfinal: int = 0, delta_t: int = 1, beta1: float = 0.85,
            beta2: float = 0.85) -> optax.GradientTransformation:
    """``tx`` with AdaLoRA's rank allocation, for a tree from `adalora_init`.

    Each update first applies ``tx`` (through `lj.optimizer`, so scales stay
    frozen), then, as PEFT's ``update_and_allocate(step)`` after
    ``optimizer.step()``: while ``step < total_step - tfinal`` it updates the
    importance of every entry of ``a``, ``e``, ``b`` from the stepped weight
    ``w`` and the gradient ``g``: ``s = |w * g|``, ``ipt = beta1 ipt + (1 -
    beta1) s``, ``unc = beta2 unc + (1 - beta2) |s - ipt|``; a triplet's score
    is ``ipt * unc`` of its ``e`` plus the means over its column of ``a`` and
    row of ``b``. The budget stays at the initial total rank for ``tinit``
    steps, falls on a cubic to ``target_r`` times the number of adapted
    matrices (a stacked leaf counts one per layer) at ``total_step -
    tfinal``, and every ``delta_t`` steps in between the lowest-scoring
    triplets over all layers are pruned to the budget (their ``e`` set to 0;
    they may regrow until the next round, as in PEFT). At ``total_step -
    tfinal`` the final allocation is fixed and kept for every later step.

    Args:
      tx: the optimizer for the trainable leaves (e.g. ``optax.adam(1e-3)``).
      target_r: the average rank to end at (PEFT's ``target_r``).
      total_step: the number of steps training will run.
      tinit: warm-up steps before any pruning.
      tfinal: final steps at the fixed allocation.
      delta_t: steps between two allocations (PEFT's ``deltaT``).
      beta1: EMA factor of the sensitivity, in (0, 1).
      beta2: EMA factor of its uncertainty, in (0, 1).

    Returns:
      A transformation whose state is an `AdaLoraState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
      >>> cfg = lj.LoraConfig(rank=4, alpha=4, targets="w")
      >>> ad = lj.adalora_init(params, cfg, key=jax.random.key(1))
      >>> tx = lj.adalora(optax.sgd(0.1), target_r=2, total_step=8, tfinal=2)
      >>> def loss(p, a, x):
      ...     w = lj.merge(p, lj.adalora_view(a), cfg)["w"]
      ...     return jnp.mean((x @ w - x[:, :8]) ** 2) + 0.1 * lj.adalora_orthogonality(a)
      >>> step = lj.make_train_step(loss, tx)
      >>> state, x = tx.init(ad), jax.random.normal(jax.random.key(2), (32, 16))
      >>> for _ in range(8):
      ...     ad, state, _ = step(params, ad, state, x)
      >>> lj.adalora_ranks(ad)
      {'w': array(2)}
    """
    _check_settings(target_r, total_step, tinit, tfinal, delta_t, beta1, beta2)
    inner = optimizer(tx)
    b1, b2 = float(beta1), float(beta2)
    final = total_step - tfinal

    def init_fn(params):
        _refuse_lora("lj.adalora", params)
        nodes = [n for _, n in _nodes(params)]
        if not nodes:
            raise error("lj.adalora", "the adapter tree holds no AdaLoraWeights",
                        "build the adapters with lj.adalora_init(params, config, key=...)")
        def zeros():   # distinct buffers: a train step donates the whole state
            return tuple(tuple(jnp.zeros(x.shape, _wide(x).dtype) for x in (n.a, n.e, n.b))
                         for n in nodes)

        masks = tuple(jnp.ones(n.e.shape, bool) for n in nodes)
        return AdaLoraState(jnp.zeros((), jnp.int32), inner.init(params), zeros(), zeros(),
                            masks)

    def update_fn(updates, state, params=None):
        if params is None:
            raise error("lj.adalora", "the update needs the current adapters",
                        "call tx.update(grads, state, adapters) (lj.make_train_step does)")
        grads = updates
        updates, inner_state = inner.update(grads, state.inner, params)
        paths = [p for p, _ in _nodes(params)]
        olds = dict(_nodes(params))
        ups, gs = dict(_nodes(updates)), dict(_nodes(grads))
        init_bgt = sum(int(np.prod(n.e.shape)) for n in olds.values())
        n_matrices = sum(int(np.prod(n.e.shape[:-1])) for n in olds.values())
        target_bgt = target_r * n_matrices
        if target_bgt > init_bgt:
            raise error("lj.adalora", f"target_r={target_r} asks for {target_bgt} triplets "
                        f"but the adapters start with {init_bgt}",
                        "use a target_r below the initial rank (LoraConfig.rank)")
        budgets, masks = _budgets(init_bgt, target_bgt, total_step, tinit, tfinal, delta_t)
        step = state.count
        at = jnp.clip(step, 0, total_step)
        learn = step < final
        prune = jnp.asarray(masks)[at] & (step <= final)
        keep_fixed = step > final

        ipts, uncs, scores = [], [], []
        for path, ipt, unc in zip(paths, state.ipt, state.unc, strict=True):
            old, up, g = olds[path], ups[path], gs[path]
            new_ipt, new_unc, parts = [], [], []
            for x, u, gx, i, c in zip((old.a, old.e, old.b), (up.a, up.e, up.b),
                                      (g.a, g.e, g.b), ipt, unc, strict=True):
                s = jnp.abs((_wide(x) + _wide(u)) * _wide(gx))   # the stepped weight
                i2 = b1 * i + (1 - b1) * s
                c2 = b2 * c + (1 - b2) * jnp.abs(s - i2)
                # Scored with this step's EMAs while they learn; at the final
                # allocation with the last ones, which PEFT then resets.
                parts.append(jnp.where(learn, i2, i) * jnp.where(learn, c2, c))
                new_ipt.append(jnp.where(learn, i2, jnp.where(step == final, 0, i)))
                new_unc.append(jnp.where(learn, c2, jnp.where(step == final, 0, c)))
            sa, se, sb = parts
            scores.append(se + jnp.mean(sa, axis=-2) + jnp.mean(sb, axis=-1))
            ipts.append(tuple(new_ipt))
            uncs.append(tuple(new_unc))

        flat = jnp.concatenate([s.reshape(-1) for s in scores])
        k = init_bgt - jnp.asarray(budgets)[at]
        threshold = jnp.where(k > 0, jnp.sort(flat)[jnp.maximum(k - 1, 0)], -jnp.inf)
        new_masks, e_updates = [], {}
        for path, score, stored in zip(paths, scores, state.mask, strict=True):
            chosen = score > threshold
            mask = jnp.where(prune, chosen, stored)
            zero = (prune & ~chosen) | (keep_fixed & ~stored)
            e_updates[path] = jnp.where(zero, -olds[path].e, ups[path].e)
            new_masks.append(mask)

        def set_e(p, node):
            path = path_str(p)
            if is_adalora(node) and path in e_updates:
                return node._replace(e=e_updates[path].astype(node.e.dtype))
            return node

        updates = jax.tree_util.tree_map_with_path(set_e, updates, is_leaf=_is_node)
        return updates, AdaLoraState(step + 1, inner_state, tuple(ipts), tuple(uncs),
                                     tuple(new_masks))

    return optax.GradientTransformation(init_fn, update_fn)


def adalora_ranks(adapters) -> dict:
    """``{path: ranks}``: each AdaLoRA leaf's number of unpruned triplets (``e != 0``),
    an int array of the leaf's stacked shape (a 0-d array for an unstacked leaf).

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> e = jnp.array([[1.0, 0, 2, 0], [0, 0, 0, 3]])
      >>> ad = {"w": lj.AdaLoraWeights(jnp.ones((2, 3, 4)), e, jnp.ones((2, 4, 5)),
      ...                              jnp.float32(1))}
      >>> lj.adalora_ranks(ad)["w"].tolist()
      [2, 1]
    """
    return {path: np.asarray(np.count_nonzero(np.asarray(n.e), axis=-1))
            for path, n in _nodes(adapters)}


def adalora_to_lora(adapters, config: LoraConfig):
    """A plain LoRA adapter holding exactly the AdaLoRA update: pruned triplets dropped.

    Each leaf keeps the triplets whose ``e`` is non-zero, as a rank-``k``
    `LoraWeights` with ``a = P[:, kept] * Λ[kept] * scale / new_scale`` and
    ``b = Q[kept]``, where ``new_scale`` is the returned config's (alpha
    kept, the rank is ``k``). A stacked leaf gets the largest rank of its
    layers; a layer that keeps fewer has zero columns beyond its own. A leaf
    that keeps nothing becomes a rank-1 zero update. The result is what every
    other lora_jax function takes (merge, sets, PEFT LoRA export, serving),
    with the config: ``lora, cfg = lj.adalora_to_lora(ad, config)``.

    Args:
      adapters: a tree from `adalora_init` (after training).
      config: the config it was built with.

    Returns:
      ``(adapters, config)``: LoraWeights at the targets; the config with the
      new ranks (``rank`` or exact-path ``rank_pattern`` entries).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((6, 5))}
      >>> cfg = lj.LoraConfig(rank=3, alpha=3, targets="w")
      >>> ad = lj.adalora_init(params, cfg, key=jax.random.key(0))
      >>> ad = {"w": ad["w"]._replace(e=jnp.array([0.5, 0.0, 2.0]))}
      >>> lora, cfg2 = lj.adalora_to_lora(ad, cfg)
      >>> lora["w"].a.shape, cfg2.rank
      ((6, 2), 2)
      >>> same = lj.merge(params, lj.adalora_view(ad), cfg)["w"]
      >>> bool(jnp.allclose(lj.merge(params, lora, cfg2)["w"], same, atol=1e-6))
      True
    """
    _refuse_lora("lj.adalora_to_lora", adapters)
    nodes = dict(_nodes(adapters))
    if not nodes:
        raise error("lj.adalora_to_lora", "the tree holds no AdaLoraWeights",
                    "pass the adapters lj.adalora_init built (and trained)")
    ranks = {p: max(1, int(np.max(adalora_ranks({p: n})[p], initial=0)))
             for p, n in nodes.items()}
    new_config = config.with_ranks(ranks, paths=list(nodes))

    def convert(p, node):
        path = path_str(p)
        if not is_adalora(node):
            return node
        k, new_scale = ranks[path], new_config.scale_for(path)
        a, e, b = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                   for x in (node.a, node.e, node.b))
        ratio = float(np.asarray(node.scale, np.float64)) / new_scale
        lead = a.shape[:-2]
        a_new = np.zeros((*lead, a.shape[-2], k))
        b_new = np.zeros((*lead, k, b.shape[-1]))
        for idx in np.ndindex(*lead):
            kept = np.flatnonzero(e[idx])
            a_new[idx][:, :kept.size] = a[idx][:, kept] * e[idx][kept] * ratio
            b_new[idx][:kept.size] = b[idx][kept]
        return LoraWeights(jnp.asarray(a_new, node.a.dtype), jnp.asarray(b_new, node.b.dtype),
                           jnp.float32(new_scale))

    out = jax.tree_util.tree_map_with_path(convert, adapters, is_leaf=_is_node)
    return out, new_config
