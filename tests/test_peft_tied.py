"""Tied embeddings through PEFT, proven against transformers' LlamaForCausalLM with
``tie_word_embeddings=True``: the JAX model uses one embedding as the lookup and
as the head (``h @ E.T``). An adapter on it exports with ``ensure_weight_tying``
(and the head's copies), so PEFT's forward equals lj.apply's; a PEFT adapter
that keeps the tie imports exactly; one that broke it is refused."""

import dataclasses
import json
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from examples import llama
from tests._asserts import assert_trees_close, random_adapters, rel_err
from tests.conftest import SEED

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.torch,
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]

TIED = llama.LlamaConfig(vocab=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=128,
                         tied=True)
EMBED = "params/model/embed_tokens/embedding"
TOL = 1e-5


@pytest.fixture(scope="module")
def tied_base():
    gen = np.random.default_rng(SEED)
    model = llama.Llama(TIED)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))

    def draw(keypath, s):
        x = gen.standard_normal(s.shape).astype(np.float32)
        norm = lj.path_str(keypath).endswith("/weight")
        return jnp.asarray(1.0 + 0.1 * x if norm else 0.05 * x, s.dtype)
    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    tokens = gen.integers(0, TIED.vocab, size=(2, 12)).astype(np.int32)
    assert "lm_head" not in variables["params"]
    return model, variables, tokens


