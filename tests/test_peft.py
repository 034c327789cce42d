"""PEFT interop, proven against PyTorch: JAX adapter -> export_peft -> PeftModel
logits, and PEFT adapter -> save_pretrained -> import_peft -> JAX logits, for a
Llama-style decoder with GQA, a BERT encoder and a GPT-2 decoder (fused
Conv1D attention, fan_in_fan_out) and a Llama whose layers are an nn.scan stack
(key map templates with '{i}'; PEFT's layers_to_transform); plus every bad input
import/export refuses. Tied embeddings: tests/test_peft_tied.py."""

import json
import os
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from examples import bert, gpt2, llama
from tests._asserts import assert_trees_close, random_adapters, rel_err
from tests.conftest import SEED

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.torch,
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]

LLAMA = llama.LlamaConfig(vocab=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=128)
TOL = 1e-5


def _gen():
    return np.random.default_rng(SEED)


@pytest.fixture(scope="module")
def llama_base():
    gen = _gen()
    model = llama.Llama(LLAMA)
    variables = _np_params(model, gen, ones=("weight",))
    tokens = gen.integers(0, LLAMA.vocab, size=(2, 12)).astype(np.int32)
    return model, variables, tokens


def _torch_llama(variables):
    hf = transformers.LlamaForCausalLM(llama.hf_config(LLAMA))
    sd = {k: torch.from_numpy(np.array(v)) for k, v in llama.to_hf_state_dict(variables).items()}
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


def _torch_logits(model, tokens, **kw):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens.astype(np.int64)), **kw).logits.numpy()


def _jax_logits(model, variables, adapters, config, tokens):
    """Logits through lj.merge (the reference) and, where it exists, lj.apply."""
    merged = model.apply(lj.merge(variables, adapters, config), tokens)
    out = {"merge": np.asarray(merged)}
    if hasattr(lj, "apply"):
        out["apply"] = np.asarray(lj.apply(model.apply, config)(variables, adapters, tokens))
    return out


def _via_apply(fn, variables, adapters, config, *args):
    """``fn`` run through lj.apply (the efficient path), or None before it exists."""
    if not hasattr(lj, "apply"):
        return None
    return np.asarray(lj.apply(fn, config)(variables, adapters, *args))


def _perturbed(variables, config, seed):
    return random_adapters(variables, config, seed=SEED + seed)


