"""lj.init: shapes, distributions, per-path keys, train leaves."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from examples import gpt
from tests.conftest import SMALL


def _params(rng):
    k1, k2, k3 = jax.random.split(rng, 3)
    return {"enc": {"q": {"kernel": jax.random.normal(k1, (256, 128))},
                    "v": {"kernel": jax.random.normal(k2, (256, 128))},
                    "ln": {"scale": jnp.ones(256)}},
            "head": {"kernel": jax.random.normal(k3, (128, 4))}}


def test_structure_shapes_and_zero_b(rng):
    p = _params(rng)
    cfg = lj.LoraConfig(targets=r"enc/(q|v)/kernel", rank=8, alpha=16, train=r"head/kernel")
    ad = lj.init(p, cfg, key=rng)
    q = ad["enc"]["q"]["kernel"]
    assert isinstance(q, lj.LoraWeights)
    assert q.a.shape == (256, 8) and q.b.shape == (8, 128)
    assert q.a.dtype == jnp.float32 and float(q.scale) == 2.0 and q.scale.dtype == jnp.float32
    assert not np.any(np.asarray(q.b))
    assert ad["enc"]["ln"]["scale"] is None
    np.testing.assert_array_equal(ad["head"]["kernel"], p["head"]["kernel"])


def test_train_leaf_is_a_copy(rng):
    p = _params(rng)
    cfg = lj.LoraConfig(targets=r"enc/q/kernel", train=r"head/kernel")
    ad = lj.init(p, cfg, key=rng)
    head = ad["head"]["kernel"]
    assert head is not p["head"]["kernel"]
    # Deleting the copy (as donation would) leaves the frozen params usable.
    head.delete()
    assert float(jnp.sum(p["head"]["kernel"] ** 2)) > 0


def test_kaiming_bound_matches_peft(rng):
    p = _params(rng)
    a = lj.init(p, lj.LoraConfig(targets=r"enc/q/kernel", rank=64), key=rng)["enc"]["q"]["kernel"].a
    bound = 1 / math.sqrt(256)
    a = np.asarray(a)
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.95 * bound
    # Uniform(-b, b) has std b / sqrt(3); 16,384 samples -> ~1% standard error.
    assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_gaussian_std_is_one_over_rank(rng):
    p = _params(rng)
    cfg = lj.LoraConfig(targets=r"enc/q/kernel", rank=16, init="gaussian")
    a = np.asarray(lj.init(p, cfg, key=rng)["enc"]["q"]["kernel"].a)
    assert a.std() == pytest.approx(1 / 16, rel=0.05)
    assert abs(a.mean()) < 0.005


def test_adding_a_target_keeps_other_inits(rng):
    p = _params(rng)
    one = lj.init(p, lj.LoraConfig(targets=r"enc/q/kernel"), key=rng)
    two = lj.init(p, lj.LoraConfig(targets=r"enc/(q|v)/kernel"), key=rng)
    np.testing.assert_array_equal(one["enc"]["q"]["kernel"].a, two["enc"]["q"]["kernel"].a)
    assert not np.allclose(two["enc"]["q"]["kernel"].a, two["enc"]["v"]["kernel"].a)


def test_keys_matter(rng):
    p = _params(rng)
    cfg = lj.LoraConfig(targets=r"enc/q/kernel")
    a0 = lj.init(p, cfg, key=jax.random.key(0))["enc"]["q"]["kernel"].a
    a1 = lj.init(p, cfg, key=jax.random.key(1))["enc"]["q"]["kernel"].a
    assert not np.allclose(a0, a1)
    # legacy uint32 keys work too
    lj.init(p, cfg, key=jax.random.PRNGKey(0))


def test_key_is_keyword_only(rng):
    with pytest.raises(TypeError):
        lj.init(_params(rng), lj.LoraConfig(targets=r"enc/q/kernel"), rng)  # type: ignore[misc]


def test_adapter_dtype_and_rank_pattern(rng):
    p = _params(rng)
    cfg = lj.LoraConfig(targets=r"enc/(q|v)/kernel", dtype=jnp.bfloat16,
                        rank_pattern={r"enc/v/.*": 2}, alpha_pattern={r"enc/v/.*": 8})
    ad = lj.init(p, cfg, key=rng)
    assert ad["enc"]["q"]["kernel"].a.dtype == jnp.bfloat16
    assert ad["enc"]["v"]["kernel"].a.shape == (256, 2)
    assert float(ad["enc"]["v"]["kernel"].scale) == 4.0


@pytest.mark.slow
def test_stacked_layers(rng):
    cfg_model = gpt.GPTConfig(**{**SMALL.__dict__, "scan": True})
    variables = jax.eval_shape(lambda: gpt.init_linen(cfg_model)[1])
    cfg = lj.LoraConfig(targets=gpt.TARGETS, rank=4,
                        layouts={r"params/blocks/.*": lj.Layout(1, 1, 1)})
    ad = lj.init(variables, cfg, key=rng)
    q = ad["params"]["blocks"]["attn"]["q"]["kernel"]
    assert q.a.shape == (SMALL.n_layers, SMALL.d_model, 4)
    assert q.b.shape == (SMALL.n_layers, 4, SMALL.d_model)
    # each layer draws its own A
    assert not np.allclose(q.a[0], q.a[1])


def test_init_from_abstract_params(rng):
    abstract = jax.eval_shape(lambda: gpt.init_linen(gpt.REFERENCE)[1])
    ad = lj.init(abstract, lj.LoraConfig(targets=gpt.TARGETS, rank=8), key=rng)
    assert lj.summary(abstract, ad).lora == 294_912
