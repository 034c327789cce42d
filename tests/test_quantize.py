"""Quantized frozen bases (QLoRA): NF4 levels and round-trip error against
QLoRA's construction, int8 per-channel scales, storage bytes, containers as
pytrees (jit, scan), the rest of the library on quantized params, merging
into a quantized base, and `apply` dequantizing at each use (values,
gradients, and XLA's memory analysis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from tests._asserts import assert_close, random_adapters, rel_err
from tests.conftest import SEED

# bitsandbytes' NF4 table (functional.py), the values QLoRA publishes.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def _gen(k=0):
    return np.random.default_rng(SEED + k)


def _nf4_reference(x: np.ndarray, block: int = 64) -> np.ndarray:
    """QLoRA's NF4 round trip in float64: exact block absmax, nearest published level."""
    levels = np.asarray(PUBLISHED_NF4, np.float64)
    flat = x.astype(np.float64).reshape(-1)
    n = flat.size
    pad = (-n) % block
    blocks = np.concatenate([flat, np.zeros(pad)]).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    scaled = blocks / np.where(absmax > 0, absmax, 1.0)
    idx = np.abs(scaled[..., None] - levels).argmin(-1)
    return (levels[idx] * absmax).reshape(-1)[:n].reshape(x.shape)


def test_nf4_levels_are_qlora_quantiles():
    got = lj.nf4_levels()
    assert got.shape == (16,)
    # the construction in float64 vs the published float32 table
    np.testing.assert_allclose(got, PUBLISHED_NF4, rtol=0, atol=1e-6)
    assert got[7] == 0.0 and got[0] == -1.0 and got[-1] == 1.0


def test_nf4_roundtrip_error_matches_qlora():
    x = _gen(1).standard_normal((512, 384)).astype(np.float32)
    q = lj.quantize({"w": jnp.asarray(x)}, targets="w")["w"]
    ours = np.asarray(q.dequantize(), np.float64)
    ref = _nf4_reference(x)
    e_ours = np.sqrt(np.mean((ours - x) ** 2))
    e_ref = np.sqrt(np.mean((ref - x) ** 2))
    # single-level NF4 on N(0, 1) with blocks of 64: rms error ~0.091; double
    # quantization of the scales may cost at most 1% on top of it
    assert 0.085 < e_ref < 0.097, e_ref
    assert e_ours <= 1.01 * e_ref, (e_ours, e_ref)
    # Element by element: each value is the nearest level times the block's
    # (dequantized) absmax, in float64.
    absmax = np.asarray(q.absmax(), np.float64)
    blocks = x.astype(np.float64).reshape(-1, 64)
    idx = np.abs((blocks / absmax[:, None])[..., None] - np.asarray(lj.nf4_levels())).argmin(-1)
    want = (lj.nf4_levels()[idx] * absmax[:, None]).reshape(x.shape)
    # a value (float32) that sits on the midpoint of two levels may round to
    # either: then the level taken is as near as the nearest, to rounding
    scaled = blocks / absmax[:, None]
    got_dist = np.abs(scaled - ours.reshape(-1, 64) / absmax[:, None])
    best_dist = np.abs(scaled - lj.nf4_levels()[idx])
    assert np.all(got_dist <= best_dist + 1e-6)
    exact_level = np.abs(ours - want) <= 1e-6 * np.max(np.abs(x))
    assert exact_level.mean() > 0.9999, exact_level.mean()
    # the double-quantized absmax is close to the exact one
    exact = np.abs(blocks).max(axis=1)
    assert np.max(np.abs(absmax - exact) / exact) < 0.01


@pytest.mark.slow
def test_storage_bytes_vs_bfloat16():
    w = jnp.asarray(_gen(2).standard_normal((1024, 1024)), jnp.bfloat16)
    bf16 = w.size * 2
    nf4 = lj.quantize({"w": w}, targets="w")["w"]
    int8 = lj.quantize({"w": w}, targets="w", method="int8")["w"]
    assert nf4.nbytes / bf16 <= 0.27
    bits = 8 * nf4.nbytes / w.size
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-4, bits   # ~4.127 (+ one offset)
    assert int8.nbytes / bf16 <= 0.52
    assert nf4.dtype == jnp.bfloat16 and nf4.dequantize().dtype == jnp.bfloat16