def _np_params(module, gen, ones=()):
    """Random params for ``module`` without compiling its init: N(0, 0.05), or
    1 + N(0, 0.1) for leaves named in ``ones`` (norm weights)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))

    def draw(keypath, s):
        x = gen.standard_normal(s.shape).astype(np.float32)
        name = lj.path_str(keypath).rsplit("/", 1)[-1]
        return jnp.asarray(1.0 + 0.1 * x if name in ones else 0.05 * x, s.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.slow
def test_base_models_agree(llama_base):
    model, variables, tokens = llama_base
    want = _torch_logits(_torch_llama(variables), tokens)
    got = np.asarray(model.apply(variables, tokens))
    assert rel_err(got, want) <= TOL


LLAMA_CASES = {
    "all-linear": lj.LoraConfig(rank=8, alpha=16, targets=llama.TARGETS),
    "rslora+patterns+train": lj.LoraConfig(
        rank=8, alpha=16, targets=llama.TARGETS, use_rslora=True,
        rank_pattern={r".*/down_proj/kernel": 4, r".*layers_1/self_attn/k_proj/kernel": 2},
        alpha_pattern={r".*/down_proj/kernel": 8}, train=r"params/model/norm/weight"),
    "embedding+attention": lj.LoraConfig(
        rank=4, alpha=8, targets=(llama.ATTENTION, r"params/model/embed_tokens/embedding")),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_jax_adapter_loads_in_peft(tmp_path, llama_base, case):
    model, variables, tokens = llama_base
    config = LLAMA_CASES[case]
    ad = _perturbed(variables, config, 1)
    if config.train:
        ad["params"]["model"]["norm"]["weight"] = ad["params"]["model"]["norm"]["weight"] * 1.5
    lj.export_peft(tmp_path, ad, config, key_map="llama", params=variables,
                   task_type="CAUSAL_LM")
    pcfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(pcfg["target_modules"], list)
    peft_model = peft.PeftModel.from_pretrained(_torch_llama(variables), str(tmp_path)).eval()
    want = _torch_logits(peft_model, tokens)
    base = _torch_logits(_torch_llama(variables), tokens)
    assert rel_err(want, base) > 1e-3, "the adapter must change the model"
    for how, got in _jax_logits(model, variables, ad, config, tokens).items():
        assert rel_err(got, want) <= TOL, (how, rel_err(got, want))
    # PEFT's own scaling per module matches ours
    for name, mod in peft_model.named_modules():
        if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling \
                and name.endswith("_proj"):
            path = "params/" + name.replace("base_model.model.", "").replace(".", "/") \
                .replace("layers/", "layers_") + "/kernel"
            assert mod.scaling["default"] == pytest.approx(config.scale_for(path), rel=1e-6)


@pytest.mark.slow
def test_llama_peft_adapter_imports(tmp_path, llama_base):
    model, variables, tokens = llama_base
    torch.manual_seed(SEED)
    pcfg = peft.LoraConfig(r=8, lora_alpha=12, init_lora_weights=False, use_rslora=True,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj", "embed_tokens"],
                           modules_to_save=["norm"],
                           rank_pattern={"down_proj": 4}, alpha_pattern={"k_proj": 6})
    pm = peft.get_peft_model(_torch_llama(variables), pcfg).eval()
    with torch.no_grad():  # make the modules_to_save copy differ from the base
        pm.base_model.model.model.norm.modules_to_save["default"].weight.mul_(1.5)
    want = _torch_logits(pm, tokens)
    pm.save_pretrained(str(tmp_path))
    ad, config = lj.import_peft(tmp_path, variables, key_map="llama")
    assert config.use_rslora and config.rank == 8 and config.alpha == 12
    assert config.rank_for("params/model/layers_0/mlp/down_proj/kernel") == 4
    assert config.alpha_for("params/model/layers_1/self_attn/k_proj/kernel") == 6
    assert len(lj.describe(variables, config).specs) == 15
    # PEFT matches modules_to_save by plain suffix: "norm" is every RMSNorm
    assert len(config.train) == 5 and "params/model/norm/weight" in config.train
    for how, got in _jax_logits(model, variables, ad, config, tokens).items():
        assert rel_err(got, want) <= TOL, (how, rel_err(got, want))
    # PEFT stored the targeted embedding's base weight: another base is caught
    other = jax.tree.map(lambda x: x, variables)
    other["params"]["model"]["embed_tokens"]["embedding"] = \
        variables["params"]["model"]["embed_tokens"]["embedding"] * 1.01
    with pytest.raises(lj.BaseMismatchError, match="embed_tokens/embedding"):
        lj.import_peft(tmp_path, other, key_map="llama")


def test_extra_adapters_in_subfolders(tmp_path, llama_base):
    model, variables, tokens = llama_base
    c1 = lj.LoraConfig(rank=4, alpha=8, targets=llama.ATTENTION)
    c2 = lj.LoraConfig(rank=2, alpha=2, targets=r".*/mlp/(up|down)_proj/kernel")
    a1, a2 = _perturbed(variables, c1, 2), _perturbed(variables, c2, 3)
    lj.export_peft(tmp_path, a1, c1, key_map="llama")
    folder = lj.export_peft(tmp_path, a2, c2, key_map="llama", adapter_name="other")
    assert folder == os.path.join(str(tmp_path), "other")
    pm = peft.PeftModel.from_pretrained(_torch_llama(variables), str(tmp_path)).eval()
    pm.load_adapter(folder, adapter_name="other")
    pm.set_adapter("other")
    want = _torch_logits(pm, tokens)
    back, cfg2 = lj.import_peft(tmp_path, variables, key_map="llama", adapter_name="other")
    got = np.asarray(model.apply(lj.merge(variables, back, cfg2), tokens))
    assert rel_err(got, want) <= TOL
    with pytest.raises(ValueError, match="already holds a PEFT adapter.*overwrite=True"):
        lj.export_peft(tmp_path, a1, c1, key_map="llama")


# ----------------------------------------------------------------------------- BERT


BERT = bert.BertConfig(vocab_size=80, hidden_size=64, num_layers=2, num_heads=4,
                       intermediate_size=128, max_position=32)


@pytest.fixture(scope="module")
def bert_base():
    torch.manual_seed(SEED)
    hf_cfg = transformers.BertConfig(vocab_size=80, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=32, hidden_act="gelu")
    hf_cfg._attn_implementation = "eager"
    hf = transformers.BertModel(hf_cfg, add_pooling_layer=True).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v.numpy().copy() for k, v in hf.state_dict().items()}
    variables = bert.load_hf_state_dict(state, BERT, strict=False)
    gen = _gen()
    ids = gen.integers(0, 80, size=(2, 10)).astype(np.int32)
    mask = np.ones((2, 10), np.int32)
    mask[1, 7:] = 0
    return hf_cfg, state, variables, ids, mask


def _torch_bert(hf_cfg, state):
    hf = transformers.BertModel(hf_cfg, add_pooling_layer=True)
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    return hf.eval()


def _bert_hidden(variables, ids, mask):
    return np.asarray(bert.BertModel(BERT).apply(variables, ids, mask).last_hidden_state)


def _torch_hidden(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)))
    return out.last_hidden_state.numpy()


@pytest.mark.slow
def test_bert_jax_adapter_loads_in_peft(tmp_path, bert_base):
    hf_cfg, state, variables, ids, mask = bert_base
    valid = mask.astype(bool)
    base = _torch_hidden(_torch_bert(hf_cfg, state), ids, mask)
    assert rel_err(_bert_hidden(variables, ids, mask)[valid], base[valid]) <= TOL
    config = lj.LoraConfig(rank=8, alpha=16, targets=bert.ALL_LINEAR)
    ad = _perturbed(variables, config, 4)
    lj.export_peft(tmp_path, ad, config, key_map="bert", params=variables)
    pm = peft.PeftModel.from_pretrained(_torch_bert(hf_cfg, state), str(tmp_path)).eval()
    want = _torch_hidden(pm, ids, mask)
    got = _bert_hidden(lj.merge(variables, ad, config), ids, mask)
    assert rel_err(want[valid], base[valid]) > 1e-3
    assert rel_err(got[valid], want[valid]) <= TOL
    fast = _via_apply(lambda v, i, m: bert.BertModel(BERT).apply(v, i, m).last_hidden_state,
                      variables, ad, config, ids, mask)
    if fast is not None:
        assert rel_err(fast[valid], want[valid]) <= TOL


@pytest.mark.slow
def test_bert_peft_adapter_imports(tmp_path, bert_base):
    hf_cfg, state, variables, ids, mask = bert_base
    valid = mask.astype(bool)
    torch.manual_seed(SEED + 1)
    pcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"],
                           init_lora_weights=False)
    pm = peft.get_peft_model(_torch_bert(hf_cfg, state), pcfg).eval()
    want = _torch_hidden(pm, ids, mask)
    pm.save_pretrained(str(tmp_path))
    ad, config = lj.import_peft(tmp_path, variables, key_map="bert")
    # "dense" also matched the pooler, which PEFT adapted too
    assert "params/pooler/dense/kernel" in lj.describe(variables, config).specs
    got = _bert_hidden(lj.merge(variables, ad, config), ids, mask)
    assert rel_err(got[valid], want[valid]) <= TOL


# ----------------------------------------------------------------------------- GPT-2


GPT2 = gpt2.GPT2Config(vocab=90, d_model=64, n_layers=2, n_heads=4, max_len=32)


@pytest.fixture(scope="module")
def gpt2_base():
    gen = _gen()
    model = gpt2.GPT2(GPT2)
    variables = _np_params(model, gen, ones=("scale",))
    tokens = gen.integers(0, GPT2.vocab, size=(2, 11)).astype(np.int32)
    return model, variables, tokens


def _torch_gpt2(variables):
    hf = transformers.GPT2LMHeadModel(gpt2.hf_config(GPT2))
    sd = {k: torch.from_numpy(np.array(v)) for k, v in gpt2.to_hf_state_dict(variables).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to wte
    return hf.eval()


@pytest.mark.slow
def test_gpt2_roundtrip_with_fan_in_fan_out(tmp_path, gpt2_base):
    model, variables, tokens = gpt2_base
    base = _torch_logits(_torch_gpt2(variables), tokens)
    assert rel_err(np.asarray(model.apply(variables, tokens)), base) <= TOL
    config = lj.LoraConfig(rank=8, alpha=16, targets=gpt2.TARGETS)
    ad = _perturbed(variables, config, 5)
    lj.export_peft(tmp_path / "jax", ad, config, key_map="gpt2")
    assert json.loads((tmp_path / "jax" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    pm = peft.PeftModel.from_pretrained(_torch_gpt2(variables), str(tmp_path / "jax")).eval()
    want = _torch_logits(pm, tokens)
    got = np.asarray(model.apply(lj.merge(variables, ad, config), tokens))
    assert rel_err(want, base) > 1e-3 and rel_err(got, want) <= TOL
    fast = _via_apply(model.apply, variables, ad, config, tokens)
    if fast is not None:
        assert rel_err(fast, want) <= TOL
    # and back: a PEFT-made GPT-2 adapter (fused c_attn, Conv1D)
    torch.manual_seed(SEED + 2)
    pm = peft.get_peft_model(_torch_gpt2(variables), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False,
        fan_in_fan_out=True)).eval()
    want = _torch_logits(pm, tokens)
    pm.save_pretrained(str(tmp_path / "peft"))
    back, cfg2 = lj.import_peft(tmp_path / "peft", variables, key_map="gpt2")
    got = np.asarray(model.apply(lj.merge(variables, back, cfg2), tokens))
    assert rel_err(got, want) <= TOL


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture
def exported(tmp_path, llama_base):
    """A JAX adapter exported to tmp_path/ad (with fingerprint and hashes)."""
    _, variables, _ = llama_base
    config = lj.LoraConfig(rank=4, alpha=8, targets=llama.ATTENTION)
    ad = _perturbed(variables, config, 6)
    folder = lj.export_peft(tmp_path / "ad", ad, config, key_map="llama", params=variables)
    return folder, variables, ad, config


def _edit_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as fh:
        cfg = json.load(fh)
    cfg.update(changes)
    with open(path, "w") as fh:
        json.dump(cfg, fh)


def _rewrite_tensors(folder, fn, keep_meta=False):
    from safetensors import safe_open
    from safetensors.numpy import save_file
    path = os.path.join(folder, "adapter_model.safetensors")
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = fn(tensors)
    save_file(tensors, path, metadata=meta if keep_meta else {"format": "pt"})


@pytest.mark.parametrize("field,value,what", [
    ("lora_bias", True, "lora_bias"),
    ("layer_replication", [[0, 2], [1, 2]], "layer_replication"),
    ("init_lora_weights", "pissa", "init_lora_weights='pissa'"),
    ("init_lora_weights", "loftq", "init_lora_weights='loftq'"),
    ("bias", "all", "bias='all'"),
    ("peft_type", "LOHA", "peft_type='LOHA'"),
    ("fan_in_fan_out", True, "fan_in_fan_out=true"),
])
def test_unsupported_peft_variants_refused(exported, field, value, what):
    folder, variables, _, _ = exported
    _edit_config(folder, **{field: value})
    with pytest.raises(lj.interop.UnsupportedPeftFeature, match=re.escape(what) + ".*Fix"):
        lj.import_peft(folder, variables, key_map="llama")


def test_target_parameters_the_key_map_does_not_place_are_refused(exported):
    # (expert weights themselves are supported: tests/test_peft_experts.py)
    folder, variables, _, _ = exported
    _edit_config(folder, target_parameters=["experts.down_proj"])
    with pytest.raises(ValueError, match=r"target_parameters \['experts.down_proj'\] match no "
                       r"parameter the key map maps as an expert weight.*Fix: map them with "
                       r"kind 'experts'"):
        lj.import_peft(folder, variables, key_map="llama")


def test_dora_tensor_without_use_dora_refused(exported):
    # (DoRA itself is supported: tests/test_dora.py)
    folder, variables, _, _ = exported
    _rewrite_tensors(folder, lambda t: {**t, "base_model.model.model.layers.0.self_attn."
                                        "q_proj.lora_magnitude_vector": np.ones(64, np.float32)})
    with pytest.raises(ValueError, match="use_dora=False but the module has a DoRA"):
        lj.import_peft(folder, variables, key_map="llama")
    _edit_config(folder, use_dora=True)   # now the other modules lack a magnitude
    with pytest.raises(ValueError, match="use_dora=True but the module lacks a DoRA"):
        lj.import_peft(folder, variables, key_map="llama")


def test_unknown_field_warns(exported):
    folder, variables, ad, _ = exported
    _edit_config(folder, some_future_field=3)
    with pytest.warns(lj.LoraWarning, match="some_future_field"):
        lj.import_peft(folder, variables, key_map="llama")


def test_roundtrip_exact_and_config(exported):
    folder, variables, ad, config = exported
    back, cfg2 = lj.import_peft(folder, variables, key_map="llama")
    assert lj.describe(variables, cfg2).specs.keys() == lj.describe(variables, config).specs.keys()
    assert_trees_close(back, ad, exact=True)


def test_export_key_map_leaving_targets_unmapped(tmp_path, llama_base):
    _, variables, _ = llama_base
    config = lj.LoraConfig(rank=4, targets=llama.TARGETS)
    ad = _perturbed(variables, config, 9)
    km = lj.interop.KeyMap(((r"params/model/layers_(\d+)/self_attn/(\w+)/kernel",
                             r"model.layers.\1.self_attn.\2.weight", "linear"),))
    with pytest.raises(ValueError, match=r"leaves 6 adapted/trained paths unmapped.*mlp.*Fix"):
        lj.export_peft(tmp_path, ad, config, key_map=km)
    assert not os.path.exists(tmp_path / "adapter_config.json")


def test_import_keys_not_mapping(exported, llama_base):
    folder, variables, _, _ = exported
    with pytest.raises(ValueError, match=r"keys don't map to any leaf.*Fix"):
        lj.import_peft(folder, variables, key_map="bert")
    _rewrite_tensors(folder, lambda t: {k.replace("base_model.model.", "model."): v
                                        for k, v in t.items()})
    with pytest.raises(ValueError, match=r"keys don't map.*'model.model.layers"):
        lj.import_peft(folder, variables, key_map="llama")


def test_missing_factor(exported):
    folder, variables, _, _ = exported
    gone = "layers.1.self_attn.v_proj.lora_B.weight"
    _rewrite_tensors(folder, lambda t: {k: v for k, v in t.items() if not k.endswith(gone)})
    with pytest.raises(ValueError, match=r"layers.1.self_attn.v_proj has no lora_B"):
        lj.import_peft(folder, variables, key_map="llama")


def test_shape_mismatch_with_base(exported):
    folder, _, _, _ = exported
    wider_cfg = llama.LlamaConfig(vocab=96, d_model=96, n_layers=2, n_heads=4, n_kv_heads=2,
                                  d_mlp=128)
    shapes = jax.eval_shape(llama.Llama(wider_cfg).init, jax.random.key(0),
                            jnp.zeros((1, 4), jnp.int32))
    wider = jax.tree.map(lambda s: jnp.asarray(_gen().normal(size=s.shape), s.dtype), shapes)
    with pytest.raises(ValueError, match=r"(?s)adapter shapes do not fit the weight"):
        lj.import_peft(folder, wider, key_map="llama")


def test_rank_above_min_dims(exported):
    folder, variables, _, _ = exported
    # k_proj is 64 -> 32: a rank-40 factor can't be a valid update
    def grow(t):
        out = dict(t)
        for k in [k for k in t if "layers.0.self_attn.k_proj" in k]:
            shape = (40, 64) if "lora_A" in k else (32, 40)
            out[k] = np.ones(shape, np.float32)
        return out
    _rewrite_tensors(folder, grow)
    _edit_config(folder, rank_pattern={r"model\.layers\.0\.self_attn\.k_proj": 40})
    with pytest.raises(ValueError, match=r"k_proj/kernel: rank 40 exceeds min\(in, out\)"):
        lj.import_peft(folder, variables, key_map="llama")


def test_rank_disagreeing_with_config(exported):
    folder, variables, _, _ = exported
    _edit_config(folder, r=8)
    with pytest.raises(ValueError, match=r"don't have the rank 8"):
        lj.import_peft(folder, variables, key_map="llama")


def test_nan_in_imported_adapter(exported):
    folder, variables, _, _ = exported

    def poison(t):
        k = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
        v = t[k].copy()
        v[3, 1] = np.inf
        return {**t, k: v}
    _rewrite_tensors(folder, poison)
    with pytest.raises(ValueError, match=r"layers_1/self_attn/o_proj/kernel/b has 1 NaN/Inf"):
        lj.import_peft(folder, variables, key_map="llama")


def test_truncated_and_flipped_safetensors(exported):
    folder, variables, _, _ = exported
    path = os.path.join(folder, "adapter_model.safetensors")
    data = bytearray(Path(path).read_bytes())
    flipped = bytearray(data)
    flipped[-100] ^= 0x10           # inside the last tensor: safetensors reads it silently
    Path(path).write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"does not match the sha256.*corrupted"):
        lj.import_peft(folder, variables, key_map="llama")
    Path(path).write_bytes(bytes(data[:-37]))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: can't read.*truncated"):
        lj.import_peft(folder, variables, key_map="llama")


def test_pickle_refused_and_missing_files(tmp_path, exported):
    folder, variables, _, _ = exported
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    Path(folder, "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(ValueError, match="pickle, which lora_jax never loads"):
        lj.import_peft(folder, variables, key_map="llama")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        lj.import_peft(tmp_path / "nothing", variables, key_map="llama")


def test_base_fingerprint_in_peft_files(exported):
    folder, variables, _, _ = exported
    other = jax.tree.map(lambda x: x * 1.01, variables)
    with pytest.raises(lj.BaseMismatchError):
        lj.import_peft(folder, other, key_map="llama")
    lj.import_peft(folder, other, key_map="llama", on_base_mismatch="ignore")


def test_dtypes(tmp_path, llama_base):
    _, variables, _ = llama_base
    config = lj.LoraConfig(rank=4, targets=llama.ATTENTION, dtype=jnp.bfloat16)
    ad = _perturbed(variables, config, 7)
    lj.export_peft(tmp_path, ad, config, key_map="llama")
    back, cfg2 = lj.import_peft(tmp_path, variables, key_map="llama")
    assert cfg2.dtype == jnp.bfloat16
    q = back["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.a.dtype == jnp.bfloat16
    back, cfg3 = lj.import_peft(tmp_path, variables, key_map="llama", dtype=jnp.float32)
    assert cfg3.dtype == jnp.float32
    _rewrite_tensors(tmp_path, lambda t: {k: (v.astype(np.float32) if "layers.0" in k else v)
                                          for k, v in t.items()})
    with pytest.raises(ValueError, match=r"mix dtypes.*dtype="):
        lj.import_peft(tmp_path, variables, key_map="llama")


def test_modules_to_save_needs_params(tmp_path, llama_base):
    _, variables, _ = llama_base
    config = lj.LoraConfig(rank=4, targets=llama.ATTENTION, train=r"params/lm_head/kernel")
    ad = _perturbed(variables, config, 10)
    with pytest.raises(ValueError, match="modules_to_save.*pass params="):
        lj.export_peft(tmp_path, ad, config, key_map="llama")


def test_stacked_layers_roundtrip(tmp_path):
    """One stacked (scan) axis: layer i becomes module model.layers.{i}.<name>."""
    gen = _gen()
    params = {"params": {"layers": {
        "q": {"kernel": jnp.asarray(gen.standard_normal((3, 16, 8)), jnp.float32)},
        "up": {"kernel": jnp.asarray(gen.standard_normal((3, 16, 24)), jnp.float32)}}}}
    config = lj.LoraConfig(rank=2, alpha=4, targets=r".*/kernel",
                           layouts={r".*": lj.Layout(1, 1, 1)})
    ad = _perturbed(params, config, 8)
    km = lj.interop.KeyMap(((r"params/layers/(\w+)/kernel", r"model.layers.{i}.\1.weight",
                             "linear"),))
    lj.export_peft(tmp_path, ad, config, key_map=km)
    from safetensors.numpy import load_file
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.2.up.lora_B.weight" in keys and len(keys) == 12
    back, cfg2 = lj.import_peft(tmp_path, params, key_map=km)
    a, b = ad["params"]["layers"]["up"]["kernel"], back["params"]["layers"]["up"]["kernel"]
    assert np.array_equal(np.asarray(a.a), np.asarray(b.a))
    with pytest.raises(ValueError, match=r"needs a key map template with '\{i\}'"):
        lj.export_peft(tmp_path / "x", ad, config, key_map=lj.interop.KeyMap(
            ((r"params/layers/(\w+)/kernel", r"model.\1.weight", "linear"),)))


# ----------------------------------------------------------------------------- nn.scan stacks


class _ScanLayer(nn.Module):
    """examples/llama.py's decoder layer as an nn.scan body."""

    c: llama.LlamaConfig

    @nn.compact
    def __call__(self, x, _):
        c = self.c
        x = x + llama.Attention(c, name="self_attn")(
            llama.RMSNorm(c.rms_eps, c.dtype, name="input_layernorm")(x))
        x = x + llama.MLP(c, name="mlp")(
            llama.RMSNorm(c.rms_eps, c.dtype, name="post_attention_layernorm")(x))
        return x, None


