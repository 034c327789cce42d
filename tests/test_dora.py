"""DoRA: the Gram-form column norm against float64 dense norms, init (model
unchanged), merge/unmerge formulas, the magnitude in the optimizer and in
checkpoints, `apply` (Dense, multi-axis kernels, stacked layers, conv,
embeddings, quantized base) against `merge` with gradients, and PEFT's
``lora_magnitude_vector`` both ways against PyTorch PEFT 0.21.2 (logits and
gradients)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax._variants import dora as _dora
from tests._asserts import assert_close, rel_err
from tests.conftest import SEED


def _gen(k=0):
    return np.random.default_rng(SEED + k)


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _dense_reference(w, a, b, s, m):
    """m * (W + s a b) / ||W + s a b|| in float64, (*S, in, out) matrices."""
    v = _f64(w) + s * np.matmul(_f64(a), _f64(b))
    return _f64(m)[..., None, :] * v / np.linalg.norm(v, axis=-2, keepdims=True)


def _dora_adapters(params, config, seed, b_std=0.1, m_noise=0.2):
    """lj.init's DoRA adapters with non-zero B and a perturbed magnitude."""
    gen = _gen(seed)
    ad = lj.init(params, config, key=jax.random.key(SEED + seed))

    def perturb(node):
        if not lj.is_lora(node):
            return node
        b = jnp.asarray(b_std * gen.standard_normal(node.b.shape), node.b.dtype)
        m = node.m * jnp.asarray(1 + m_noise * gen.standard_normal(node.m.shape), node.m.dtype)
        return node._replace(b=b, m=m)
    return jax.tree.map(perturb, ad, is_leaf=lj.is_lora)


# ----------------------------------------------------------------------------- the math


@pytest.mark.parametrize("lead", [(), (3,)])
def test_column_norm_matches_float64(lead):
    gen = _gen(1)
    w = gen.standard_normal((*lead, 40, 24)).astype(np.float32)
    a = gen.standard_normal((*lead, 40, 5)).astype(np.float32) / 6
    b = gen.standard_normal((*lead, 5, 24)).astype(np.float32)
    got = _dora.column_norm(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), 1.7)
    want = np.linalg.norm(_f64(w) + 1.7 * _f64(a) @ _f64(b), axis=-2)
    assert got.shape == (*lead, 24)
    assert rel_err(got, want) < 1e-6


def test_init_magnitude_and_model_unchanged():
    gen = _gen(2)
    params = {"d": {"kernel": jnp.asarray(gen.standard_normal((32, 16)), jnp.float32)},
              "s": {"kernel": jnp.asarray(gen.standard_normal((2, 8, 4, 5)), jnp.float32)}}
    cfg = lj.LoraConfig(rank=2, targets=r".*/kernel", use_dora=True,
                        layouts={r"s/kernel": lj.Layout(1, 1, 2)})
    ad = lj.init(params, cfg, key=jax.random.key(0))
    np.testing.assert_allclose(_f64(ad["d"]["kernel"].m),
                               np.linalg.norm(_f64(params["d"]["kernel"]), axis=0), rtol=1e-6)
    assert ad["s"]["kernel"].m.shape == (2, 20)
    merged = lj.merge(params, ad, cfg)
    for path in ("d", "s"):
        assert rel_err(merged[path]["kernel"], params[path]["kernel"]) < 1e-6


def test_merge_formula_and_unmerge_roundtrip():
    gen = _gen(3)
    params = {"w": jnp.asarray(gen.standard_normal((3, 24, 20)), jnp.float32)}
    cfg = lj.LoraConfig(rank=4, alpha=8, targets="w", use_dora=True,
                        layouts={"w": lj.Layout(1, 1, 1)})
    ad = _dora_adapters(params, cfg, 3)
    n = ad["w"]
    got = lj.merge(params, ad, cfg)["w"]
    assert rel_err(got, _dense_reference(params["w"], n.a, n.b, 2.0, n.m)) < 1e-6
    # the merged weight's column norms are m
    np.testing.assert_allclose(np.linalg.norm(_f64(got), axis=-2), _f64(n.m), rtol=1e-5)
    norms = lj.dora_norms(params, ad, cfg)
    back = lj.unmerge(lj.merge(params, ad, cfg), ad, cfg, norms=norms)
    assert rel_err(back["w"], params["w"]) < 1e-5
    with pytest.raises(ValueError, match=r"DoRA adapters can't be unmerged.*dora_norms"):
        lj.unmerge({"w": got}, ad, cfg)
    with pytest.raises(ValueError, match=r"norms= does not mirror params"):
        lj.unmerge({"w": got}, ad, cfg, norms={"v": norms["w"]})
    plain = lj.LoraConfig(rank=4, targets="w", layouts={"w": lj.Layout(1, 1, 1)})
    with pytest.raises(ValueError, match=r"lj\.dora_norms: config\.use_dora is False"):
        lj.dora_norms(params, ad, plain)