def test_int8_scale_per_output_channel():
    x = _gen(3).standard_normal((24, 4, 6)).astype(np.float32)    # (d, heads, head_dim)
    x[:, 1, 2] *= 50.0                                               # one loud channel
    cfg = lj.LoraConfig(targets="w", layouts={"w": lj.Layout(0, 1, 2)})
    q = lj.quantize({"w": jnp.asarray(x)}, targets="w", method="int8", config=cfg)["w"]
    assert q.scale.shape == (1, 4, 6)
    np.testing.assert_allclose(np.asarray(q.scale)[0], np.abs(x).max(0) / 127, rtol=1e-6)
    err = np.abs(np.asarray(q.dequantize()) - x)
    assert np.all(err <= np.asarray(q.scale) / 2 * (1 + 1e-5))
    # the loud channel does not coarsen the others
    assert err[:, 0, 0].max() < 0.02 * np.abs(x[:, 0, 0]).max()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_stacked_layers_quantized_per_slice_and_scanned(method):
    x = jnp.asarray(_gen(4).standard_normal((3, 40, 70)), jnp.float32)
    cfg = lj.LoraConfig(targets="w", layouts={"w": lj.Layout(1, 1, 1)})
    q = lj.quantize({"w": x}, targets="w", method=method, config=cfg)["w"]
    assert q.shape == (3, 40, 70)
    for i in range(3):
        one = lj.quantize({"w": x[i]}, targets="w", method=method)["w"]
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(jax.tree.map(lambda c: c[i], q))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    dense = q.dequantize()
    # through jit and scan (slices of every child are the per-layer container)
    # (compiled and eager float32 products may differ in the last bit)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda c: c.dequantize())(q)),
                               np.asarray(dense), rtol=1e-6, atol=1e-7)
    _, per_layer = jax.lax.scan(lambda c, s: (c, s.dequantize()), 0, q)
    np.testing.assert_allclose(np.asarray(per_layer), np.asarray(dense), rtol=1e-6, atol=1e-7)