class ScanLlama(nn.Module):
    """The Llama with its layers stacked: params/model/layers/<...> hold (n_layers, ...)."""

    c: llama.LlamaConfig

    @nn.compact
    def __call__(self, tokens):
        c = self.c
        x = nn.Embed(c.vocab, c.d_model, name="embed_tokens")(tokens)
        stack = nn.scan(_ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=c.n_layers)
        x, _ = stack(c, name="layers")(x, None)
        x = llama.RMSNorm(c.rms_eps, c.dtype, name="norm")(x)
        return nn.Dense(c.vocab, use_bias=False, name="lm_head")(x)


# One rule per stacked family: '{i}' is the layer index of the leading axis.
SCAN_KEY_MAP = lj.interop.KeyMap((
    (r"params/embed_tokens/embedding", "model.embed_tokens.weight", "embedding"),
    (r"params/layers/(self_attn|mlp)/(\w+_proj)/kernel", r"model.layers.{i}.\1.\2.weight",
     "linear"),
    (r"params/layers/(\w+_layernorm)/weight", r"model.layers.{i}.\1.weight", "vector"),
    (r"params/norm/weight", "model.norm.weight", "vector"),
    (r"params/lm_head/kernel", "lm_head.weight", "linear"),
), name="scan-llama")

LLAMA3 = llama.LlamaConfig(vocab=96, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=128)


