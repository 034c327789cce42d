"""Optimizer masking and the train step: frozen stays frozen, state is 2x, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from examples import gpt
from tests._asserts import CompileCounter, assert_trees_close, perturb_b
from tests.conftest import SMALL


def _setup(small_gpt, rng, train=()):
    model, variables = small_gpt
    cfg = lj.LoraConfig(targets=gpt.TARGETS, rank=4, alpha=8, train=train)
    ad = lj.init(variables, cfg, key=rng)
    tx = lj.optimizer(optax.adam(1e-2))

    def loss(v, a, tokens):
        return gpt.loss_fn(model.apply)(lj.merge(v, a, cfg), tokens)
    return model, variables, cfg, ad, tx, loss


def test_labels_and_state_size(small_gpt, rng):
    _, variables, _, ad, tx, _ = _setup(small_gpt, rng, train=r"params/ln_f/.*")
    state = tx.init(ad)
    s = lj.summary(variables, ad, opt_state=state)
    assert s.fully_trained == 2 * SMALL.d_model
    # Adam: mu and nu for every trainable value, nothing for scales or frozen leaves
    assert s.optimizer_state == 2 * s.trainable
    assert s.optimizer_scalars == 1   # Adam's step count


@pytest.mark.standard_promotion
@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
def test_training_moves_only_trainable_leaves(small_gpt, rng, jit):
    model, variables, cfg, ad, tx, loss = _setup(small_gpt, rng, train=r"params/ln_f/scale")
    before_vars = jax.tree.map(np.array, variables)
    before_ad = jax.tree.map(np.array, ad, is_leaf=lambda x: x is None)
    step = lj.make_train_step(loss, tx, jit=jit)
    tokens = gpt.random_tokens(SMALL, 4, seed=int(jax.random.randint(rng, (), 0, 2**30)))
    opt = tx.init(ad)
    losses = []
    for _ in range(3 if jit else 2):
        ad, opt, value = step(variables, ad, opt, tokens)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    # the frozen tree is bit-identical (and still alive after donation)
    assert_trees_close(variables, before_vars, exact=True)
    q0 = before_ad["params"]["block_0"]["attn"]["q"]["kernel"]
    q = ad["params"]["block_0"]["attn"]["q"]["kernel"]
    np.testing.assert_array_equal(q.scale, q0.scale)          # scale never trained
    assert not np.allclose(q.a, q0.a) and np.abs(np.asarray(q.b)).max() > 0
    assert not np.allclose(ad["params"]["ln_f"]["scale"], before_ad["params"]["ln_f"]["scale"])


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_second_step_and_value_swap_do_not_recompile(small_gpt, rng):
    _, variables, cfg, ad, tx, loss = _setup(small_gpt, rng)
    step = lj.make_train_step(loss, tx)
    tokens = gpt.random_tokens(SMALL, 2, seed=3)
    opt = tx.init(ad)
    ad, opt, _ = step(variables, ad, opt, tokens)           # compiles once
    other = perturb_b(lj.init(variables, cfg, key=jax.random.fold_in(rng, 1)), key=rng)
    # a different alpha is a different scale *value*: still no recompile
    other = jax.tree.map(lambda w: w._replace(scale=w.scale * 3.0) if lj.is_lora(w) else w,
                         other, is_leaf=lj.is_lora)
    with CompileCounter() as cc:
        ad, opt, _ = step(variables, ad, opt, tokens)
        other_opt = tx.init(other)
        step(variables, other, other_opt, tokens)
    assert cc.count == 0


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_step_with_aux(small_gpt, rng):
    model, variables, cfg, ad, tx, loss = _setup(small_gpt, rng)

    def loss_aux(v, a, tokens):
        value = loss(v, a, tokens)
        return value, {"loss": value}
    ad = perturb_b(ad, key=jax.random.fold_in(rng, 1))       # B != 0: every factor has a grad
    before = jax.tree.map(np.array, ad)
    step = lj.make_train_step(loss_aux, tx, has_aux=True, donate=False)
    tokens = gpt.random_tokens(SMALL, 2, seed=int(jax.random.randint(rng, (), 0, 2**30)))
    ad2, _, value, aux = step(variables, ad, tx.init(ad), tokens)
    assert float(aux["loss"]) == float(value)
    # the loss (and aux) is the one at the adapters passed in, before the update
    assert float(value) == pytest.approx(float(loss(variables, ad, tokens)), rel=1e-5)
    # not donated: the old adapters are alive and hold their old values, bit for bit
    assert not any(x.is_deleted() for x in jax.tree.leaves(ad))
    assert_trees_close(ad, before, exact=True)
    # ... while the step returned new ones: every A and B moved, no scale did
    for old, new in zip(jax.tree.leaves(before, is_leaf=lj.is_lora),
                        jax.tree.leaves(ad2, is_leaf=lj.is_lora), strict=True):
        assert not np.array_equal(new.a, old.a) and not np.array_equal(new.b, old.b)
        np.testing.assert_array_equal(new.scale, old.scale)


def test_trainable_labels_shape():
    ad = {"w": lj.LoraWeights(jnp.ones((2, 2)), jnp.ones((2, 2)), jnp.float32(1.0)),
          "x": None, "head": jnp.ones(2)}
    labels = lj.trainable_labels(ad)
    assert labels == {"w": lj.LoraWeights("train", "train", "frozen"), "x": None, "head": "train"}
