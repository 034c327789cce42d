"""describe / summary: the reference decoder's figures, and the tables."""

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from examples import gpt


def _reference_abstract():
    return jax.eval_shape(lambda: gpt.init_linen(gpt.REFERENCE)[1])


def test_reference_decoder_figures(rng):
    variables = _reference_abstract()
    cfg = lj.LoraConfig(rank=8, alpha=16, targets=gpt.TARGETS)
    d = lj.describe(variables, cfg)
    assert len(d.specs) == 24
    assert d.n_adapter_params == 294_912
    text = str(d)
    assert "294,912 adapter parameters" in text
    assert "params/block_3/mlp/fc2/kernel  2048x512" in text

    ad = lj.init(variables, cfg, key=rng)
    state = lj.optimizer(optax.adamw(1e-3)).init(ad)
    s = lj.summary(variables, ad, opt_state=state)
    assert (s.trainable, s.lora, s.fully_trained) == (294_912, 294_912, 0)
    assert s.total == d.n_params + 294_912
    assert s.optimizer_state == 2 * 294_912
    assert s.adapter_bytes == {"float32": 4 * 294_912}
    text = str(s)
    assert "trainable params: 294,912" in text
    assert "optimizer state: 589,824 values (2.00x trainable) + 1 scalars" in text


def test_summary_bytes_by_dtype(rng):
    p = {"w": jnp.ones((64, 32), jnp.bfloat16), "head": jnp.ones((32, 4), jnp.float32)}
    cfg = lj.LoraConfig(targets="w", rank=4, train="head", dtype=jnp.bfloat16)
    s = lj.summary(p, lj.init(p, cfg, key=rng))
    assert s.frozen_bytes == {"bfloat16": 64 * 32 * 2, "float32": 32 * 4 * 4}
    assert s.adapter_bytes == {"bfloat16": (64 * 4 + 4 * 32) * 2, "float32": 32 * 4 * 4}
    assert s.rows == [("w", (64, 4), (4, 32), 4, 384, 768)]
    assert abs(s.percent - 100 * (384 + 128) / (64 * 32 + 128 + 384)) < 1e-9


def test_describe_shows_layout_and_train():
    p = {"q": jnp.ones((32, 4, 8)), "head": jnp.ones((8, 2))}
    cfg = lj.LoraConfig(targets="q", rank=2, layouts={"q": lj.Layout(0, 1, 2)}, train="head")
    text = str(lj.describe(p, cfg))
    assert "32x4x8" in text and "in/out/out" in text and "explicit" in text
    assert "trained fully: head" in text