@pytest.fixture(scope="module")
def scan_base():
    """A transformers Llama and the same weights as a stacked JAX tree (from its state dict)."""
    torch.manual_seed(SEED + 20)
    hf = transformers.LlamaForCausalLM(llama.hf_config(LLAMA3))
    with torch.no_grad():  # non-trivial norms
        for name, p in hf.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.add_(0.1 * torch.randn_like(p))
    state = {k: v.numpy().copy() for k, v in hf.state_dict().items()}
    model = ScanLlama(LLAMA3)
    like = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    variables = lj.interop.from_hf_state_dict(state, like, SCAN_KEY_MAP)
    tokens = _gen().integers(0, LLAMA3.vocab, size=(2, 10)).astype(np.int32)
    return state, model, variables, tokens


def _torch_from_state(state):
    hf = transformers.LlamaForCausalLM(llama.hf_config(LLAMA3))
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return hf.eval()


@pytest.mark.slow
def test_hf_state_dict_of_stacked_layers(scan_base):
    state, model, variables, tokens = scan_base
    hf = _torch_from_state(state)
    q = variables["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (3, 64, 64)
    assert np.array_equal(np.asarray(q[2]), state["model.layers.2.self_attn.q_proj.weight"].T)
    # the scanned model computes what transformers does
    assert rel_err(np.asarray(model.apply(variables, tokens)), _torch_logits(hf, tokens)) <= TOL
    # and back: the same names and values as transformers' state dict
    back = lj.interop.to_hf_state_dict(variables, SCAN_KEY_MAP)
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        assert np.array_equal(back[k], v), k
    again = lj.interop.from_hf_state_dict(back, variables, SCAN_KEY_MAP)
    assert_trees_close(again, variables, exact=True)
    # a missing layer is named
    with pytest.raises(ValueError, match=r"1 weights missing, e.g. "
                                         r"\['model.layers.1.mlp.up_proj.weight'\]"):
        lj.interop.from_hf_state_dict({k: v for k, v in state.items()
                                       if k != "model.layers.1.mlp.up_proj.weight"},
                                      variables, SCAN_KEY_MAP)
    with pytest.raises(ValueError, match=r"1 entries are not used.*model.layers.3"):
        lj.interop.from_hf_state_dict({**state, "model.layers.3.mlp.up_proj.weight":
                                       state["model.layers.0.mlp.up_proj.weight"]},
                                      variables, SCAN_KEY_MAP)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight .. "
                                         r"model.layers.2.mlp.up_proj.weight \(stacked\) -> "
                                         r"params/layers/mlp/up_proj/kernel: shape"):
        lj.interop.from_hf_state_dict(
            {**state, **{f"model.layers.{i}.mlp.up_proj.weight": np.zeros((64, 64), np.float32)
                         for i in range(3)}}, variables, SCAN_KEY_MAP)
    with pytest.raises(ValueError, match=r"params/scale: the key map gives 'layers.\{i\}.s' "
                                         r"with '\{i\}' but the leaf is a scalar"):
        lj.interop.to_hf_state_dict({"params": {"scale": np.float32(2.0)}},
                                    lj.interop.KeyMap(((r"params/scale", "layers.{i}.s"),)))
    with pytest.raises(ValueError, match=r"a 'linear' weight must be 2-D.*'\{i\}'"):
        lj.interop.to_hf_state_dict(variables, lj.interop.KeyMap(
            ((r"params/layers/(self_attn|mlp)/(\w+_proj)/kernel", r"model.\2.weight"),)),
            strict=False)


