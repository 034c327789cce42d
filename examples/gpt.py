"""The reference GPT-style decoder, in Flax Linen and in Flax NNX.

Used by the examples, the tests and the benchmarks. The default dimensions
are the project's reference: 4 layers, d_model 512, 8 heads, MLP 2048,
vocab 8192, learned positions, pre-LayerNorm blocks. LoRA with rank 8 on
q, k, v, o, fc1 and fc2 gives 294,912 adapter parameters.

Parameter paths (Linen, ``variables = model.init(...)``)::

    params/wte/embedding              (vocab, d)
    params/wpe                        (max_len, d)
    params/block_{i}/attn/{q,k,v,o}/kernel, bias
    params/block_{i}/mlp/{fc1,fc2}/kernel, bias
    params/block_{i}/ln{1,2}/scale, bias
    params/ln_f/scale, bias
    params/lm_head/kernel             (d, vocab)   (absent when tied)

With ``scan=True`` the blocks are one ``nn.scan`` stack under
``params/blocks/...`` with a leading layer axis (``nn.remat`` around the
block when ``remat=True``). The NNX model has the same names under
``blocks/{i}/...``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = ["GPTConfig", "GPT", "NNXGPT", "REFERENCE", "TARGETS", "loss_fn", "causal_lm_loss"]

TARGETS = r".*/(q|k|v|o|fc1|fc2)/kernel"
"""The reference LoRA targets: every linear projection of every block."""


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 8192
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 4
    d_mlp: int = 2048
    max_len: int = 128
    dtype: Any = jnp.float32        # compute dtype; params stay float32
    scan: bool = False              # Linen only: nn.scan over the blocks
    remat: bool = False             # Linen only: nn.remat around each block
    tied: bool = False              # output projection = wte.embedding.T


REFERENCE = GPTConfig()

_init = nn.initializers.normal(0.02)


def _attention(q, k, v, n_heads, dtype):
    b, t, d = q.shape
    hd = d // n_heads
    q = q.reshape(b, t, n_heads, hd)
    k = k.reshape(b, t, n_heads, hd)
    v = v.reshape(b, t, n_heads, hd)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd).astype(np.float32)
    mask = jnp.tril(jnp.ones((t, t), bool))
    s = jnp.where(mask, s.astype(jnp.float32), -1e9)
    p = jax.nn.softmax(s, axis=-1).astype(dtype)
    return jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, d)


# ----------------------------------------------------------------------------- Linen


class Attention(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dense = lambda name: nn.Dense(c.d_model, name=name, dtype=c.dtype,  # noqa: E731
                                      kernel_init=_init)
        a = _attention(dense("q")(x), dense("k")(x), dense("v")(x), c.n_heads, c.dtype)
        return dense("o")(a)


class MLP(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h = nn.Dense(c.d_mlp, name="fc1", dtype=c.dtype, kernel_init=_init)(x)
        return nn.Dense(c.d_model, name="fc2", dtype=c.dtype, kernel_init=_init)(jax.nn.gelu(h))


class Block(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x, _=None):
        c = self.cfg
        x = x + Attention(c, name="attn")(nn.LayerNorm(name="ln1", dtype=c.dtype)(x))
        x = x + MLP(c, name="mlp")(nn.LayerNorm(name="ln2", dtype=c.dtype)(x))
        return x, None


class GPT(nn.Module):
    """Linen decoder: ``logits = GPT(cfg).apply(variables, tokens)``."""

    cfg: GPTConfig = REFERENCE

    @nn.compact
    def __call__(self, tokens):
        c = self.cfg
        wte = nn.Embed(c.vocab, c.d_model, name="wte", embedding_init=_init)
        wpe = self.param("wpe", _init, (c.max_len, c.d_model))
        x = (wte(tokens) + wpe[None, : tokens.shape[1]]).astype(c.dtype)
        block = nn.remat(Block) if c.remat else Block
        if c.scan:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=c.n_layers)
            x, _ = stack(c, name="blocks")(x, None)
        else:
            for i in range(c.n_layers):
                x, _ = block(c, name=f"block_{i}")(x)
        x = nn.LayerNorm(name="ln_f", dtype=c.dtype)(x)
        if c.tied:
            return wte.attend(x)
        return nn.Dense(c.vocab, use_bias=False, name="lm_head", dtype=c.dtype,
                        kernel_init=_init)(x)


# ----------------------------------------------------------------------------- NNX


class NNXAttention(nnx.Module):
    def __init__(self, c: GPTConfig, rngs: nnx.Rngs):
        lin = lambda: nnx.Linear(c.d_model, c.d_model, dtype=c.dtype,  # noqa: E731
                                 kernel_init=_init, rngs=rngs)
        self.q, self.k, self.v, self.o = lin(), lin(), lin(), lin()
        self.n_heads, self.dtype = c.n_heads, c.dtype

    def __call__(self, x):
        return self.o(_attention(self.q(x), self.k(x), self.v(x), self.n_heads, self.dtype))


class NNXMLP(nnx.Module):
    def __init__(self, c: GPTConfig, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(c.d_model, c.d_mlp, dtype=c.dtype, kernel_init=_init, rngs=rngs)
        self.fc2 = nnx.Linear(c.d_mlp, c.d_model, dtype=c.dtype, kernel_init=_init, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class NNXBlock(nnx.Module):
    def __init__(self, c: GPTConfig, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(c.d_model, dtype=c.dtype, rngs=rngs)
        self.attn = NNXAttention(c, rngs)
        self.ln2 = nnx.LayerNorm(c.d_model, dtype=c.dtype, rngs=rngs)
        self.mlp = NNXMLP(c, rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class NNXGPT(nnx.Module):
    """NNX decoder with the same math and names as `GPT` (no scan/remat)."""

    def __init__(self, c: GPTConfig = REFERENCE, *, rngs: nnx.Rngs):
        self.cfg = c
        self.wte = nnx.Embed(c.vocab, c.d_model, embedding_init=_init, rngs=rngs)
        self.wpe = nnx.Param(_init(rngs.params(), (c.max_len, c.d_model)))
        self.blocks = nnx.List([NNXBlock(c, rngs) for _ in range(c.n_layers)])
        self.ln_f = nnx.LayerNorm(c.d_model, dtype=c.dtype, rngs=rngs)
        if not c.tied:
            self.lm_head = nnx.Linear(c.d_model, c.vocab, use_bias=False, dtype=c.dtype,
                                      kernel_init=_init, rngs=rngs)

    def __call__(self, tokens):
        x = (self.wte(tokens) + self.wpe[...][None, : tokens.shape[1]]).astype(self.cfg.dtype)
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_f(x)
        return self.wte.attend(x) if self.cfg.tied else self.lm_head(x)


# ----------------------------------------------------------------------------- training


def causal_lm_loss(logits, targets, mask=None):
    """Mean next-token cross-entropy (float32), optionally masked."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return losses.mean()
    mask = mask.astype(jnp.float32)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def loss_fn(apply_fn):
    """``loss(variables, tokens)`` for a ``(variables, tokens) -> logits`` function:
    predicts ``tokens[:, 1:]`` from ``tokens[:, :-1]``."""
    def loss(variables, tokens):
        logits = apply_fn(variables, tokens[:, :-1])
        return causal_lm_loss(logits, tokens[:, 1:])
    return loss


def random_tokens(cfg: GPTConfig, batch: int, *, seed: int = 0, length: int | None = None):
    """Random token ids ``(batch, length + 1)`` for benchmarks and tests."""
    rng = np.random.default_rng(seed)
    length = cfg.max_len if length is None else length
    return jnp.asarray(rng.integers(0, cfg.vocab, size=(batch, length + 1), dtype=np.int32))


def init_linen(cfg: GPTConfig = REFERENCE, *, seed: int = 0):
    """``(model, variables)`` for the Linen decoder."""
    model = GPT(cfg)
    tokens = jnp.zeros((1, min(cfg.max_len, 8)), jnp.int32)
    return model, jax.jit(model.init)(jax.random.key(seed), tokens)


def init_nnx(cfg: GPTConfig = REFERENCE, *, seed: int = 0):
    """``(graphdef, state)`` for the NNX decoder (``nnx.split``)."""
    return nnx.split(NNXGPT(cfg, rngs=nnx.Rngs(seed)))
