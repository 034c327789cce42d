"""merge / unmerge: the reference semantics, checked against float64 formulas."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from examples import gpt
from tests._asserts import assert_close, assert_trees_close, perturb_b, rel_err
from tests.conftest import SMALL


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _ref_weight(w, lw, in_shape, out_shape, n_stacked=0):
    """W + s * A @ B in float64, reshaped with the layout's in/out split."""
    a, b = _f64(lw.a), _f64(lw.b)
    d = float(lw.scale) * np.matmul(a, b)
    stacked = np.shape(w)[:n_stacked]
    return _f64(w) + d.reshape(*stacked, *in_shape, *out_shape)


# Each case: a Flax layer, its input, the config, and a float64 reference of
# the adapted layer computed from the weight formula (independent of lj.merge).
def _dense(rng):
    m = nn.Dense(24)
    x = jax.random.normal(rng, (5, 16))
    cfg = lj.LoraConfig(targets=r"params/kernel", rank=4, alpha=8)

    def ref(p, ad):
        w = _ref_weight(p["params"]["kernel"], ad["params"]["kernel"], (16,), (24,))
        return _f64(x) @ w + _f64(p["params"]["bias"])
    return m, x, cfg, ref


def _dense_general_heads(rng):   # q-style kernel (d, heads, head_dim)
    m = nn.DenseGeneral((4, 6), use_bias=False)
    x = jax.random.normal(rng, (5, 16))
    cfg = lj.LoraConfig(targets=r"params/kernel", rank=4, layouts={".*": lj.Layout(0, 1, 2)})

    def ref(p, ad):
        w = _ref_weight(p["params"]["kernel"], ad["params"]["kernel"], (16,), (4, 6))
        return np.einsum("bd,dhk->bhk", _f64(x), w)
    return m, x, cfg, ref


def _dense_general_out(rng):     # out-projection kernel (heads, head_dim, d)
    m = nn.DenseGeneral(16, axis=(-2, -1), use_bias=False)
    x = jax.random.normal(rng, (5, 4, 6))
    cfg = lj.LoraConfig(targets=r"params/kernel", rank=4)   # default (*in, out)

    def ref(p, ad):
        w = _ref_weight(p["params"]["kernel"], ad["params"]["kernel"], (4, 6), (16,))
        return np.einsum("bhk,hkd->bd", _f64(x), w)
    return m, x, cfg, ref


def _einsum(rng):
    m = nn.Einsum((16, 12), "bi,io->bo", use_bias=False)
    x = jax.random.normal(rng, (5, 16))
    cfg = lj.LoraConfig(targets=r"params/kernel", rank=3)

    def ref(p, ad):
        return _f64(x) @ _ref_weight(p["params"]["kernel"], ad["params"]["kernel"], (16,), (12,))
    return m, x, cfg, ref


def _conv(rng):
    m = nn.Conv(8, (3, 3), use_bias=False, padding="SAME")
    x = jax.random.normal(rng, (2, 7, 7, 5))
    cfg = lj.LoraConfig(targets=r"params/kernel", rank=4)   # (*spatial, in) x out

    def ref(p, ad):
        w = _ref_weight(p["params"]["kernel"], ad["params"]["kernel"], (3, 3, 5), (8,))
        xp = np.pad(_f64(x), ((0, 0), (1, 1), (1, 1), (0, 0)))   # SAME for a 3x3 kernel
        return sum(np.einsum("nhwi,io->nhwo", xp[:, i:i + 7, j:j + 7], w[i, j])
                   for i in range(3) for j in range(3))
    return m, x, cfg, ref