def _scan_config(model, variables, tokens, **kw):
    return lj.configure(lj.LoraConfig(**kw), model.apply, variables, tokens)


@pytest.mark.slow
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_layers_to_transform_into_stacked_layers(tmp_path, scan_base, use_dora):
    """A PEFT adapter on layers 0 and 2 only: the stacked leaves get zero adapters
    (DoRA: the base's own magnitudes) in layer 1, so the forward is PEFT's."""
    state, model, variables, tokens = scan_base
    torch.manual_seed(SEED + 21)
    pm = peft.get_peft_model(_torch_from_state(state), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, use_dora=use_dora,
        target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[0, 2])).eval()
    want = _torch_logits(pm, tokens)
    pm.save_pretrained(str(tmp_path))
    ad, config = lj.import_peft(tmp_path, variables, key_map=SCAN_KEY_MAP)
    down = ad["params"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert down.a.shape == (3, 128, 4) and config.layout_for(
        "params/layers/mlp/down_proj/kernel") == lj.Layout(1, 1, 1)
    assert not np.any(np.asarray(down.b[1])) and np.any(np.asarray(down.b[0]))
    merged = model.apply(lj.merge(variables, ad, config), tokens)
    for how, got in {"merge": merged,
                     "apply": lj.apply(model.apply, config)(variables, ad, tokens)}.items():
        assert rel_err(got, want) <= TOL, (how, rel_err(got, want))
    if use_dora:
        return
    # the unrolled Llama (one module per layer) reads the same file
    unrolled = llama.load_hf_state_dict(state, LLAMA3)
    ad2, cfg2 = lj.import_peft(tmp_path, unrolled, key_map="llama")
    assert "params/model/layers_1/self_attn/q_proj/kernel" not in lj.describe(unrolled, cfg2).specs
    got = llama.Llama(LLAMA3).apply(lj.merge(unrolled, ad2, cfg2), tokens)
    assert rel_err(got, want) <= TOL
    # a layer the config selects but the file lacks is an error, not a zero adapter
    _rewrite_tensors(tmp_path, lambda t: {k: v for k, v in t.items()
                                          if "layers.2.self_attn.q_proj" not in k})
    for params, km in ((variables, SCAN_KEY_MAP), (unrolled, "llama")):
        with pytest.raises(ValueError, match=r"adapter_model.safetensors: "
                                             r"model.layers.2.self_attn.q_proj: "
                                             r"adapter_config.json's target_modules select this "
                                             r"module, but the file has neither its lora_A nor "
                                             r"its lora_B.*Fix"):
            lj.import_peft(tmp_path, params, key_map=km)


@pytest.mark.slow
def test_stacked_export_loads_in_peft(tmp_path, scan_base):
    state, model, variables, tokens = scan_base
    config = _scan_config(model, variables, tokens, rank=4, alpha=8,
                          targets=r"params/layers/.*_proj/kernel")
    ad = _perturbed(variables, config, 22)
    lj.export_peft(tmp_path, ad, config, key_map=SCAN_KEY_MAP, params=variables)
    pm = peft.PeftModel.from_pretrained(_torch_from_state(state), str(tmp_path)).eval()
    want = _torch_logits(pm, tokens)
    got = lj.apply(model.apply, config)(variables, ad, tokens)
    assert rel_err(got, want) <= TOL


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("edit,what", [
    (lambda c: {k: v for k, v in c.items() if k != "r"},
     r"has no 'r', a positive integer \(the LoRA rank\).*Fix: add it"),
    (lambda c: {**c, "lora_alpha": None},
     r"lora_alpha=None \(NoneType\) is not a number > 0.*Fix"),
    (lambda c: {k: v for k, v in c.items() if k != "lora_alpha"}, r"has no 'lora_alpha'"),
    (lambda c: {**c, "r": "4"}, r"r='4' \(str\) is not a positive integer"),
    (lambda c: {**c, "r": 4.5}, r"r=4.5 \(float\) is not a positive integer"),
    (lambda c: {**c, "r": True}, r"r=True \(bool\) is not a positive integer"),
    (lambda c: {**c, "r": 0}, r"r=0 \(int\) is not a positive integer"),
    (lambda c: {**c, "rank_pattern": {"q_proj": "2"}},
     r"rank_pattern=\{'q_proj': '2'\} is not an object mapping module names to positive"),
    (lambda c: {**c, "alpha_pattern": [1]}, r"alpha_pattern=\[1\] is not an object"),
    (lambda c: {**c, "target_modules": 3}, r"target_modules=3 is neither a list"),
    (lambda c: {**c, "layers_to_transform": "0"}, r"layers_to_transform='0' is neither"),
    (lambda c: [c], r"holds a JSON list, not an object of LoraConfig fields.*Fix"),
])
def test_malformed_adapter_config(exported, edit, what):
    folder, variables, _, _ = exported
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as fh:
        cfg = edit(json.load(fh))
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    with pytest.raises(ValueError, match=re.escape(path) + ": " + what):
        lj.import_peft(folder, variables, key_map="llama")


def test_adapter_config_not_json(exported):
    folder, variables, _, _ = exported
    path = os.path.join(folder, "adapter_config.json")
    with open(path, "w") as fh:
        fh.write('{"r": 4,')
    with pytest.raises(ValueError, match=re.escape(path) + r": not valid JSON \(Expecting "
                                         r"property name.*Fix: re-export"):
        lj.import_peft(folder, variables, key_map="llama")


def test_targeted_module_without_factors(exported):
    folder, variables, _, _ = exported
    _rewrite_tensors(folder, lambda t: {k: v for k, v in t.items()
                                        if "layers.1.self_attn.v_proj" not in k})
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: "
                                         r"model.layers.1.self_attn.v_proj: adapter_config.json's "
                                         r"target_modules select this module, but the file has "
                                         r"neither its lora_A nor its lora_B"):
        lj.import_peft(folder, variables, key_map="llama")
    # not selected any more: imported without it
    with open(os.path.join(folder, "adapter_config.json")) as fh:
        cfg = json.load(fh)
    _edit_config(folder, target_modules=[m for m in cfg["target_modules"]
                                         if m != "model.layers.1.self_attn.v_proj"])
    _, config = lj.import_peft(folder, variables, key_map="llama")
    assert len(lj.describe(variables, config).specs) == 7
