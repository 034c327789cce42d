"""Inits and scaling: kaiming/gaussian leave the model unchanged; PiSSA and
OLoRA move scale * a @ b out of the base so base + adapter is the original
W (float64 references), with the factors PEFT computes; `subtract_init`
turns them into plain LoRAs on the original base; rsLoRA's alpha / sqrt(r)
end to end through `apply` and a PEFT export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from tests._asserts import assert_close, rel_err
from tests.conftest import SEED


def _gen(k=0):
    return np.random.default_rng(SEED + k)


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _params(gen, dtype=jnp.float32):
    return {"q": {"kernel": jnp.asarray(gen.standard_normal((48, 32)), dtype)},
            "mlp": {"kernel": jnp.asarray(gen.standard_normal((32, 80)), dtype),
                    "bias": jnp.asarray(gen.standard_normal(80), dtype)},
            # stacked layers (nn.scan), 3 x (24, 40)
            "layers": {"kernel": jnp.asarray(gen.standard_normal((3, 24, 40)), dtype)}}


CFG = dict(rank=4, alpha=8, targets=r".*/kernel", layouts={r"layers/kernel": lj.Layout(1, 1, 1)})


def _product(node, scale):
    return scale * np.matmul(_f64(node.a), _f64(node.b))


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_random_inits_leave_model_unchanged(init):
    params = _params(_gen(1))
    cfg = lj.LoraConfig(init=init, **CFG)
    merge = jax.jit(lambda p, ad: lj.merge(p, ad, cfg))
    same, ad = lj.init(params, cfg, key=jax.random.key(SEED), return_params=True)
    assert same is not params and all(x is y for x, y in zip(jax.tree.leaves(same),
                                                             jax.tree.leaves(params)))
    for path in ("q", "mlp", "layers"):
        node = ad[path]["kernel"]
        assert not np.any(np.asarray(node.b))
        assert np.any(np.asarray(node.a))
    merged = merge(params, ad)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if init == "gaussian":   # PEFT: std 1/r
        a = _f64(ad["mlp"]["kernel"].a)
        assert abs(a.std() - 1 / 4) < 0.05


def _svd_rank_r(w, r):
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return (u[..., :, :r] * s[..., None, :r]) @ vt[..., :r, :]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_reconstruct_w(init):
    params = _params(_gen(2))
    cfg = lj.LoraConfig(init=init, **CFG)
    res, ad = lj.init(params, cfg, return_params=True)
    specs = lj.describe(params, cfg).specs
    for path in ("q/kernel", "mlp/kernel", "layers/kernel"):
        node = ad[path.split("/")[0]]["kernel"]
        w = _f64(params[path.split("/")[0]]["kernel"])
        r_ = _f64(res[path.split("/")[0]]["kernel"])
        d = _product(node, specs[path].scale).reshape(w.shape)
        # base + adapter is the original weight (float32 SVD/QR, float64 check)
        assert rel_err(r_ + d, w) < 2e-6, (path, rel_err(r_ + d, w))
        if init == "pissa":
            # s a b is the best rank-r approximation (float32 SVD: the error grows
            # as S_r and S_r+1 get close), and a, b share sqrt(S/s)
            assert rel_err(d, _svd_rank_r(w, 4)) < 1e-4, path
            a, b = _f64(node.a), _f64(node.b)
            np.testing.assert_allclose(np.linalg.norm(a, axis=-2), np.linalg.norm(b, axis=-1),
                                       rtol=1e-4)
        else:
            # a = R_r^T from W^T = QR: b's rows are orthonormal
            b = _f64(node.b)
            gram = b @ np.swapaxes(b, -1, -2)
            np.testing.assert_allclose(gram, np.broadcast_to(np.eye(4), gram.shape), atol=1e-5)
    # untargeted leaves are untouched
    assert res["mlp"]["bias"] is params["mlp"]["bias"]


@pytest.mark.slow
def test_pissa_bfloat16_base_and_dora():
    params = _params(_gen(3), dtype=jnp.bfloat16)
    cfg = lj.LoraConfig(init="pissa", use_dora=True, **CFG)
    res, ad = lj.init(params, cfg, return_params=True)
    assert res["q"]["kernel"].dtype == jnp.bfloat16
    # m = ||W_res + s a b|| per output unit, i.e. the original column norms (bf16 rounding)
    w = _f64(params["q"]["kernel"])
    np.testing.assert_allclose(_f64(ad["q"]["kernel"].m), np.linalg.norm(w, axis=0), rtol=1e-2)
    merged = lj.merge(res, ad, cfg)
    assert rel_err(merged["q"]["kernel"], w) < 1e-2


@pytest.mark.torch
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_same_as_peft(init):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    gen = _gen(4)
    # flax (in, out), with a gap after the 3rd singular value: the top-3 subspace is then
    # well conditioned, so float32 SVDs (ours and torch's) agree for every draw; a
    # Gaussian matrix's close singular values made it differ by up to 1.8e-5.
    u, _ = np.linalg.qr(gen.standard_normal((20, 12)))
    v, _ = np.linalg.qr(gen.standard_normal((12, 12)))
    sv = np.concatenate([[6.0, 4.5, 3.0], np.linspace(1.0, 0.2, 9)])
    w = ((u * sv) @ v.T).astype(np.float32)
    lin = torch.nn.Sequential()
    lin.add_module("fc", torch.nn.Linear(20, 12, bias=False))
    with torch.no_grad():
        lin.fc.weight.copy_(torch.from_numpy(w.T.copy()))
    pm = peft.get_peft_model(lin, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["fc"],
                                                  init_lora_weights=init))
    fc = pm.base_model.model.fc
    peft_res = fc.base_layer.weight.detach().numpy().T
    peft_d = 2.0 * (fc.lora_B["default"].weight @ fc.lora_A["default"].weight).detach().numpy().T
    cfg = lj.LoraConfig(rank=3, alpha=6, targets="fc", init=init)
    res, ad = lj.init({"fc": jnp.asarray(w)}, cfg, return_params=True)
    # the products and residuals agree (factors may differ by SVD/QR signs)
    assert rel_err(2.0 * _f64(ad["fc"].a) @ _f64(ad["fc"].b), peft_d) < 1e-5
    assert rel_err(res["fc"], peft_res) < 1e-5


def test_subtract_init_is_plain_lora_on_original_base():
    gen = _gen(5)
    params = _params(gen)
    for rs in (False, True):
        cfg = lj.LoraConfig(init="pissa", use_rslora=rs, rank_pattern={r"q/kernel": 2},
                            alpha_pattern={r"mlp/kernel": 3.0}, **CFG)
        res, ad0 = lj.init(params, cfg, return_params=True)
        trained = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(gen.standard_normal(x.shape),
                                                                x.dtype), ad0)
        trained = jax.tree.map(lambda n, n0: n._replace(scale=n0.scale), trained, ad0,
                               is_leaf=lj.is_lora)
        plain, pcfg = lj.subtract_init(trained, ad0, cfg)
        assert pcfg.rank == 8 and pcfg.rank_for("q/kernel") == 4 and pcfg.init == "kaiming"
        for path in ("q/kernel", "mlp/kernel", "layers/kernel"):
            assert pcfg.scale_for(path) == pytest.approx(cfg.scale_for(path))
        want = lj.merge(res, trained, cfg)
        got = lj.merge(params, plain, pcfg)
        for path in ("q", "mlp", "layers"):
            assert rel_err(got[path]["kernel"], want[path]["kernel"]) < 1e-5, (rs, path)
    with pytest.raises(ValueError, match=r"layers/kernel: initial holds"):
        lj.subtract_init(trained, jax.tree.map(lambda n: n._replace(a=n.a[..., :1]), ad0,
                                               is_leaf=lj.is_lora), cfg)


@pytest.mark.slow
@pytest.mark.parametrize("rslora", [False, True])
def test_subtract_init_caps_the_doubled_rank_at_min_in_out(rslora):
    """rank 3 on a (32, 4) weight: 2 * 3 > 4, so that path is refactored exactly at
    rank 4 (its own rank/alpha pattern, the same scale); the (32, 16) one doubles."""
    gen = _gen(7)
    params = {"w": jnp.asarray(gen.standard_normal((32, 4)), jnp.float32),
              "v": jnp.asarray(gen.standard_normal((32, 16)), jnp.float32)}
    cfg = lj.LoraConfig(rank=3, alpha=8, targets="w|v", init="pissa", use_rslora=rslora)
    res, ad0 = lj.init(params, cfg, return_params=True)
    trained = jax.tree.map(lambda n: n._replace(
        a=n.a + 0.1 * jnp.asarray(gen.standard_normal(n.a.shape), jnp.float32),
        b=n.b + 0.1 * jnp.asarray(gen.standard_normal(n.b.shape), jnp.float32)), ad0,
        is_leaf=lj.is_lora)
    plain, pcfg = lj.subtract_init(trained, ad0, cfg)
    assert plain["w"].a.shape == (32, 4) and plain["v"].a.shape == (32, 6)
    assert (pcfg.rank_for("w"), pcfg.rank_for("v")) == (4, 6)
    for path in ("w", "v"):
        assert pcfg.scale_for(path) == pytest.approx(cfg.scale_for(path))
    got, want = lj.merge(params, plain, pcfg), lj.merge(res, trained, cfg)
    for path in ("w", "v"):
        assert rel_err(got[path], want[path]) < 1e-5, path


@pytest.mark.slow
def test_residual_init_on_quantized_base():
    # like trained weights: a dominant rank-8 part plus a small dense rest (for a
    # white-noise matrix the top 8 of 64 directions hold too little energy for
    # the claim below to be more than a coin flip)
    g = _gen(6)
    signal = g.standard_normal((128, 8)) @ g.standard_normal((8, 64))
    w = jnp.asarray(signal + 0.1 * g.standard_normal((128, 64)), jnp.float32)
    q = lj.quantize({"w": w}, targets="w")
    cfg = lj.LoraConfig(rank=8, targets="w", init="pissa")
    res, ad = lj.init(q, cfg, return_params=True)
    assert lj.is_quantized(res["w"])
    # init sees the dequantized W; the top-r part is exact in the adapter and only
    # the (small) residual is requantized, so base + adapter is far closer to that
    # W than NF4 is to the original
    seen = q["w"].dequantize()
    err_res = rel_err(lj.merge(lj.dequantize(res), ad, cfg)["w"], seen)
    err_q = rel_err(seen, w)
    assert err_res < 0.5 * err_q, (err_res, err_q)


def test_init_errors():
    params = _params(_gen(7))
    with pytest.raises(ValueError, match=r"init='pissa'.*return_params=True"):
        lj.init(params, lj.LoraConfig(init="pissa", **CFG))
    with pytest.raises(ValueError, match=r"init='kaiming'.*needs a PRNG key.*Fix"):
        lj.init(params, lj.LoraConfig(**CFG))
    with pytest.raises(TypeError, match="return_params must be a bool"):
        lj.init(params, lj.LoraConfig(**CFG), key=jax.random.key(0), return_params=1)
    with pytest.raises(ValueError, match=r"LoraConfig.init: 'svd' is invalid: known inits"):
        lj.LoraConfig(init="svd", **CFG)


# ----------------------------------------------------------------------------- rsLoRA


@pytest.mark.torch
def test_rslora_scale_through_apply_and_peft_export(tmp_path):
    gen = _gen(8)
    w = gen.standard_normal((16, 24)).astype(np.float32)
    params = {"fc": {"kernel": jnp.asarray(w)}}
    cfg = lj.LoraConfig(rank=16, alpha=8, targets=r"fc/kernel", use_rslora=True)
    ad = lj.init(params, cfg, key=jax.random.key(SEED))
    b = gen.standard_normal((16, 24)).astype(np.float32) * 0.1
    ad = {"fc": {"kernel": ad["fc"]["kernel"]._replace(b=jnp.asarray(b))}}
    assert float(ad["fc"]["kernel"].scale) == pytest.approx(8 / 4)    # alpha / sqrt(16)
    x = gen.standard_normal((5, 16)).astype(np.float32)
    got = lj.apply(lambda p, x: x @ p["fc"]["kernel"], cfg)(params, ad, jnp.asarray(x))
    a64 = _f64(ad["fc"]["kernel"].a)
    want = x.astype(np.float64) @ w + (8 / np.sqrt(16)) * (x @ a64) @ b.astype(np.float64)
    assert_close(got, want.astype(np.float32), rtol=1e-5)

    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    lj.export_peft(tmp_path, ad, cfg, key_map={r"fc/kernel": "fc.weight"})
    with open(tmp_path / "adapter_config.json") as fh:
        pcfg = json.load(fh)
    assert pcfg["use_rslora"] is True and pcfg["r"] == 16 and pcfg["lora_alpha"] == 8
    net = torch.nn.Sequential()
    net.add_module("fc", torch.nn.Linear(16, 24, bias=False))
    with torch.no_grad():
        net.fc.weight.copy_(torch.from_numpy(w.T.copy()))
    pm = peft.PeftModel.from_pretrained(net, str(tmp_path)).eval()
    assert pm.base_model.model.fc.scaling["default"] == pytest.approx(2.0)
    with torch.no_grad():
        y = pm(torch.from_numpy(x)).numpy()
    assert rel_err(y, want) < 1e-5