def test_magnitude_checked_against_config():
    params = {"w": jnp.ones((8, 6))}
    dora = lj.LoraConfig(rank=2, targets="w", use_dora=True)
    plain = lj.LoraConfig(rank=2, targets="w")
    ad = lj.init(params, dora, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"w: the adapter has a DoRA magnitude m but the "
                                         r"config has use_dora=False"):
        lj.merge(params, ad, plain)
    with pytest.raises(ValueError, match=r"w: LoraConfig\(use_dora=True\) but the adapter has "
                                         r"no magnitude"):
        lj.merge(params, {"w": ad["w"]._replace(m=None)}, dora)
    with pytest.raises(ValueError, match=r"w: DoRA magnitude m has shape \(8,\), expected \(6,\)"):
        lj.merge(params, {"w": ad["w"]._replace(m=jnp.ones(8))}, dora)
    with pytest.raises(ValueError, match=r"LoraConfig.use_dora: 1 is invalid"):
        lj.LoraConfig(targets="w", use_dora=1)
    assert "m=" not in repr(lj.init(params, plain, key=jax.random.key(0))["w"])


@pytest.mark.standard_promotion
def test_magnitude_is_trained_and_checkpointed(tmp_path):
    gen = _gen(4)
    params = {"w": jnp.asarray(gen.standard_normal((16, 8)), jnp.float32)}
    cfg = lj.LoraConfig(rank=2, targets="w", use_dora=True)
    ad = lj.init(params, cfg, key=jax.random.key(0))
    tx = lj.optimizer(optax.adam(1e-2))
    state = tx.init(ad)
    assert lj.trainable_labels(ad)["w"] == lj.LoraWeights("train", "train", "frozen", "train")
    assert lj.summary(params, ad, opt_state=state).optimizer_state == 2 * (32 + 16 + 8)
    x = jnp.asarray(gen.standard_normal((4, 16)), jnp.float32)
    loss = lambda p, ad, x: jnp.mean((x @ lj.merge(p, ad, cfg)["w"] - 1.0) ** 2)  # noqa: E731
    step = lj.make_train_step(loss, tx, donate=False)
    new, state, _ = step(params, ad, state, x)
    assert not np.allclose(np.asarray(new["w"].m), np.asarray(ad["w"].m))
    assert float(new["w"].scale) == float(ad["w"].scale)
    lj.save(tmp_path / "ck", new, cfg, params=params)
    back, cfg2 = lj.restore(tmp_path / "ck", params=params)
    assert cfg2.use_dora
    np.testing.assert_array_equal(np.asarray(back["w"].m), np.asarray(new["w"].m))


# ----------------------------------------------------------------------------- apply


def _apply_vs_merge(fn, cfg, params, ad, *args, jit=True, rtol=1e-5):
    """apply == merge (values) and their gradients wrt a, b and m agree
    (gradients always under jit: eager op-by-op tracing is slow)."""
    f = lj.apply(fn, cfg, strict=True)
    f = jax.jit(f) if jit else f
    got = f(params, ad, *args)
    want = jax.jit(lambda p, ad: fn(lj.merge(p, ad, cfg), *args))(params, ad)
    assert_close(got, want, rtol=rtol, what="output")

    def loss_apply(ad):
        return jnp.sum(jnp.sin(lj.apply(fn, cfg)(params, ad, *args)))

    def loss_merge(ad):
        return jnp.sum(jnp.sin(fn(lj.merge(params, ad, cfg), *args)))
    g1 = jax.jit(jax.grad(loss_apply))(ad)
    g2 = jax.jit(jax.grad(loss_merge))(ad)
    for (p, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(g1)[0],
                              jax.tree_util.tree_flatten_with_path(g2)[0]):
        if lj.path_str(p).endswith("scale"):
            continue
        assert_close(x, y, rtol=20 * rtol, what="grad " + lj.path_str(p))
    return got