def _embed(rng):
    m = nn.Embed(50, 12)
    ids = jax.random.randint(rng, (4, 9), 0, 50)
    cfg = lj.LoraConfig(targets=r"params/embedding", rank=4)

    def ref(p, ad):
        e = _ref_weight(p["params"]["embedding"], ad["params"]["embedding"], (50,), (12,))
        return e[np.asarray(ids)]
    return m, ids, cfg, ref


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        layer = nn.scan(lambda mdl, c, _: (nn.tanh(mdl(c)), None),
                        variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        y, _ = layer(nn.Dense(16, use_bias=False), x, None)
        return y


def _scanned(rng):
    m = nn.scan(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(), length=3)(16, use_bias=False)
    del m
    x = jax.random.normal(rng, (5, 16))
    cfg = lj.LoraConfig(targets=r"params/.*kernel", rank=4, layouts={".*": lj.Layout(1, 1, 1)})

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            blk = nn.scan(_Body, variable_axes={"params": 0}, split_rngs={"params": True},
                          length=3)
            y, _ = blk(name="layers")(x, None)
            return y

    def ref(p, ad):
        w = _ref_weight(p["params"]["layers"]["dense"]["kernel"],
                        ad["params"]["layers"]["dense"]["kernel"], (16,), (16,), n_stacked=1)
        h = _f64(x)
        for i in range(3):
            h = np.tanh(h @ w[i])
        return h
    return Stack(), x, cfg, ref


class _Body(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.tanh(nn.Dense(16, use_bias=False, name="dense")(x)), None


CASES = {"dense": _dense, "dense_general_heads": _dense_general_heads,
         "dense_general_out": _dense_general_out, "einsum": _einsum, "conv": _conv,
         "embed": _embed, "scanned": _scanned}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_then_apply_equals_reference_formula(case, rng, maybe_jit):
    k1, k2, k3, k4 = jax.random.split(rng, 4)
    model, x, cfg, ref = CASES[case](k1)
    params = jax.jit(model.init)(k2, x)
    ad = perturb_b(lj.init(params, cfg, key=k3), key=k4, std=0.2)
    merged = maybe_jit(lambda p, a: lj.merge(p, a, cfg))(params, ad)
    run = jax.jit(model.apply)   # the model is not under test; merge is
    y = run(merged, x)
    assert_close(y, ref(params, ad), rtol=1e-5, what=case)
    # and the adapter really changes the output
    assert rel_err(run(params, x), y) > 1e-3


def test_zero_b_is_bit_identical(small_gpt, rng, maybe_jit):
    model, variables = small_gpt
    cfg = lj.LoraConfig(targets=gpt.TARGETS, rank=4, alpha=16)
    ad = lj.init(variables, cfg, key=rng)
    merged = maybe_jit(lambda p, a: lj.merge(p, a, cfg))(variables, ad)
    assert_trees_close(merged, variables, exact=True)
    tok = gpt.random_tokens(SMALL, 2, seed=1)[:, :-1]
    run = jax.jit(model.apply)
    assert_trees_close(run(merged, tok), run(variables, tok), exact=True)


def test_unmerge_inverts_merge(small_gpt, rng, maybe_jit):
    _, variables = small_gpt
    cfg = lj.LoraConfig(targets=gpt.TARGETS, rank=4, alpha=16)
    k1, k2 = jax.random.split(rng)
    ad = perturb_b(lj.init(variables, cfg, key=k1), key=k2)
    merged = maybe_jit(lambda p, a: lj.merge(p, a, cfg))(variables, ad)
    back = maybe_jit(lambda p, a: lj.unmerge(p, a, cfg))(merged, ad)
    assert_trees_close(back, variables, rtol=1e-6)
    assert rel_err(merged["params"]["block_0"]["attn"]["q"]["kernel"],
                   variables["params"]["block_0"]["attn"]["q"]["kernel"]) > 1e-3


def test_merge_is_computed_in_float32_for_bf16_weights(rng):
    # Random weights: every merged element is the float64 sum rounded once to
    # bfloat16, up to float32's own rounding of the sum. (Bit-equality with the
    # rounded float64 result does not hold for every seed: where the sum lies
    # within float32 rounding of a bfloat16 midpoint, either neighbour is right.)
    k1, k2, k3 = jax.random.split(rng, 3)
    w = jax.random.normal(k1, (64, 64)).astype(jnp.bfloat16)
    cfg = lj.LoraConfig(targets="w", rank=4)
    ad = perturb_b(lj.init({"w": w}, cfg, key=k2), key=k3, std=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lj.LoraWarning)
        merged = lj.merge({"w": w}, ad, cfg)["w"]
    assert merged.dtype == jnp.bfloat16
    s, a, b = float(ad["w"].scale), _f64(ad["w"].a), _f64(ad["w"].b)
    ref = _f64(w) + s * a @ b
    _, e = np.frexp(np.abs(ref))
    half_ulp_bf16 = np.ldexp(1.0, e - 9)          # bfloat16 keeps 8 significant bits
    f32_err = 2 * (cfg.rank + 2) * 2.0 ** -24 * (np.abs(_f64(w)) + s * np.abs(a) @ np.abs(b))
    err = np.abs(_f64(merged) - ref)
    assert np.all(err <= half_ulp_bf16 + f32_err), float(np.max(err / (half_ulp_bf16 + f32_err)))

    # A constructed element shows the sum is not formed in bfloat16: W = 1 and
    # delta = 2^-8 + 2^-20. In float32 the sum is above the midpoint between 1 and
    # the next bfloat16 (1 + 2^-7), so it rounds up; a bfloat16 delta would be 2^-8
    # exactly, a tie, and round to even (1.0).
    w1 = jnp.ones((4, 4), jnp.bfloat16)
    c1 = lj.LoraConfig(targets="w", rank=1, alpha=1)
    one = lj.init({"w": w1}, c1, key=k2)["w"]
    one = one._replace(a=jnp.zeros((4, 1)).at[0, 0].set(1.0),
                       b=jnp.zeros((1, 4)).at[0, 0].set(2.0 ** -8 + 2.0 ** -20))
    got = lj.merge({"w": w1}, {"w": one}, c1)["w"]
    assert float(got[0, 0]) == 1.0 + 2.0 ** -7
    assert float((w1[0, 0] + one.b[0, 0].astype(jnp.bfloat16)).astype(jnp.bfloat16)) == 1.0
    np.testing.assert_array_equal(np.asarray(got[1:], np.float32), 1.0)


def test_bf16_merge_warns_when_delta_is_erased(rng):
    k1, k2, k3 = jax.random.split(rng, 3)
    w = jax.random.normal(k1, (256, 256)).astype(jnp.bfloat16)
    cfg = lj.LoraConfig(targets="w", rank=8)
    ad = lj.init({"w": w}, cfg, key=k2)
    # |dW| / |W| ~ 6e-4, the measured case from ARCHITECTURE.md
    ad = perturb_b(ad, key=k3, std=6e-4 * 16 / np.sqrt(8 / 3) / 1.0)
    with pytest.warns(lj.LoraWarning, match=r"w: casting the merged weight to bfloat16 erased \d+%"):
        lj.merge({"w": w}, ad, cfg)
    # float32 weights: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lj.merge({"w": w.astype(jnp.float32)}, ad, cfg)


def test_nan_adapter_is_refused(rng):
    w = jax.random.normal(rng, (8, 8))
    cfg = lj.LoraConfig(targets="w", rank=2)
    ad = lj.init({"w": w}, cfg, key=rng)
    ad = {"w": ad["w"]._replace(b=ad["w"].b.at[0, 0].set(jnp.nan))}
    with pytest.raises(ValueError, match=r"w: the adapter's update .* NaN/Inf"):
        lj.merge({"w": w}, ad, cfg)


def test_train_leaves_replace_and_unmerge_warns(rng):
    p = {"w": jax.random.normal(rng, (8, 8)), "head": jax.random.normal(rng, (8, 2))}
    cfg = lj.LoraConfig(targets="w", rank=2, train="head")
    ad = lj.init(p, cfg, key=rng)
    ad["head"] = ad["head"] + 1.0
    merged = lj.merge(p, ad, cfg)
    np.testing.assert_array_equal(merged["head"], ad["head"])
    with pytest.warns(lj.LoraWarning, match=r"kept the trained values .*\['head'\]"):
        back = lj.unmerge(merged, ad, cfg)
    np.testing.assert_array_equal(back["head"], ad["head"])


def test_mismatched_adapters_name_the_path(rng):
    p = {"a": {"w": jax.random.normal(rng, (8, 6))}, "b": jnp.ones((6, 6))}
    cfg = lj.LoraConfig(targets=r"a/w", rank=2)
    ad = lj.init(p, cfg, key=rng)
    bad = {"a": {"w": ad["a"]["w"]._replace(a=jnp.ones((7, 2)))}, "b": None}
    with pytest.raises(ValueError, match=r"a/w: adapter shapes do not fit the weight \(8, 6\)"):
        lj.merge(p, bad, cfg)
    with pytest.raises(ValueError, match=r"the adapter tree does not mirror params"):
        lj.merge(p, {"a": ad["a"]}, cfg)
    with pytest.raises(ValueError, match=r"a/w: the config targets this leaf but adapters hold NoneType"):
        lj.merge(p, {"a": {"w": None}, "b": None}, cfg)
    with pytest.raises(ValueError, match=r"b: adapters hold LoraWeights here but the config neither"):
        lj.merge(p, {"a": ad["a"], "b": ad["a"]["w"]}, cfg)
    with pytest.raises(ValueError, match=r"b: LoraConfig.train names this leaf"):
        lj.merge(p, {"a": ad["a"], "b": None}, cfg.replace(train="b"))
    with pytest.raises(ValueError, match=r"b: fully-trained leaf has shape \(3,\)"):
        lj.merge(p, {"a": ad["a"], "b": jnp.ones(3)}, cfg.replace(train="b"))


def test_delta_refuses_adapter_sets(rng):
    p = {"w": jax.random.normal(rng, (8, 6))}
    cfg = lj.LoraConfig(targets="w", rank=2)
    spec = lj.describe(p, cfg).specs["w"]
    stacked = lj.LoraWeights(jnp.ones((3, 8, 2)), jnp.ones((3, 2, 6)), jnp.ones(3))
    with pytest.raises(ValueError, match=r"w: a has shape \(3, 8, 2\).*select one adapter"):
        lj.delta(stacked, spec)
