"""Where LoRA goes besides matmuls: 2-D convolution kernels (apply's conv
rule: an r-channel convolution then a 1x1 up-projection) and embedding
tables (the gather rule: ``W[ids] + s a[ids] b``), against float64
references and `merge`, with gradients, on a quantized base, and the
conv-classifier example end to end."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from tests._asserts import assert_close, rel_err
from tests.conftest import SEED


def _gen(k=0):
    return np.random.default_rng(SEED + k)


def _conv_f64(x, w, b, stride, padding, dilation):
    """NHWC x HWIO convolution in float64 (the reference)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    kh, kw = w.shape[:2]
    span = [(k - 1) * dilation + 1 for k in (kh, kw)]
    if padding == "SAME":
        pads = []
        for size, sp in zip(x.shape[1:3], span):
            out = -(-size // stride)
            total = max((out - 1) * stride + sp - size, 0)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(0, 0), (0, 0)]
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    oh = (xp.shape[1] - span[0]) // stride + 1
    ow = (xp.shape[2] - span[1]) // stride + 1
    y = np.zeros((x.shape[0], oh, ow, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i * dilation: i * dilation + (oh - 1) * stride + 1: stride,
                       j * dilation: j * dilation + (ow - 1) * stride + 1: stride, :]
            y += patch @ w[i, j]
    return y + (0 if b is None else np.asarray(b, np.float64))


class _Convs(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(8, (3, 3), padding="SAME", name="c0")(x)
        h = nn.Conv(6, (3, 3), strides=2, padding="VALID", use_bias=False, name="c1")(jnp.tanh(h))
        return nn.Conv(5, (3, 3), kernel_dilation=2, padding="SAME", name="c2")(jnp.tanh(h))


def _random_b(adapters, gen, std=0.2):
    return jax.tree.map(lambda n: n._replace(b=jnp.asarray(std * gen.standard_normal(n.b.shape),
                                                           n.b.dtype))
                        if lj.is_lora(n) else n, adapters, is_leaf=lj.is_lora)


@pytest.mark.slow
def test_conv2d_lora_against_float64(maybe_jit):
    gen = _gen(1)
    x = gen.standard_normal((2, 11, 11, 3)).astype(np.float32)
    variables = _Convs().init(jax.random.key(SEED), jnp.asarray(x))
    cfg = lj.LoraConfig(rank=2, alpha=4, targets=r".*/kernel")
    ad = _random_b(lj.init(variables, cfg, key=jax.random.key(SEED + 1)), gen)
    got = maybe_jit(lj.apply(_Convs().apply, cfg, strict=True))(variables, ad, jnp.asarray(x))

    p = variables["params"]
    h = x.astype(np.float64)
    for name, stride, padding, dil in (("c0", 1, "SAME", 1), ("c1", 2, "VALID", 1),
                                       ("c2", 1, "SAME", 2)):
        node = ad["params"][name]["kernel"]
        w = np.asarray(p[name]["kernel"], np.float64)
        w = w + 2.0 * (np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)
                       ).reshape(w.shape)
        h = _conv_f64(h, w, p[name].get("bias"), stride, padding, dil)
        if name != "c2":
            h = np.tanh(h)
    assert got.shape == h.shape
    assert rel_err(got, h) < 2e-5
    e = lj.explain(_Convs().apply, cfg, variables, ad, jnp.asarray(x))
    assert e.rules == {f"params/{n}/kernel": {"lowrank_conv": 1} for n in ("c0", "c1", "c2")}
    # same gradients as the merged model's
    loss_a = lambda ad: jnp.sum(lj.apply(_Convs().apply, cfg)(variables, ad, x) ** 2)  # noqa
    loss_m = lambda ad: jnp.sum(_Convs().apply(lj.merge(variables, ad, cfg), x) ** 2)  # noqa
    ga, gm = jax.jit(jax.grad(loss_a))(ad), jax.jit(jax.grad(loss_m))(ad)
    for name in ("c0", "c1", "c2"):
        for f in ("a", "b"):
            assert_close(getattr(ga["params"][name]["kernel"], f),
                         getattr(gm["params"][name]["kernel"], f), rtol=1e-4,
                         what=f"{name}/{f}")


class _Embed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        e = nn.Embed(30, 12, name="tok")(ids)
        return nn.Dense(4, name="out")(jnp.tanh(e).mean(1))


@pytest.mark.slow
def test_embedding_lora_against_float64(maybe_jit):
    gen = _gen(2)
    ids = gen.integers(0, 30, (5, 7))
    variables = _Embed().init(jax.random.key(SEED), jnp.asarray(ids))
    cfg = lj.LoraConfig(rank=3, alpha=6, targets=r".*/embedding")
    ad = _random_b(lj.init(variables, cfg, key=jax.random.key(SEED + 2)), gen)
    embed = lambda v, ids: v["params"]["tok"]["embedding"][ids]  # noqa: E731
    rows = maybe_jit(lj.apply(embed, cfg, strict=True))(variables, ad, jnp.asarray(ids))
    node = ad["params"]["tok"]["embedding"]
    w = np.asarray(variables["params"]["tok"]["embedding"], np.float64)
    a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    want = w[ids] + 2.0 * a[ids] @ b
    assert rel_err(rows, want) < 1e-6
    got = lj.apply(_Embed().apply, cfg)(variables, ad, jnp.asarray(ids))
    assert_close(got, _Embed().apply(lj.merge(variables, ad, cfg), jnp.asarray(ids)), rtol=1e-5)
    assert lj.explain(_Embed().apply, cfg, variables, ad, ids).rules == \
        {"params/tok/embedding": {"lowrank_gather": 1}}
    g = jax.jit(jax.grad(
        lambda ad: jnp.sum(lj.apply(_Embed().apply, cfg)(variables, ad, ids) ** 2)))(ad)
    gm = jax.jit(jax.grad(
        lambda ad: jnp.sum(_Embed().apply(lj.merge(variables, ad, cfg), ids) ** 2)))(ad)
    for f in ("a", "b"):
        assert_close(getattr(g["params"]["tok"]["embedding"], f),
                     getattr(gm["params"]["tok"]["embedding"], f), rtol=1e-4, what=f)
    # rows never looked up get no gradient in a
    unused = sorted(set(range(30)) - set(ids.ravel().tolist()))
    assert not np.any(np.asarray(g["params"]["tok"]["embedding"].a)[unused])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_conv_and_embedding_on_quantized_base(method):
    gen = _gen(3)
    x = jnp.asarray(gen.standard_normal((2, 9, 9, 3)), jnp.float32)
    variables = _Convs().init(jax.random.key(SEED), x)
    cfg = lj.LoraConfig(rank=2, alpha=4, targets=r".*/c(0|2)/kernel")
    q = lj.quantize(variables, targets=r".*/kernel", method=method, config=cfg)   # c1: frozen, quantized
    ad = _random_b(lj.init(q, cfg, key=jax.random.key(1)), gen)
    got = jax.jit(lj.apply(_Convs().apply, cfg))(q, ad, x)
    want = _Convs().apply(lj.merge(lj.dequantize(q), ad, cfg), x)
    assert_close(got, want, rtol=1e-5)

    ids = jnp.asarray(gen.integers(0, 30, (4, 6)))
    ev = _Embed().init(jax.random.key(SEED), ids)
    ecfg = lj.LoraConfig(rank=3, targets=r".*/embedding")
    eq = lj.quantize(ev, targets=r".*/embedding", method=method, config=ecfg)
    ead = _random_b(lj.init(eq, ecfg, key=jax.random.key(2)), gen)
    assert_close(jax.jit(lj.apply(_Embed().apply, ecfg))(eq, ead, ids),
                 _Embed().apply(lj.merge(lj.dequantize(eq), ead, ecfg), ids), rtol=1e-5)


@pytest.mark.standard_promotion
@pytest.mark.slow
@pytest.mark.slow
def test_conv_classifier_example_runs():
    from examples import conv_classifier as cc
    s = cc.Settings(pretrain_steps=4, steps=3, batch=8, n_train=64, n_test=32, dora=True)
    r = cc.run(s)
    lo = r["runs"]["lora"]
    assert lo["rules"] == {f"params/conv_{i}/kernel": {"lowrank_conv": 1} for i in range(3)}
    assert lo["merged_vs_unmerged_disagreements"] == 0 and lo["max_logit_diff"] < 1e-4
    assert set(r["runs"]) == {"probe", "lora", "full"}
    assert "lora" in cc.report(r, s)
    images, labels = cc.dataset(cc.TASK_B, 40, 0)
    assert images.shape == (40, 24, 24, 1) and sorted(set(labels.tolist())) == [0, 1, 2, 3]