class _Mix(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(50, 16, name="embed")(ids)
        h = nn.DenseGeneral((4, 8), name="heads")(h)          # (16) -> (4, 8)
        h = nn.DenseGeneral(16, axis=(-2, -1), name="out")(jnp.tanh(h))
        return nn.Dense(12, name="fc")(jax.nn.relu(h))


@pytest.mark.slow
def test_apply_matches_merge_dense_generalized_embedding(maybe_jit):
    gen = _gen(5)
    ids = jnp.asarray(gen.integers(0, 50, (3, 7)))
    variables = _Mix().init(jax.random.key(SEED), ids)
    cfg = lj.LoraConfig(rank=3, alpha=6, targets=r".*/(kernel|embedding)", use_dora=True,
                        layouts={r".*/heads/kernel": lj.Layout(0, 1, 2),
                                 r".*/out/kernel": lj.Layout(0, 2, 1)})
    ad = _dora_adapters(variables, cfg, 5)
    _apply_vs_merge(_Mix().apply, cfg, variables, ad, ids, jit=maybe_jit is jax.jit)
    e = lj.explain(_Mix().apply, cfg, variables, ad, ids)
    assert e.n_fallbacks == 0
    assert e.rules["params/embed/embedding"] == {"lowrank_gather": 1}


@pytest.mark.slow
def test_apply_matches_merge_scan_and_conv():
    from examples import gpt
    gen = _gen(6)
    c = gpt.GPTConfig(vocab=31, d_model=16, n_heads=2, n_layers=2, d_mlp=32, max_len=6,
                      scan=True)
    model, variables = gpt.init_linen(c, seed=SEED % 1000)
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=gpt.TARGETS, use_dora=True,
                        layouts={r"params/blocks/.*": lj.Layout(1, 1, 1)})
    ad = _dora_adapters(variables, cfg, 6)
    tokens = jnp.asarray(gen.integers(0, 31, (2, 6)))
    _apply_vs_merge(model.apply, cfg, variables, ad, tokens, rtol=2e-5)

    conv = nn.Sequential([nn.Conv(6, (3, 3)), nn.relu, nn.Conv(5, (3, 3), strides=2)])
    x = jnp.asarray(gen.standard_normal((2, 9, 9, 4)), jnp.float32)
    cv = conv.init(jax.random.key(1), x)
    ccfg = lj.LoraConfig(rank=2, alpha=4, targets=r".*/kernel", use_dora=True)
    _apply_vs_merge(conv.apply, ccfg, cv, _dora_adapters(cv, ccfg, 7), x)


@pytest.mark.slow
def test_apply_on_quantized_base():
    gen = _gen(8)
    params = {"l0": {"kernel": jnp.asarray(gen.standard_normal((32, 48)), jnp.float32)},
              "l1": {"kernel": jnp.asarray(gen.standard_normal((48, 16)), jnp.float32)}}
    q = lj.quantize(params)
    cfg = lj.LoraConfig(rank=4, targets=r".*/kernel", use_dora=True)
    ad = _dora_adapters(q, cfg, 8)
    fn = lambda p, x: jnp.tanh(x @ p["l0"]["kernel"]) @ p["l1"]["kernel"]  # noqa: E731
    x = jnp.asarray(gen.standard_normal((5, 32)), jnp.float32)
    got = jax.jit(lj.apply(fn, cfg, strict=True))(q, ad, x)
    assert_close(got, fn(lj.merge(lj.dequantize(q), ad, cfg), x), rtol=1e-5)


# ----------------------------------------------------------------------------- PEFT


V, D, H, O = 40, 16, 24, 10
KEY_MAP = lj.interop.KeyMap((
    (r"params/embed/embedding", "embed.weight", "embedding"),
    (r"params/(fc1|fc2)/kernel", r"\1.weight", "linear"),
    (r"params/(fc1|fc2)/bias", r"\1.bias", "vector"),
))


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(V, D, name="embed")(ids)
        h = jnp.tanh(nn.Dense(H, name="fc1")(h))
        return nn.Dense(O, name="fc2")(h)