def _torch_tied(variables):
    hf = transformers.LlamaForCausalLM(llama.hf_config(TIED))
    sd = {k: torch.from_numpy(np.array(v)) for k, v in llama.to_hf_state_dict(variables).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert hf.lm_head.weight is hf.model.embed_tokens.weight   # one tensor, two uses
    return hf.eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


def _jax(model, variables, adapters, config, tokens):
    return {"apply": np.asarray(lj.apply(model.apply, config)(variables, adapters, tokens)),
            "merge": np.asarray(model.apply(lj.merge(variables, adapters, config), tokens))}


def _load_in_peft(folder, variables):
    """PeftModel.from_pretrained, failing on PEFT's missing-keys warning."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(_torch_tied(variables), str(folder)).eval()
    missing = [str(w.message) for w in seen if "missing adapter keys" in str(w.message)]
    assert not missing, missing
    return pm


def _read_tensors(folder):
    from safetensors import safe_open
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(folder, fn):
    """Edits the tensors (dropping lora_jax's sha256 metadata, as a hand edit would)."""
    from safetensors.numpy import save_file
    save_file(fn(_read_tensors(folder)), os.path.join(folder, "adapter_model.safetensors"),
              metadata={"format": "pt"})


def _config(folder):
    with open(os.path.join(folder, "adapter_config.json")) as fh:
        return json.load(fh)


def _edit_config(folder, **changes):
    cfg = _config(folder)
    cfg.update(changes)
    with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
        json.dump(cfg, fh)


def test_tied_base_models_agree(tied_base):
    model, variables, tokens = tied_base
    want = _logits(_torch_tied(variables), tokens)
    assert rel_err(np.asarray(model.apply(variables, tokens)), want) <= TOL


def test_configure_finds_the_tie(tied_base):
    model, variables, tokens = tied_base
    cfg = lj.configure(lj.LoraConfig(rank=4, targets=(llama.ATTENTION, EMBED)), model.apply,
                       variables, tokens)
    assert cfg.tied == (EMBED,)


# ----------------------------------------------------------------------------- export


EXPORT_CASES = {
    # LoRA on the tied embedding, the tie read from the program by lj.configure
    "lora": dict(config=lj.LoraConfig(rank=4, alpha=8, targets=(llama.ATTENTION, EMBED)),
                 configure=True),
    # the embedding's own rank and alpha: PEFT's tied head needs them in its patterns
    "lora+patterns": dict(config=lj.LoraConfig(rank=4, alpha=8, targets=(llama.ATTENTION, EMBED),
                                               rank_pattern={EMBED: 2}, alpha_pattern={EMBED: 6},
                                               use_rslora=True), configure=True),
    # a fully-trained embedding (lj.configure reads targets only): the tie comes
    # from params, which hold the embedding and no lm_head
    "trained": dict(config=lj.LoraConfig(rank=4, alpha=8, targets=llama.ATTENTION, train=EMBED),
                    configure=False),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_tied_embedding_exports_for_peft(tmp_path, tied_base, case):
    model, variables, tokens = tied_base
    config = EXPORT_CASES[case]["config"]
    if EXPORT_CASES[case]["configure"]:
        config = lj.configure(config, model.apply, variables, tokens)
        assert config.tied == (EMBED,)
    ad = random_adapters(variables, config, seed=SEED + 11)
    lj.export_peft(tmp_path, ad, config, key_map="llama", params=variables,
                   task_type="CAUSAL_LM")
    pcfg = _config(tmp_path)
    assert pcfg["ensure_weight_tying"] is True
    assert "lm_head" not in pcfg["target_modules"]
    t = _read_tensors(tmp_path)
    if case == "trained":
        assert pcfg["modules_to_save"] == ["model.embed_tokens"]
        assert np.array_equal(t["base_model.model.lm_head.weight"],
                              t["base_model.model.model.embed_tokens.weight"])
    else:
        emb = "base_model.model.model.embed_tokens."
        assert np.array_equal(t["base_model.model.lm_head.lora_A.weight"],
                              t[emb + "lora_embedding_B"].T)
        assert np.array_equal(t["base_model.model.lm_head.lora_B.weight"],
                              t[emb + "lora_embedding_A"].T)
    pm = _load_in_peft(tmp_path, variables)
    want = _logits(pm, tokens)
    assert rel_err(want, _logits(_torch_tied(variables), tokens)) > 1e-3
    if case != "trained":   # PEFT's head shares the embedding's factors, at the same scale
        head, embed = pm.base_model.model.lm_head, pm.base_model.model.model.embed_tokens
        assert head.lora_A["default"].weight.data_ptr() == \
            embed.lora_embedding_B["default"].data_ptr()
        assert head.scaling["default"] == pytest.approx(config.scale_for(EMBED), rel=1e-6)
    for how, got in _jax(model, variables, ad, config, tokens).items():
        assert rel_err(got, want) <= TOL, (how, rel_err(got, want))
    # and back: the same adapters, the tie recorded
    back, cfg2 = lj.import_peft(tmp_path, variables, key_map="llama")
    assert_trees_close(back, ad, exact=True)
    assert cfg2.tied == (EMBED,)


def test_what_ensure_weight_tying_changes(tmp_path, tied_base):
    """The same file with ensure_weight_tying=false: PEFT adapts the lookup only, a
    different model from lj.apply's (what export_peft wrote before the tie was kept)."""
    model, variables, tokens = tied_base
    config = lj.LoraConfig(rank=4, alpha=8, targets=EMBED, tied=EMBED)
    ad = random_adapters(variables, config, seed=SEED + 12)
    lj.export_peft(tmp_path, ad, config, key_map="llama")   # no params: tie from config
    got = _jax(model, variables, ad, config, tokens)["apply"]
    assert rel_err(got, _logits(_load_in_peft(tmp_path, variables), tokens)) <= TOL
    _edit_config(tmp_path, ensure_weight_tying=False)
    _rewrite(tmp_path, lambda t: {k: v for k, v in t.items() if "lm_head" not in k})
    untied = peft.PeftModel.from_pretrained(_torch_tied(variables), str(tmp_path)).eval()
    assert rel_err(got, _logits(untied, tokens)) > 1e-2


def test_tied_keyword(tmp_path, tied_base):
    _, variables, _ = tied_base
    config = lj.LoraConfig(rank=4, alpha=8, targets=EMBED)
    ad = random_adapters(variables, config, seed=SEED + 13)
    lj.export_peft(tmp_path / "a", ad, config, key_map="llama", tied=EMBED)
    lj.export_peft(tmp_path / "b", ad, config, key_map="llama", params=variables)
    for d in ("a", "b"):
        assert _config(tmp_path / d)["ensure_weight_tying"]
        assert "base_model.model.lm_head.lora_A.weight" in _read_tensors(tmp_path / d)
    # without params, config.tied or tied=, nothing says the head is tied
    lj.export_peft(tmp_path / "c", ad, config, key_map="llama")
    assert not _config(tmp_path / "c")["ensure_weight_tying"]


def test_export_tie_errors(tmp_path, tied_base):
    _, variables, _ = tied_base
    config = lj.LoraConfig(rank=4, alpha=8, targets=EMBED, tied=EMBED)
    ad = random_adapters(variables, config, seed=SEED + 14)
    no_ties = lj.interop.KeyMap(lj.interop.KEY_MAPS["llama"].rules)
    with pytest.raises(ValueError, match=r"embed_tokens/embedding: .*doesn't say which torch "
                                         r"parameter that head is.*Fix: .*ties="):
        lj.export_peft(tmp_path / "x", ad, config, key_map=no_ties)
    untied = {"params": {**variables["params"], "lm_head": {"kernel": jnp.zeros((64, 96))}}}
    with pytest.raises(ValueError, match=r"params hold a separate head for 'lm_head.weight' "
                                         r"\(params/lm_head/kernel\).*Fix"):
        lj.export_peft(tmp_path / "x", random_adapters(untied, config, seed=SEED), config,
                       key_map="llama", params=untied)
    with pytest.raises(ValueError, match=r"tied=\['params/nope'\]: no such path.*Fix"):
        lj.export_peft(tmp_path / "x", ad, config, key_map="llama", tied=("params/nope",))
    with pytest.raises(TypeError, match=r"tied=3 is not a tuple.*Fix"):
        lj.export_peft(tmp_path / "x", ad, config, key_map="llama", tied=3)
    odd = lj.interop.KeyMap(((r"params/model/embed_tokens/embedding",
                              "model.embed_tokens.weight", "vector"),),
                            ties={"lm_head.weight": "model.embed_tokens.weight"})
    with pytest.raises(ValueError, match=r"of kind 'vector'; PEFT ties one .*embedding"):
        lj.export_peft(tmp_path / "x", ad, config, key_map=odd)
    dora = lj.LoraConfig(rank=4, alpha=8, targets=EMBED, tied=EMBED, use_dora=True)
    dad = lj.init(variables, dora, key=jax.random.key(SEED))
    with pytest.raises(lj.interop.UnsupportedPeftFeature, match=r"DoRA on an embedding tied"):
        lj.export_peft(tmp_path / "x", dad, dora, key_map="llama")
    assert not os.path.exists(tmp_path / "x" / "adapter_config.json")


# ----------------------------------------------------------------------------- import


def _peft_adapter(variables, folder, seed, **cfg):
    torch.manual_seed(seed)
    pm = peft.get_peft_model(_torch_tied(variables), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, **cfg)).eval()
    if cfg.get("modules_to_save"):
        with torch.no_grad():   # the trained copy differs from the base
            pm.base_model.model.model.embed_tokens.modules_to_save["default"].weight.mul_(1.5)
    pm.save_pretrained(str(folder))
    return pm


@pytest.mark.parametrize("case", ["lora", "modules_to_save"])
def test_tied_peft_adapter_imports(tmp_path, tied_base, case):
    model, variables, tokens = tied_base
    extra = (dict(target_modules=["q_proj", "v_proj", "embed_tokens"]) if case == "lora" else
             dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"]))
    pm = _peft_adapter(variables, tmp_path, SEED + 15, ensure_weight_tying=True, **extra)
    want = _logits(pm, tokens)
    keys = _read_tensors(tmp_path)
    assert any(k.startswith("base_model.model.lm_head.") for k in keys)   # PEFT's copies
    ad, config = lj.import_peft(tmp_path, variables, key_map="llama")
    assert config.tied == (EMBED,)
    assert (EMBED in config.train) == (case == "modules_to_save")
    for how, got in _jax(model, variables, ad, config, tokens).items():
        assert rel_err(got, want) <= TOL, (how, rel_err(got, want))


UNTIED_CASES = {
    "lora": (dict(target_modules=["q_proj", "embed_tokens"]),
             r"changes the input embedding model.embed_tokens \(LoRA\) with "
             r"ensure_weight_tying=false, so PEFT changed the lookup only: the output head "
             r"\(lm_head\) kept the base embedding"),
    "modules_to_save": (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
                        r"model.embed_tokens \(fully trained, modules_to_save\) with "
                        r"ensure_weight_tying=false"),
    "both, separately": (dict(target_modules=["q_proj", "embed_tokens", "lm_head"]),
                         r"model.embed_tokens \(LoRA\) with ensure_weight_tying=false, so the "
                         r"output head \(lm_head\) got an adapter of its own"),
    "head only": (dict(target_modules=["q_proj", "lm_head"]),
                  r"changes the output head lm_head \(lora_A.weight, lora_B.weight\) "
                  r"but not the input embedding model.embed_tokens"),
}


@pytest.mark.parametrize("case", list(UNTIED_CASES))
def test_untied_peft_adapter_refused(tmp_path, tied_base, case):
    _, variables, _ = tied_base
    extra, what = UNTIED_CASES[case]
    _peft_adapter(variables, tmp_path, SEED + 16, **extra)
    with pytest.raises(lj.interop.UnsupportedPeftFeature,
                       match=r"adapter_model.safetensors: .*" + what + r".*params hold one "
                             r"embedding \(params/model/embed_tokens/embedding\) for both uses"
                             r".*Fix: .*ensure_weight_tying=True"):
        lj.import_peft(tmp_path, variables, key_map="llama")


@pytest.fixture
def tied_export(tmp_path, tied_base):
    _, variables, _ = tied_base
    config = lj.LoraConfig(rank=4, alpha=8, targets=(llama.ATTENTION, EMBED), tied=EMBED)
    ad = random_adapters(variables, config, seed=SEED + 17)
    folder = lj.export_peft(tmp_path / "ad", ad, config, key_map="llama")
    return folder, variables


def test_head_entries_that_differ_refused(tied_export):
    folder, variables = tied_export
    key = "base_model.model.lm_head.lora_A.weight"
    _rewrite(folder, lambda t: {**t, key: t[key] + 0.5})
    with pytest.raises(lj.interop.UnsupportedPeftFeature,
                       match=re.escape(key) + r" is not a copy of model.embed_tokens's "
                             r"lora_embedding_B transposed \(max \|difference\| 0.5\).*Fix"):
        lj.import_peft(folder, variables, key_map="llama")


def test_head_scaled_differently_refused(tied_export):
    folder, variables = tied_export
    _edit_config(folder, alpha_pattern={"lm_head": 2})
    with pytest.raises(lj.interop.UnsupportedPeftFeature,
                       match=r"scales the tied head lm_head by 0.5 and the embedding "
                             r"model.embed_tokens by 2"):
        lj.import_peft(folder, variables, key_map="llama")


def test_tied_trained_head_copy_must_match(tmp_path, tied_base):
    _, variables, _ = tied_base
    config = lj.LoraConfig(rank=4, alpha=8, targets=llama.ATTENTION, train=EMBED)
    ad = random_adapters(variables, config, seed=SEED + 18)
    lj.export_peft(tmp_path, ad, config, key_map="llama", params=variables)
    _rewrite(tmp_path, lambda t: {**t, "base_model.model.lm_head.weight":
                                  t["base_model.model.lm_head.weight"][:, :8]})
    with pytest.raises(lj.interop.UnsupportedPeftFeature,
                       match=r"lm_head.weight is not a copy of the trained "
                             r"model.embed_tokens.weight \(shape \(96, 8\) vs \(96, 64\)\)"):
        lj.import_peft(tmp_path, variables, key_map="llama")


def test_tied_dora_import_refused(tied_export):
    folder, variables = tied_export
    _edit_config(folder, use_dora=True)
    _rewrite(folder, lambda t: {**t, "base_model.model.model.embed_tokens.lora_magnitude_vector":
                                np.ones(64, np.float32)})
    with pytest.raises(lj.interop.UnsupportedPeftFeature, match=r"DoRA on model.embed_tokens"):
        lj.import_peft(folder, variables, key_map="llama")


@pytest.mark.slow
def test_tied_file_into_untied_model_refused(tied_export, tied_base):
    folder, variables = tied_export
    model, _, tokens = tied_base
    ref_ad, ref_cfg = lj.import_peft(folder, variables, key_map="llama")
    ref = np.asarray(model.apply(lj.merge(variables, ref_ad, ref_cfg), tokens))
    untied = {"params": {**variables["params"],
                         "lm_head": {"kernel": variables["params"]["model"]["embed_tokens"]
                                     ["embedding"].T}}}
    with pytest.raises(lj.interop.UnsupportedPeftFeature,
                       match=r"saved from a model tying lm_head to model.embed_tokens.*separate "
                             r"head \(params/lm_head/kernel\).*Fix: .*\"ensure_weight_tying\": "
                             r"false"):
        lj.import_peft(folder, untied, key_map="llama")
    # the way out the message gives: two separate adapters, here equal to the tied model's
    _edit_config(folder, ensure_weight_tying=False)
    ad, config = lj.import_peft(folder, untied, key_map="llama")
    assert config.tied == () and "params/lm_head/kernel" in lj.describe(untied, config).specs
    untied_model = llama.Llama(dataclasses.replace(TIED, tied=False))
    got = np.asarray(untied_model.apply(lj.merge(untied, ad, config), tokens))
    assert rel_err(got, ref) <= TOL


@pytest.mark.slow
def test_untied_model_with_ensure_weight_tying(tmp_path, tied_base):
    """On an untied model PEFT ties nothing (ensure_weight_tying only warns): its separate
    embedding and head adapters import as such."""
    _, variables, tokens = tied_base
    untied_cfg = dataclasses.replace(TIED, tied=False)
    gen = np.random.default_rng(SEED + 19)
    untied = {"params": {**variables["params"], "lm_head": {"kernel": jnp.asarray(
        0.05 * gen.standard_normal((64, 96)), jnp.float32)}}}
    hf = transformers.LlamaForCausalLM(llama.hf_config(untied_cfg))
    hf.load_state_dict({k: torch.from_numpy(np.array(v))
                        for k, v in llama.to_hf_state_dict(untied).items()}, strict=True)
    torch.manual_seed(SEED + 19)
    pm = peft.get_peft_model(hf.eval(), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, ensure_weight_tying=True,
        target_modules=["q_proj", "embed_tokens", "lm_head"])).eval()
    want = _logits(pm, tokens)
    pm.save_pretrained(str(tmp_path))
    ad, config = lj.import_peft(tmp_path, untied, key_map="llama")
    assert config.tied == () and "params/lm_head/kernel" in lj.describe(untied, config).specs
    got = np.asarray(llama.Llama(untied_cfg).apply(lj.merge(untied, ad, config), tokens))
    assert rel_err(got, want) <= TOL


def test_import_tied_keyword(tied_export, tied_base):
    folder, variables = tied_export
    # a custom key map without ties: tied= declares it (no head name: its copies unplaced)
    no_ties = lj.interop.KeyMap(lj.interop.KEY_MAPS["llama"].rules)
    with pytest.raises(ValueError, match=r"keys don't map to any leaf.*lm_head.lora_A"):
        lj.import_peft(folder, variables, key_map=no_ties, tied=EMBED)
    _rewrite(folder, lambda t: {k: v for k, v in t.items() if "lm_head" not in k})
    ad, config = lj.import_peft(folder, variables, key_map=no_ties, tied=EMBED)
    assert config.tied == (EMBED,)
    _edit_config(folder, ensure_weight_tying=False)
    with pytest.raises(lj.interop.UnsupportedPeftFeature, match=r"ensure_weight_tying=false"):
        lj.import_peft(folder, variables, key_map=no_ties, tied=EMBED)
    ad, config = lj.import_peft(folder, variables, key_map=no_ties)   # undeclared: untied
    assert config.tied == ()
    with pytest.raises(ValueError, match=r"tied='params/nope' is not a path of params"):
        lj.import_peft(folder, variables, key_map="llama", tied="params/nope")
    untied = {"params": {**variables["params"], "lm_head": {"kernel": jnp.zeros((64, 96))}}}
    with pytest.raises(ValueError, match=r"tied= says this embedding is also the output head, "
                                         r"but params hold a separate head"):
        lj.import_peft(folder, untied, key_map="llama", tied=EMBED)


def test_key_map_ties_validated():
    with pytest.raises(TypeError, match=r"KeyMap.ties: .*Fix: pass e.g. ties="):
        lj.interop.KeyMap((), ties={"lm_head.weight": 3})
    km = lj.interop.KEY_MAPS["llama"].with_prefix("x.")
    assert km.tied_head("x.model.embed_tokens.weight") == "x.lm_head.weight"
    assert km.tied_head("model.embed_tokens.weight") is None
