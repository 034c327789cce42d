"""A small Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) in Flax Linen.

The parameter paths mirror Hugging Face's ``LlamaForCausalLM`` one to one,
so the ``"llama"`` key map of `lora_jax.interop` translates between them
and PEFT adapters for ``model.layers.{i}.self_attn.q_proj`` & co. apply to
this model unchanged::

    params/model/embed_tokens/embedding                      model.embed_tokens.weight
    params/model/layers_{i}/input_layernorm/weight            model.layers.{i}.input_layernorm.weight
    params/model/layers_{i}/self_attn/{q,k,v,o}_proj/kernel   model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (transposed)
    params/model/layers_{i}/post_attention_layernorm/weight   model.layers.{i}.post_attention_layernorm.weight
    params/model/layers_{i}/mlp/{gate,up,down}_proj/kernel    model.layers.{i}.mlp.{gate,up,down}_proj.weight (transposed)
    params/model/norm/weight                                  model.norm.weight
    params/lm_head/kernel                                     lm_head.weight (transposed; absent when tied)

With ``n_kv_heads < n_heads`` the k and v projections are narrower
(``n_kv_heads * head_dim`` outputs) and each key/value head serves
``n_heads / n_kv_heads`` query heads, as in Llama 2 70B and Llama 3.

Run ``python examples/llama.py`` for a tiny end-to-end demo: build the model
from random weights, train a LoRA adapter for a few steps, export it in
PEFT's format and import it back.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LlamaConfig", "Llama", "TARGETS", "ATTENTION", "init", "load_hf_state_dict",
           "to_hf_state_dict", "hf_config"]

TARGETS = r"params/model/layers_\d+/(self_attn/(q|k|v|o)|mlp/(gate|up|down))_proj/kernel"
"""LoRA targets: every linear projection of every layer (PEFT's ``all-linear`` minus lm_head)."""

ATTENTION = r"params/model/layers_\d+/self_attn/(q|k|v|o)_proj/kernel"
"""LoRA targets: the attention projections only."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Llama dimensions; the defaults are a tiny test model.

    Example:
      >>> LlamaConfig(d_model=64, n_heads=4, n_kv_heads=2).kv_dim
      32
    """

    vocab: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None     # default d_model // n_heads
    d_mlp: int = 128
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_len: int = 128
    tied: bool = False
    dtype: Any = jnp.float32        # compute dtype; parameters stay float32

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of "
                             f"n_kv_heads={self.n_kv_heads} (grouped-query attention).")

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.hd


def hf_config(c: LlamaConfig):
    """The matching ``transformers.LlamaConfig`` (eager attention, for exact comparisons)."""
    from transformers import LlamaConfig as HFConfig

    cfg = HFConfig(vocab_size=c.vocab, hidden_size=c.d_model, intermediate_size=c.d_mlp,
                   num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                   num_key_value_heads=c.n_kv_heads, head_dim=c.hd,
                   max_position_embeddings=c.max_len, rms_norm_eps=c.rms_eps,
                   rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                   tie_word_embeddings=c.tied, attention_bias=False, mlp_bias=False)
    cfg._attn_implementation = "eager"
    return cfg


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalized in float32 (as HF does)."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        # HF's weight * hidden.to(input_dtype): with float32 weights the product is
        # float32 (written out, so it also runs under strict dtype promotion)
        h = h.astype(self.dtype).astype(w.dtype)
        return w.reshape((1,) * (h.ndim - 1) + (-1,)) * h