def _torch_tiny(variables):
    torch = pytest.importorskip("torch")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(V, D)
            self.fc1 = torch.nn.Linear(D, H)
            self.fc2 = torch.nn.Linear(H, O)

        def forward(self, ids):
            return self.fc2(torch.tanh(self.fc1(self.embed(ids))))

    net = Tiny()
    sd = lj.interop.to_hf_state_dict(variables, KEY_MAP)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    return net.eval()


@pytest.fixture(scope="module")
def tiny():
    gen = _gen(9)
    ids = gen.integers(0, V, (3, 6))
    variables = _Tiny().init(jax.random.key(SEED), jnp.asarray(ids))
    return variables, ids


def _torch_out(net, ids):
    import torch
    with torch.no_grad():
        return net(torch.from_numpy(ids.astype(np.int64))).numpy()


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_jax_dora_adapter_loads_in_peft(tmp_path, tiny):
    peft = pytest.importorskip("peft")
    variables, ids = tiny
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*/(fc1|fc2)/kernel|.*/embedding",
                        use_dora=True)
    ad = _dora_adapters(variables, cfg, 10)
    lj.export_peft(tmp_path, ad, cfg, key_map=KEY_MAP, params=variables)
    pcfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert pcfg["use_dora"] is True
    pm = peft.PeftModel.from_pretrained(_torch_tiny(variables), str(tmp_path)).eval()
    want = _torch_out(pm, ids)
    assert rel_err(want, _torch_out(_torch_tiny(variables), ids)) > 1e-2
    got_merge = _Tiny().apply(lj.merge(variables, ad, cfg), jnp.asarray(ids))
    got_apply = jax.jit(lj.apply(_Tiny().apply, cfg))(variables, ad, jnp.asarray(ids))
    assert rel_err(got_merge, want) <= 1e-5
    assert rel_err(got_apply, want) <= 1e-5


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_dora_adapter_imports_logits_and_grads(tmp_path, tiny):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    variables, ids = tiny
    torch.manual_seed(SEED)
    pcfg = peft.LoraConfig(r=4, lora_alpha=6, use_dora=True, init_lora_weights=False,
                           target_modules=["embed", "fc1", "fc2"])
    pm = peft.get_peft_model(_torch_tiny(variables), pcfg)
    with torch.no_grad():   # a trained magnitude, not the initial norms
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    pm.eval()
    want = _torch_out(pm, ids)
    pm.save_pretrained(str(tmp_path))
    ad, cfg = lj.import_peft(tmp_path, variables, key_map=KEY_MAP)
    assert cfg.use_dora and ad["params"]["fc1"]["kernel"].m.shape == (H,)
    assert ad["params"]["embed"]["embedding"].m.shape == (D,)
    got = jax.jit(lj.apply(_Tiny().apply, cfg))(variables, ad, jnp.asarray(ids))
    assert rel_err(got, want) <= 1e-5
    assert rel_err(_Tiny().apply(lj.merge(variables, ad, cfg), jnp.asarray(ids)), want) <= 1e-5

    # gradients of the same loss: PEFT (norm detached) vs lj.apply
    out = pm(torch.from_numpy(ids.astype(np.int64)))
    (out.sin().sum()).backward()
    grads = dict(pm.named_parameters())
    g = jax.jit(jax.grad(lambda ad: jnp.sum(jnp.sin(lj.apply(_Tiny().apply, cfg)(
        variables, ad, jnp.asarray(ids))))))(ad)
    for mod, key_a, key_b in (("fc1", "lora_A", "lora_B"), ("fc2", "lora_A", "lora_B"),
                              ("embed", "lora_embedding_A", "lora_embedding_B")):
        node = g["params"][mod]["kernel" if mod != "embed" else "embedding"]
        prefix = f"base_model.model.{mod}"
        suffix = ".default.weight" if mod != "embed" else ".default"
        ga = grads[f"{prefix}.{key_a}{suffix}"].grad.numpy()
        gb = grads[f"{prefix}.{key_b}{suffix}"].grad.numpy()
        gm = grads[f"{prefix}.lora_magnitude_vector.default.weight"].grad.numpy()
        assert rel_err(node.a, ga.T) < 1e-4, mod
        assert rel_err(node.b, gb.T) < 1e-4, mod
        assert rel_err(node.m, gm) < 1e-4, mod