def test_library_reads_quantized_params():
    gen = _gen(5)
    params = {"a": {"kernel": jnp.asarray(gen.standard_normal((64, 32)), jnp.float32),
                    "bias": jnp.zeros(32)},
              "b": {"kernel": jnp.asarray(gen.standard_normal((32, 128)), jnp.bfloat16)}}
    q = lj.quantize(params)
    assert lj.is_quantized(q["a"]["kernel"]) and not lj.is_quantized(q["a"]["bias"])
    cfg = lj.LoraConfig(rank=4, targets=r".*/kernel")
    d, dq = lj.describe(params, cfg), lj.describe(q, cfg)
    assert list(dq.specs) == list(d.specs) and dq.specs == d.specs
    assert dq.n_params == d.n_params
    ad = lj.init(q, cfg, key=jax.random.key(0))
    ref = lj.init(params, cfg, key=jax.random.key(0))
    assert jax.tree.map(jnp.shape, ad) == jax.tree.map(jnp.shape, ref)
    s = lj.summary(q, ad)
    assert set(s.frozen_bytes) == {"nf4", "float32"}
    assert s.frozen_bytes["nf4"] == q["a"]["kernel"].nbytes + q["b"]["kernel"].nbytes
    assert s.trainable == lj.summary(params, ref).trainable
    assert lj.dequantize(q)["a"]["bias"] is q["a"]["bias"]


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_merge_into_quantized_base_requantizes_with_warning(method):
    gen = _gen(6)
    params = {"w": jnp.asarray(gen.standard_normal((64, 48)), jnp.float32)}
    q = lj.quantize(params, targets="w", method=method)
    cfg = lj.LoraConfig(rank=4, alpha=8, targets="w")
    ad = random_adapters(q, cfg, seed=SEED + 6, b_std=0.3)
    with pytest.warns(lj.LoraWarning, match=rf"w: merging an adapter into a {method} weight.*"
                                            r"relative error"):
        merged = lj.merge(q, ad, cfg)
    assert type(merged["w"]) is type(q["w"])
    exact = q["w"].dequantize(dtype=jnp.float32) + lj.delta(ad["w"], lj.describe(q, cfg).specs["w"])
    want = lj.quantize({"w": exact}, targets="w", method=method)["w"]
    for a, b in zip(jax.tree.leaves(merged["w"]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.warns(lj.LoraWarning, match="unmerging"):
        back = lj.unmerge(merged, ad, cfg)
    # two roundings, each within the format's worst case for every input: an element
    # is off by at most half the widest gap between levels times its block's (NF4) or
    # channel's (int8, 127 steps) absmax, which is at most the whole array's max |x|
    # (rel_err's denominator); and together no worse than their sum (the first is
    # merged - exact, the second back - y)
    levels = np.asarray(lj.nf4_levels(), np.float64)
    tol = (np.max(np.diff(levels)) / 2 if method == "nf4" else 0.5 / 127) * (1 + 1e-5)
    y = merged["w"].dequantize() - (exact - q["w"].dequantize())
    r1 = rel_err(merged["w"].dequantize(), exact)
    r2 = rel_err(back["w"].dequantize(), y)
    assert r1 <= tol and r2 <= tol, (r1, r2, tol)
    nrm = np.linalg.norm
    e1 = nrm(np.asarray(merged["w"].dequantize() - exact))
    e2 = nrm(np.asarray(back["w"].dequantize() - y))
    assert nrm(np.asarray(back["w"].dequantize() - q["w"].dequantize())) <= 1.0001 * (e1 + e2)


def test_quantize_errors():
    params = {"dense": {"kernel": jnp.ones((64, 64)), "bias": jnp.zeros(64)},
              "ids": jnp.zeros((4, 4), jnp.int32)}
    with pytest.raises(ValueError, match=r"method='nf5'.*Fix"):
        lj.quantize(params, method="nf5")
    with pytest.raises(ValueError, match="block_size=63"):
        lj.quantize(params, block_size=63)
    with pytest.raises(ValueError, match=r"(?s)matched no leaf.*dense/kernel.*Fix"):
        lj.quantize(params, targets=r".*/weight")
    with pytest.raises(ValueError, match=r"dense/bias: can't quantize shape \(64,\).*exclude="):
        lj.quantize(params, targets=r"dense/.*")
    with pytest.raises(ValueError, match=r"ids: can't quantize a int32 leaf"):
        lj.quantize(params, targets="ids")
    q = lj.quantize(params)
    with pytest.raises(ValueError, match=r"dense/kernel: already quantized"):
        lj.quantize(q)
    with pytest.raises(TypeError, match="config must be a lj.LoraConfig"):
        lj.quantize(params, config={"layouts": {}})
    # train leaves of the config are left alone
    cfg = lj.LoraConfig(targets="ids", train=r"dense/kernel")
    with pytest.raises(ValueError, match="matched no leaf"):
        lj.quantize(params, targets=r"dense/kernel", config=cfg)


# ----------------------------------------------------------------------------- apply


def _mlp(params, x):
    h = jnp.tanh(x @ params["l0"]["kernel"] + params["l0"]["bias"][None])
    h = jnp.tanh(h @ params["l1"]["kernel"])
    return h @ params["l2"]["kernel"]


def _mlp_params(gen, d=64, dtype=jnp.float32):
    n = lambda *s: jnp.asarray(gen.standard_normal(s) / np.sqrt(s[0]), dtype)  # noqa: E731
    return {"l0": {"kernel": n(d, 2 * d), "bias": jnp.zeros(2 * d, dtype)},
            "l1": {"kernel": n(2 * d, 2 * d)}, "l2": {"kernel": n(2 * d, d)}}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_apply_on_quantized_base_equals_dequantized(method):
    gen = _gen(7)
    params = _mlp_params(gen)
    q = lj.quantize(params, method=method)
    # LoRA on two of the three quantized kernels: l1 is quantized but frozen
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=r"l(0|2)/kernel")
    ad = random_adapters(q, cfg, seed=SEED + 7, b_std=0.2)
    x = jnp.asarray(gen.standard_normal((5, 64)), jnp.float32)
    dense = lj.dequantize(q)
    want = _mlp(lj.merge(dense, ad, cfg), x)
    assert_close(jax.jit(lj.apply(_mlp, cfg, strict=True))(q, ad, x), want, rtol=1e-5)
    if method == "int8":   # and without jit
        assert_close(lj.apply(_mlp, cfg, strict=True)(q, ad, x), want, rtol=1e-5)

    def grads(fn, p):
        return jax.jit(jax.grad(lambda ad: jnp.sum(fn(p, ad, x) ** 2)))(ad)
    g = grads(lj.apply(_mlp, cfg), q)
    g_ref = grads(lambda p, a, x: _mlp(lj.merge(p, a, cfg), x), dense)
    for path in ("l0", "l2"):
        assert_close(g[path]["kernel"].a, g_ref[path]["kernel"].a, rtol=1e-4, what=path)
        assert_close(g[path]["kernel"].b, g_ref[path]["kernel"].b, rtol=1e-4, what=path)
    e = lj.explain(_mlp, cfg, q, ad, x)
    assert e.n_fallbacks == 0 and e.rules["l0/kernel"] == {"lowrank_dot": 1}


def _all_eqns(jaxpr):
    """Every equation, nested jaxprs included (lj.apply's matmuls sit in a custom_vjp)."""
    for e in jaxpr.eqns:
        yield e
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from _all_eqns(sub)


def test_apply_keeps_lora_path_in_adapter_dtype():
    gen = _gen(8)
    params = _mlp_params(gen, dtype=jnp.bfloat16)
    q = lj.quantize(params)
    cfg = lj.LoraConfig(rank=4, targets=r".*/kernel", dtype=jnp.float32)
    ad = random_adapters(q, cfg, seed=SEED + 8)
    x = jnp.asarray(gen.standard_normal((3, 64)), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lj.apply(_mlp, cfg))(q, ad, x)
    dots = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    # per layer: the base product in bf16, x @ a and t @ b in float32
    lora = [e for e in dots if e.outvars[0].aval.dtype == jnp.float32]
    assert len(lora) >= 2 * 3, [str(e.outvars[0].aval) for e in dots]
    g = jax.eval_shape(jax.grad(
        lambda ad: jnp.sum(lj.apply(_mlp, cfg)(q, ad, x).astype(jnp.float32))), ad)
    assert jax.tree.map(lambda a: a.dtype, g) == jax.tree.map(lambda a: a.dtype, ad)


@pytest.mark.slow
def test_train_step_memory_has_no_dense_copy_of_all_weights():
    """XLA's memory analysis of a jitted LoRA step on an NF4 base: the
    temporaries stay below the bytes of all dequantized weights together."""
    gen = _gen(9)
    d, layers = 256, 8
    params = {f"l{i}": {"kernel": jnp.asarray(gen.standard_normal((d, d)) / 16, jnp.float32)}
              for i in range(layers)}

    def model(p, x):
        for i in range(layers):
            x = jnp.tanh(x @ p[f"l{i}"]["kernel"])
        return x

    q = lj.quantize(params)
    cfg = lj.LoraConfig(rank=4, targets=r".*/kernel")
    ad = lj.init(q, cfg, key=jax.random.key(0))
    x = jnp.asarray(gen.standard_normal((4, d)), jnp.float32)

    def loss(ad, p):
        return jnp.mean(lj.apply(model, cfg)(p, ad, x) ** 2)

    step = jax.jit(jax.grad(loss))
    mem = step.lower(ad, q).compile().memory_analysis()
    dense_bytes = layers * d * d * 4
    args_bytes = sum(x.nbytes for x in jax.tree.leaves(q))
    assert mem.argument_size_in_bytes < 0.3 * dense_bytes + 200_000
    # all weights dense at once would be >= dense_bytes of temporaries
    assert mem.temp_size_in_bytes < 0.5 * dense_bytes, (mem.temp_size_in_bytes, dense_bytes,
                                                       args_bytes)


@pytest.mark.slow
def test_stacked_weight_quantized_without_its_layout_is_refused_with_the_fix(rng):
    """A scan over layers of a weight quantized as one matrix can't slice its blocks:
    lj.init names the path and the fix instead of failing inside lax.scan."""
    params = {"w": jax.random.normal(rng, (3, 64, 64))}

    def fn(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    x = jax.random.normal(jax.random.fold_in(rng, 1), (4, 64))
    q = lj.quantize(params, targets="w")
    cfg = lj.configure(lj.LoraConfig(rank=2, targets="w"), fn, q, x)
    assert cfg.layout_for("w") == lj.Layout(1, 1, 1)
    with pytest.raises(ValueError, match=r"w: quantized with 0 stacked \(layer\) axes, but the "
                                         r"layout \(1, 1, 1\) has 1.*Fix: quantize with the "
                                         r"config"):
        lj.init(q, cfg, key=jax.random.key(0))
    q = lj.quantize(params, targets="w", config=cfg)
    ad = lj.init(q, cfg, key=jax.random.key(0))
    ad = {"w": ad["w"]._replace(b=jax.random.normal(jax.random.fold_in(rng, 2), ad["w"].b.shape))}
    got = lj.apply(fn, cfg)(q, ad, x)
    want = fn(lj.merge(lj.dequantize(q), ad, cfg), x)
    assert float(jnp.abs(got - want).max()) <= 1e-4 * float(jnp.abs(want).max())