def _rope(x, positions, theta):
    """Rotary embedding on ``x: (batch, length, heads, head_dim)``, HF's rotate-half form."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    freqs = positions[:, None].astype(jnp.float32) * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb)[None, :, None, :], jnp.sin(emb)[None, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


def _dense(features, name, dtype):
    return nn.Dense(features, use_bias=False, name=name, dtype=dtype,
                    kernel_init=nn.initializers.normal(0.02))


class Attention(nn.Module):
    c: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.c
        b, t, _ = x.shape
        q = _dense(c.n_heads * c.hd, "q_proj", c.dtype)(x).reshape(b, t, c.n_heads, c.hd)
        k = _dense(c.kv_dim, "k_proj", c.dtype)(x).reshape(b, t, c.n_kv_heads, c.hd)
        v = _dense(c.kv_dim, "v_proj", c.dtype)(x).reshape(b, t, c.n_kv_heads, c.hd)
        pos = jnp.arange(t)
        q, k = _rope(q, pos, c.rope_theta), _rope(k, pos, c.rope_theta)
        group = c.n_heads // c.n_kv_heads   # query heads per key/value head
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * (c.hd ** -0.5)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(c.dtype)
        out = jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, c.n_heads * c.hd)
        return _dense(c.d_model, "o_proj", c.dtype)(out)


class MLP(nn.Module):
    c: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.c
        gate = _dense(c.d_mlp, "gate_proj", c.dtype)(x)
        up = _dense(c.d_mlp, "up_proj", c.dtype)(x)
        return _dense(c.d_model, "down_proj", c.dtype)(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    c: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.c
        x = x + Attention(c, name="self_attn")(RMSNorm(c.rms_eps, c.dtype,
                                                       name="input_layernorm")(x))
        return x + MLP(c, name="mlp")(RMSNorm(c.rms_eps, c.dtype,
                                              name="post_attention_layernorm")(x))


class LlamaModel(nn.Module):
    c: LlamaConfig

    @nn.compact
    def __call__(self, tokens):
        c = self.c
        embed = nn.Embed(c.vocab, c.d_model, name="embed_tokens",
                         embedding_init=nn.initializers.normal(0.02))
        x = embed(tokens).astype(c.dtype)
        for i in range(c.n_layers):
            x = DecoderLayer(c, name=f"layers_{i}")(x)
        return RMSNorm(c.rms_eps, c.dtype, name="norm")(x), embed


class Llama(nn.Module):
    """``logits = Llama(cfg).apply(variables, tokens)``: (batch, length, vocab), causal.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = LlamaConfig(vocab=50, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64)
      >>> tokens = jnp.ones((2, 5), jnp.int32)
      >>> variables = Llama(cfg).init(jax.random.key(0), tokens)
      >>> Llama(cfg).apply(variables, tokens).shape
      (2, 5, 50)
      >>> variables["params"]["model"]["layers_0"]["self_attn"]["k_proj"]["kernel"].shape
      (32, 16)
    """

    c: LlamaConfig = LlamaConfig()

    @nn.compact
    def __call__(self, tokens):
        h, embed = LlamaModel(self.c, name="model")(tokens)
        if self.c.tied:
            return embed.attend(h)
        return _dense(self.c.vocab, "lm_head", self.c.dtype)(h)


def init(c: LlamaConfig = LlamaConfig(), *, seed: int = 0):
    """``(model, variables)`` with random weights (RMSNorm weights random too,
    so a comparison with another implementation exercises them)."""
    model = Llama(c)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    key = jax.random.key(seed + 1)

    def jitter(path, x):
        if path[-1].key == "weight":  # RMSNorm: ones by default
            k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()))
            return 1.0 + 0.1 * jax.random.normal(k, x.shape)
        return x

    return model, jax.tree_util.tree_map_with_path(jitter, variables)


# ----------------------------------------------------------------------------- HF weights


def load_hf_state_dict(state: Mapping[str, Any], c: LlamaConfig):
    """`Llama` variables from a Hugging Face ``LlamaForCausalLM`` state dict.

    ``state`` maps HF names to arrays (numpy, or torch tensors' ``.numpy()``).
    Every leaf of the model's skeleton is looked up through the ``"llama"``
    key map (linear weights transposed) and its shape checked.

    Example:
      >>> import numpy as np
      >>> cfg = LlamaConfig(vocab=50, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64)
      >>> _, v = init(cfg)
      >>> back = load_hf_state_dict(to_hf_state_dict(v), cfg)
      >>> k = lambda t: t["params"]["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
      >>> bool(np.array_equal(k(back), k(v)))
      True
    """
    from lora_jax.interop import from_hf_state_dict

    skeleton = jax.eval_shape(lambda: Llama(c).init(jax.random.key(0),
                                                    jnp.zeros((1, 4), jnp.int32)))
    ignore = ("lm_head.weight",) if c.tied else ()
    return from_hf_state_dict({k: v for k, v in state.items() if k not in ignore},
                              skeleton, key_map="llama")


def to_hf_state_dict(variables) -> dict[str, np.ndarray]:
    """Inverse of `load_hf_state_dict`: HF name -> numpy array (torch layout)."""
    from lora_jax.interop import to_hf_state_dict as convert

    return convert(variables, key_map="llama")


# ----------------------------------------------------------------------------- demo


def main():  # pragma: no cover - a demo script
    import tempfile

    import optax

    import lora_jax as lj

    cfg = LlamaConfig()
    model, variables = init(cfg)
    config = lj.LoraConfig(rank=8, alpha=16, targets=TARGETS)
    print(lj.describe(variables, config))
    adapters = lj.init(variables, config, key=jax.random.key(0))
    tx = lj.optimizer(optax.adam(1e-2))
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, cfg.vocab)

    def loss(params, adapters, toks):
        logits = model.apply(lj.merge(params, adapters, config), toks[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    step = lj.make_train_step(loss, tx)
    opt = tx.init(adapters)
    for i in range(5):
        adapters, opt, value = step(variables, adapters, opt, tokens)
        print(f"step {i}: loss {float(value):.4f}")
    with tempfile.TemporaryDirectory() as d:
        lj.export_peft(d, adapters, config, key_map="llama", params=variables)
        back, cfg2 = lj.import_peft(d, variables, key_map="llama")
        same = jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, adapters))
        print(f"exported to PEFT format and imported back: identical={same}")


if __name__ == "__main__":  # pragma: no cover
    main()
