"""A GPT-2-style decoder in Flax Linen with Hugging Face's GPT-2 parameter layout.

GPT-2 keeps its projections in ``Conv1D`` modules whose weights are stored
``(in, out)``, like a Flax kernel, and fuses q, k and v into one ``c_attn``
projection of width ``3 * d``. This model does the same, so the ``"gpt2"``
key map of `lora_jax.interop` maps it onto ``GPT2LMHeadModel`` without
transposes and a LoRA on ``c_attn`` is one PEFT module (PEFT writes
``fan_in_fan_out: true`` for it)::

    params/wte/embedding, params/wpe/embedding        transformer.{wte,wpe}.weight
    params/h_{i}/ln_1/{scale,bias}                    transformer.h.{i}.ln_1.{weight,bias}
    params/h_{i}/attn/{c_attn,c_proj}/{kernel,bias}   transformer.h.{i}.attn.{c_attn,c_proj}.{weight,bias}
    params/h_{i}/ln_2/{scale,bias}                    transformer.h.{i}.ln_2.{weight,bias}
    params/h_{i}/mlp/{c_fc,c_proj}/{kernel,bias}      transformer.h.{i}.mlp.{c_fc,c_proj}.{weight,bias}
    params/ln_f/{scale,bias}                          transformer.ln_f.{weight,bias}

The output projection is tied to ``wte`` (``lm_head.weight`` in HF).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["GPT2Config", "GPT2", "TARGETS", "init", "hf_config", "load_hf_state_dict",
           "to_hf_state_dict"]

TARGETS = r"params/h_\d+/(attn/(c_attn|c_proj)|mlp/(c_fc|c_proj))/kernel"
"""LoRA targets: every Conv1D projection (PEFT's ``["c_attn", "c_proj", "c_fc"]``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """GPT-2 dimensions; the defaults are a tiny test model."""

    vocab: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_len: int = 64
    eps: float = 1e-5
    dtype: Any = jnp.float32


def hf_config(c: GPT2Config):
    """The matching ``transformers.GPT2Config`` (eager attention, no dropout)."""
    from transformers import GPT2Config as HFConfig

    cfg = HFConfig(vocab_size=c.vocab, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads,
                   n_positions=c.max_len, layer_norm_epsilon=c.eps, resid_pdrop=0.0,
                   embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new")
    cfg._attn_implementation = "eager"
    return cfg


def _conv1d(features, name, dtype):
    return nn.Dense(features, name=name, dtype=dtype, kernel_init=nn.initializers.normal(0.02))


class Attention(nn.Module):
    c: GPT2Config

    @nn.compact
    def __call__(self, x):
        c = self.c
        b, t, d = x.shape
        hd = d // c.n_heads
        qkv = _conv1d(3 * d, "c_attn", c.dtype)(x)
        q, k, v = (z.reshape(b, t, c.n_heads, hd) for z in jnp.split(qkv, 3, axis=-1))
        s = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * (hd ** -0.5)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(c.dtype)
        out = jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, d)
        return _conv1d(d, "c_proj", c.dtype)(out)


class MLP(nn.Module):
    c: GPT2Config

    @nn.compact
    def __call__(self, x):
        h = _conv1d(4 * self.c.d_model, "c_fc", self.c.dtype)(x)
        return _conv1d(self.c.d_model, "c_proj", self.c.dtype)(jax.nn.gelu(h, approximate=True))


class Block(nn.Module):
    c: GPT2Config

    @nn.compact
    def __call__(self, x):
        c = self.c
        x = x + Attention(c, name="attn")(nn.LayerNorm(c.eps, dtype=c.dtype, name="ln_1")(x))
        return x + MLP(c, name="mlp")(nn.LayerNorm(c.eps, dtype=c.dtype, name="ln_2")(x))


class GPT2(nn.Module):
    """``logits = GPT2(cfg).apply(variables, tokens)``, output tied to ``wte``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = GPT2Config(vocab=50, d_model=32, n_heads=4)
      >>> tokens = jnp.ones((2, 5), jnp.int32)
      >>> v = GPT2(cfg).init(jax.random.key(0), tokens)
      >>> GPT2(cfg).apply(v, tokens).shape, v["params"]["h_0"]["attn"]["c_attn"]["kernel"].shape
      ((2, 5, 50), (32, 96))
    """

    c: GPT2Config = GPT2Config()

    @nn.compact
    def __call__(self, tokens):
        c = self.c
        init = nn.initializers.normal(0.02)
        wte = nn.Embed(c.vocab, c.d_model, name="wte", embedding_init=init)
        wpe = nn.Embed(c.max_len, c.d_model, name="wpe", embedding_init=init)
        x = (wte(tokens) + wpe(jnp.arange(tokens.shape[1]))[None]).astype(c.dtype)
        for i in range(c.n_layers):
            x = Block(c, name=f"h_{i}")(x)
        return wte.attend(nn.LayerNorm(c.eps, dtype=c.dtype, name="ln_f")(x))


def init(c: GPT2Config = GPT2Config(), *, seed: int = 0):
    """``(model, variables)`` with random weights, LayerNorms and biases included."""
    model = GPT2(c)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    # Perturb everything so LayerNorm scales (ones) and biases (zeros) are exercised.
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree.unflatten(treedef, leaves)


def load_hf_state_dict(state: Mapping[str, Any], c: GPT2Config):
    """`GPT2` variables from a ``GPT2LMHeadModel`` state dict (numpy arrays).

    ``lm_head.weight`` (tied to ``wte``) and attention-mask buffers are ignored.

    Example:
      >>> import numpy as np
      >>> cfg = GPT2Config(vocab=50, d_model=32, n_heads=4)
      >>> _, v = init(cfg)
      >>> back = load_hf_state_dict(to_hf_state_dict(v), cfg)
      >>> bool(np.array_equal(back["params"]["h_1"]["mlp"]["c_fc"]["kernel"],
      ...                     v["params"]["h_1"]["mlp"]["c_fc"]["kernel"]))
      True
    """
    from lora_jax.interop import from_hf_state_dict

    skeleton = jax.eval_shape(lambda: GPT2(c).init(jax.random.key(0),
                                                   jnp.zeros((1, 4), jnp.int32)))
    state = {k: v for k, v in state.items()
             if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))}
    return from_hf_state_dict(state, skeleton, key_map="gpt2")


def to_hf_state_dict(variables) -> dict[str, np.ndarray]:
    """Inverse of `load_hf_state_dict` (without the tied ``lm_head.weight``)."""
    from lora_jax.interop import to_hf_state_dict as convert

    return convert(variables, key_map="gpt2")
