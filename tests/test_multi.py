"""Adapter sets: stacking and padding, add/remove/select, hot swap without
recompiles, mixed-batch apply vs each example alone (plain, scan, conv,
embedding), composition vs float64 references and PEFT, multi-merge,
checkpoints, errors."""

from __future__ import annotations

import math
import zlib
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lora_jax as lj
from examples import gpt
from tests._asserts import CompileCounter, assert_close, random_adapters, rel_err
from tests.conftest import SEED, SMALL

OUT_RTOL = 1e-5


def _seed(rng) -> int:
    return int(np.asarray(jax.random.key_data(rng)).ravel()[-1]) & 0x7FFFFFFF


def _gen(rng):
    return np.random.default_rng(_seed(rng))


def _gpt_config(**kw):
    return gpt.GPTConfig(**{**SMALL.__dict__, **kw})


def _members(params, configs, seed):
    """``{name: (random adapters with non-zero B, config)}``."""
    return {name: (random_adapters(params, cfg, seed=seed + i, b_std=0.2), cfg)
            for i, (name, cfg) in enumerate(configs.items())}


def _dense_delta(node):
    """``scale * a @ b`` in float64 numpy, shape (*stacked, in, out)."""
    a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    return float(node.scale) * (a @ b)


def _small_params(gen):
    return {"q": jnp.asarray(gen.standard_normal((12, 10)), jnp.float32),
            "v": jnp.asarray(gen.standard_normal((12, 10)), jnp.float32),
            "stack": jnp.asarray(gen.standard_normal((3, 12, 10)), jnp.float32)}


_STACK = {"stack": lj.Layout(1, 1, 1)}


# ----------------------------------------------------------------------------- the set


def test_set_pads_ranks_keeps_scales_and_selects_exactly(rng):
    gen = _gen(rng)
    params = _small_params(gen)
    cfgs = {"r2": lj.LoraConfig(rank=2, alpha=4, targets=".*", layouts=_STACK),
            "r5": lj.LoraConfig(rank=5, alpha=3, targets=".*", layouts=_STACK, use_rslora=True),
            "r3": lj.LoraConfig(rank=3, alpha=9, targets=".*", layouts=_STACK)}
    members = _members(params, cfgs, _seed(rng))
    aset = lj.adapter_set(members)
    assert aset.names == ("r2", "r5", "r3") and len(aset) == 3
    assert aset.config.rank == 5 and aset.config.rank_for("stack") == 5
    node = aset.adapters["stack"]
    assert node.a.shape == (3, 3, 12, 5) and node.b.shape == (3, 3, 5, 10)
    np.testing.assert_allclose(node.scale, [cfgs[n].scale_for("q") for n in aset.names])
    for name, (ad, cfg) in members.items():
        # trimmed: bit-identical to what was added
        back = lj.select_adapter(aset, name, trim=True)
        for path in ("q", "v", "stack"):
            for f in ("a", "b", "scale"):
                np.testing.assert_array_equal(getattr(back[path], f), getattr(ad[path], f))
        # padded: the same model, through lj.merge with the set's config
        padded = lj.select_adapter(aset, aset.index(name))
        got = lj.merge(params, padded, aset.config)
        want = lj.merge(params, ad, cfg)
        for path in params:
            assert_close(got[path], want[path], rtol=1e-6, what=f"{name}/{path}")
    # a traced index inside jit selects the same adapter
    sel = jax.jit(lambda s, i: lj.select_adapter(s, i))(aset, jnp.int32(1))
    np.testing.assert_array_equal(sel["q"].b, lj.select_adapter(aset, "r5")["q"].b)


def test_union_of_targets_zero_fills(rng):
    gen = _gen(rng)
    params = _small_params(gen)
    cq = lj.LoraConfig(rank=2, targets="q")
    cqs = lj.LoraConfig(rank=4, targets=("q", "stack"), layouts=_STACK)
    members = _members(params, {"q": cq, "qs": cqs}, _seed(rng))
    aset = lj.adapter_set(members)
    assert aset.adapters["v"] is None
    assert aset.adapters["stack"].scale.tolist() == [0.0, cqs.scale_for("stack")]
    np.testing.assert_array_equal(aset.adapters["stack"].a[0], 0.0)
    assert lj.select_adapter(aset, "q", trim=True)["stack"] is None
    for name, (ad, cfg) in members.items():
        got = lj.merge(params, lj.select_adapter(aset, name), aset.config)
        want = lj.merge(params, ad, cfg)
        for path in params:
            assert_close(got[path], want[path], rtol=1e-6, what=f"{name}/{path}")


def test_add_replace_remove(rng):
    gen = _gen(rng)
    params = _small_params(gen)
    c2 = lj.LoraConfig(rank=2, targets=("q", "v"))
    c6 = lj.LoraConfig(rank=6, targets=("q", "v"))
    m = _members(params, {"a": c2, "b": c2, "big": c6}, _seed(rng))
    aset = lj.adapter_set({"a": m["a"]})
    aset = lj.add_adapter(aset, "big", *m["big"])
    assert aset.names == ("a", "big") and aset.config.rank == 6
    aset = lj.add_adapter(aset, "a", *m["b"], replace=True)          # same index, new values
    assert aset.names == ("a", "big")
    np.testing.assert_array_equal(lj.select_adapter(aset, "a", trim=True)["q"].b, m["b"][0]["q"].b)
    small = lj.remove_adapter(aset, "big")
    assert small.names == ("a",) and small.config.rank == 2            # padding shrinks
    np.testing.assert_array_equal(small.adapters["q"].a[0], m["b"][0]["q"].a)
    with pytest.raises(ValueError, match="already holds an adapter called 'a'"):
        lj.add_adapter(aset, "a", *m["b"])
    with pytest.raises(ValueError, match="only adapter"):
        lj.remove_adapter(small, "a")
    with pytest.raises(ValueError, match=r"no adapter called 'zz'.*\['a', 'big'\]"):
        lj.remove_adapter(aset, "zz")


# ----------------------------------------------------------------------------- hot swap


def _gpt_set(c, rng, ranks=(2, 4, 8), **cfg_kw):
    model, variables = gpt.init_linen(c, seed=0)
    layouts = {r"params/blocks/.*": lj.Layout(1, 1, 1)} if c.scan else {}
    cfgs = {f"ad{i}": lj.LoraConfig(rank=r, alpha=2.0 * r + i, targets=gpt.TARGETS,
                                    layouts=layouts, **cfg_kw) for i, r in enumerate(ranks)}
    members = _members(variables, cfgs, _seed(rng))
    return model, variables, members, lj.adapter_set(members)


@pytest.fixture(scope="module")
def small_set():
    """The small decoder with a set of 3 adapters (ranks 2, 4, 8), and jitted
    single-adapter and plain forwards (shared, so each compiles once)."""
    rng = jax.random.fold_in(jax.random.key(SEED), zlib.crc32(b"small_set"))
    model, variables, members, aset = _gpt_set(SMALL, rng)
    return dict(model=model, variables=variables, members=members, aset=aset,
                single=jax.jit(lj.apply(model.apply, aset.config)), ref=jax.jit(model.apply))


@pytest.mark.slow
def test_hot_swap_never_recompiles(rng, small_set):
    model, variables, members, aset = (small_set[k] for k in ("model", "variables", "members",
                                                              "aset"))
    tokens = jax.random.randint(rng, (1, SMALL.max_len), 0, SMALL.vocab)
    fwd = small_set["single"]
    host = jax.tree.map(np.asarray, lj.select_adapter(aset, "ad2"))   # e.g. read from disk
    outs = {}
    jax.block_until_ready(fwd(variables, lj.select_adapter(aset, 0), tokens))
    with CompileCounter() as cc:
        for _ in range(2):
            for name in aset.names:
                outs[name] = fwd(variables, lj.select_adapter(aset, name), tokens)
        outs["host"] = fwd(variables, jax.device_put(host), tokens)
        jax.block_until_ready(outs)
    assert cc.count == 0
    for name, (ad, cfg) in members.items():
        want = small_set["ref"](lj.merge(variables, ad, cfg), tokens)
        assert_close(outs[name], want, rtol=OUT_RTOL, what=name)
    np.testing.assert_array_equal(outs["host"], outs["ad2"])


# ----------------------------------------------------------------------------- mixed batches


def _check_mixed(fn, params, aset, ids, args, *, in_axes=0, out_axis=0, single=None, ref=None,
                 vs_merged=True):
    """apply_mixed == each example alone, through lj.apply with its adapter
    (and == fn(merge) / fn(params) for the base)."""
    mixed = jax.jit(lj.apply_mixed(fn, in_axes=in_axes, out_axes=out_axis))
    out = mixed(params, aset, ids, *args)
    single = single or jax.jit(lj.apply(fn, aset.config))
    ref = ref or jax.jit(fn)
    axes = in_axes if isinstance(in_axes, (tuple, list)) else [in_axes] * len(args)
    for e, i in enumerate(np.asarray(ids).tolist()):
        ex = [x if ax is None else lax.slice_in_dim(x, e, e + 1, axis=ax)
              for x, ax in zip(args, axes)]
        got = lax.slice_in_dim(out, e, e + 1, axis=out_axis)
        if i < 0:
            want = ref(params, *ex)
        else:
            want = single(params, lj.select_adapter(aset, i), *ex)
            if vs_merged:
                merged = ref(lj.merge(params, lj.select_adapter(aset, i), aset.config), *ex)
                assert_close(got, merged, rtol=OUT_RTOL, what=f"example {e} vs merged")
        assert_close(got, want, rtol=OUT_RTOL, what=f"example {e} (adapter {i})")
    return mixed, out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "scan_remat"])
def test_mixed_batch_equals_each_example_alone(rng, variant, small_set):
    if variant == "plain":
        c, jitted = SMALL, dict(single=small_set["single"], ref=small_set["ref"])
        model, variables, aset = (small_set[k] for k in ("model", "variables", "aset"))
    else:
        c, jitted = _gpt_config(scan=True, remat=True), {}
        model, variables, _, aset = _gpt_set(c, rng)
    tokens = jax.random.randint(rng, (6, c.max_len), 0, c.vocab)
    ids = jnp.asarray(np.r_[-1, _gen(rng).integers(-1, aset.n, 5)].astype(np.int32))
    mixed, out = _check_mixed(model.apply, variables, aset, ids, [tokens], **jitted)
    # the adapter assignment is data: new ids reuse the compiled program
    new_ids = jnp.asarray(np.asarray([2, 2, 0, 1, -1, 0], np.int32))
    with CompileCounter() as cc:
        other = mixed(variables, aset, new_ids, tokens)
        jax.block_until_ready(other)
    assert cc.count == 0


@pytest.mark.slow
def test_mixed_batch_conv_embedding_and_shared_args(rng):
    """dot, conv and embedding rules; batch on axis 1; a shared (unbatched) arg."""
    gen = _gen(rng)
    params = {"emb": jnp.asarray(gen.standard_normal((11, 6)), jnp.float32),
              "conv": jnp.asarray(0.3 * gen.standard_normal((3, 3, 6, 5)), jnp.float32),
              "out": jnp.asarray(gen.standard_normal((5, 4)), jnp.float32)}

    def fn(p, tokens, bias):            # tokens: (H*W, batch)
        x = p["emb"][tokens.T]          # (batch, H*W, 6)
        x = x.reshape(x.shape[0], 4, 4, 6)
        y = lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (jnp.tanh(y).mean((1, 2)) @ p["out"] + bias[None]).T      # (4, batch)

    cfgs = {"x": lj.LoraConfig(rank=2, targets=".*"), "y": lj.LoraConfig(rank=3, alpha=5,
                                                                       targets=".*")}
    aset = lj.adapter_set(_members(params, cfgs, _seed(rng)))
    tokens = jnp.asarray(gen.integers(0, 11, (16, 5)), jnp.int32)
    bias = jnp.asarray(gen.standard_normal(4), jnp.float32)
    ids = jnp.asarray([1, -1, 0, 1, 0], jnp.int32)
    e = lj.explain(fn, aset.config, params, lj.select_adapter(aset, 0), tokens[:, :1], bias)
    assert e.n_fallbacks == 0 and {r for v in e.rules.values() for r in v} == \
        {"lowrank_dot", "lowrank_conv", "lowrank_gather"}
    _check_mixed(fn, params, aset, ids, [tokens, bias], in_axes=(1, None), out_axis=1)


def test_mixed_batch_has_no_loop_over_adapters(rng):
    """The traced program is the same size for 2 and for 7 adapters."""
    gen = _gen(rng)
    params = {"w": jnp.asarray(gen.standard_normal((8, 6)), jnp.float32)}
    fn = lambda p, x: jnp.tanh(x @ p["w"])  # noqa: E731
    cfg = lj.LoraConfig(rank=2, targets="w")
    x = jnp.ones((4, 3, 8))

    def prims(jaxpr):
        out = []
        for e in jaxpr.eqns:
            out.append(str(e.primitive))
            for v in e.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                        out += prims(getattr(sub, "jaxpr", sub))
        return out

    def program(n):
        aset = lj.adapter_set({f"a{i}": (lj.init(params, cfg, key=jax.random.key(i)), cfg)
                               for i in range(n)})
        ids = jnp.zeros((4,), jnp.int32)
        return prims(jax.make_jaxpr(lj.apply_mixed(fn))(params, aset, ids, x).jaxpr)

    two, seven = program(2), program(7)
    assert two == seven and two.count("dot_general") == 3   # x W, x a, t b
    # names work too (outside jit)
    aset = lj.adapter_set({"p": (lj.init(params, cfg, key=jax.random.key(0)), cfg)})
    aset = lj.add_adapter(aset, "q", {"w": lj.LoraWeights(jnp.ones((8, 2)), jnp.ones((2, 6)),
                                                          jnp.float32(0.5))}, cfg)
    out = lj.apply_mixed(fn)(params, aset, ["q", lj.BASE, "p", "q"], x)
    np.testing.assert_array_equal(out[1], fn(params, x[1]))
    assert_close(out[3], fn(lj.merge(params, lj.select_adapter(aset, "q"), aset.config), x[3]))


# ----------------------------------------------------------------------------- composition


def _composition_set(rng, ranks=(3, 2, 4), alphas=(6.0, 2.0, 3.0)):
    gen = _gen(rng)
    params = _small_params(gen)
    cfgs = {f"m{i}": lj.LoraConfig(rank=r, alpha=al, targets=".*", layouts=_STACK)
            for i, (r, al) in enumerate(zip(ranks, alphas))}
    members = _members(params, cfgs, _seed(rng))
    return params, members, lj.adapter_set(members)


def _exact_sum(members, weights, path):
    return sum(w * _dense_delta(members[n][0][path]) for n, w in weights.items())


def test_combine_cat_is_exact_and_merge_weighted(rng):
    params, members, aset = _composition_set(rng)
    weights = {"m0": 0.7, "m1": -1.3, "m2": 0.25}
    cat = lj.combine(aset, weights, method="cat")
    assert cat.config.rank == 9 and cat.adapters["q"].a.shape == (12, 9)
    assert cat.config.scale_for("q") == 1.0 and float(cat.adapters["q"].scale) == 1.0
    merged = lj.merge(params, cat.adapters, cat.config)
    multi = lj.merge_weighted(params, aset, weights)
    for path in params:
        want = np.asarray(params[path], np.float64) + _exact_sum(members, weights, path)
        assert rel_err(merged[path], want) <= 1e-6, path
        assert rel_err(multi[path], want) <= 1e-6, path
    assert all(s.error == 0.0 for s in cat.report)
    # a sequence of weights, one per adapter, is the same thing
    seq = lj.merge_weighted(params, aset, [0.7, -1.3, 0.25])
    np.testing.assert_array_equal(seq["q"], multi["q"])


def test_combine_cat_beyond_min_in_out_stays_exact(rng):
    gen = _gen(rng)
    params = {"w": jnp.asarray(gen.standard_normal((6, 5)), jnp.float32)}
    cfg = lj.LoraConfig(rank=4, targets="w")
    members = _members(params, {"x": cfg, "y": cfg}, _seed(rng))
    cat = lj.combine(lj.adapter_set(members), {"x": 1.0, "y": 2.0}, method="cat")
    assert cat.config.rank == 5     # 8 > min(6, 5): refactorized exactly
    want = np.asarray(params["w"], np.float64) + _exact_sum(members, {"x": 1.0, "y": 2.0}, "w")
    assert rel_err(lj.merge(params, cat.adapters, cat.config)["w"], want) <= 1e-6


def test_combine_svd_full_rank_exact_and_truncation_optimal(rng):
    params, members, aset = _composition_set(rng)
    weights = {"m0": 1.0, "m1": -0.5, "m2": 2.0}
    full = lj.combine(aset, weights, method="svd", rank=9)
    for path in params:
        want = _exact_sum(members, weights, path)
        got = np.asarray(lj.merge(params, full.adapters, full.config)[path], np.float64) - \
            np.asarray(params[path], np.float64)
        assert rel_err(got, want) <= 1e-5, path    # a delta: relative to its own size
    k = 3
    trunc = lj.combine(aset, weights, method="svd", rank=k)
    assert trunc.config.rank == k
    for path in params:
        dense = _exact_sum(members, weights, path).reshape(-1, 12, 10)
        got = np.asarray(lj.merge(params, trunc.adapters, trunc.config)[path], np.float64) - \
            np.asarray(params[path], np.float64)
        rows = [s for s in trunc.report if s.path == path]
        for layer, (m, g) in enumerate(zip(dense, got.reshape(-1, 12, 10))):
            u, s, vt = np.linalg.svd(m)
            best = (u[:, :k] * s[:k]) @ vt[:k]
            assert rel_err(g, best) <= 1e-5
            row = rows[layer]
            assert row.rank_kept == k
            np.testing.assert_allclose(row.singular_values, s[:9], rtol=1e-8, atol=1e-10)
            kept = 1 - row.error_at(k) ** 2
            assert kept == pytest.approx(np.sum(s[:k] ** 2) / np.sum(s ** 2), rel=1e-9)
    assert "energy kept" in str(trunc.report)
    # default rank: the largest member rank (PEFT's default)
    assert lj.combine(aset, weights).config.rank == 4


def test_combine_linear_is_pefts_formula(rng):
    params, members, aset = _composition_set(rng, ranks=(3, 3, 3), alphas=(6.0, 2.0, 3.0))
    weights = {"m0": 0.8, "m2": -1.5}
    lin = lj.combine(aset, weights, method="linear")
    assert lin.config.rank == 3
    for path in params:
        ws = {n: w * members[n][1].scale_for(path) for n, w in weights.items()}
        a = sum(math.copysign(math.sqrt(abs(v)), v) * np.asarray(members[n][0][path].a, np.float64)
                for n, v in ws.items())
        b = sum(math.sqrt(abs(v)) * np.asarray(members[n][0][path].b, np.float64)
                for n, v in ws.items())
        np.testing.assert_allclose(lin.adapters[path].a, a, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(lin.adapters[path].b, b, rtol=1e-5, atol=1e-7)
        # the report measures how far linear is from the exact sum
        exact = _exact_sum(members, weights, path).reshape(-1, 12, 10)
        approx = (a @ b).reshape(-1, 12, 10)
        rows = [s for s in lin.report if s.path == path]
        for row, e, x in zip(rows, exact, approx):
            assert row.error == pytest.approx(np.linalg.norm(x - e) / np.linalg.norm(e), rel=1e-6)
    assert min(s.error for s in lin.report) > 0.05     # not the sum (as in PEFT)


@pytest.mark.torch
def test_combine_matches_peft_add_weighted_adapter(rng):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    gen = _gen(rng)
    d_in, d_out, r = 12, 10, 4
    params = {"lin": {"kernel": jnp.asarray(gen.standard_normal((d_in, d_out)), jnp.float32)}}
    cfgs = {"x": lj.LoraConfig(rank=r, alpha=8, targets=".*kernel"),
            "y": lj.LoraConfig(rank=r, alpha=4, targets=".*kernel")}
    members = _members(params, cfgs, _seed(rng))
    aset = lj.adapter_set(members)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(d_in, d_out, bias=False)

        def forward(self, x):
            return self.lin(x)

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=r, lora_alpha=8, target_modules=["lin"]),
                                adapter_name="x")
    model.add_adapter("y", peft.LoraConfig(r=r, lora_alpha=4, target_modules=["lin"]))
    layer = model.base_model.model.lin
    with torch.no_grad():
        for name, (ad, _) in members.items():   # ours a (in, r), b (r, out); torch A (r, in)
            layer.lora_A[name].weight.copy_(torch.tensor(np.asarray(ad["lin"]["kernel"].a).T))
            layer.lora_B[name].weight.copy_(torch.tensor(np.asarray(ad["lin"]["kernel"].b).T))
    weights = {"x": 0.6, "y": -1.2}
    for method, kw in (("cat", {}), ("linear", {}), ("svd", {"svd_rank": 8})):
        model.add_weighted_adapter(list(weights), list(weights.values()), f"c_{method}",
                                   combination_type=method, **kw)
        want = layer.get_delta_weight(f"c_{method}").detach().numpy().T      # (in, out)
        got = lj.combine(aset, weights, method=method, rank=kw.get("svd_rank"))
        dw = _dense_delta(got.adapters["lin"]["kernel"])
        assert rel_err(dw, want) <= 1e-5, method


# ----------------------------------------------------------------------------- checkpoints


def test_save_and_restore_set(rng, tmp_path):
    gen = _gen(rng)
    params = _small_params(gen)
    cfgs = {"a": lj.LoraConfig(rank=2, targets=("q", "stack"), layouts=_STACK),
            "b": lj.LoraConfig(rank=4, alpha=3, targets=".*", layouts=_STACK)}
    aset = lj.adapter_set(_members(params, cfgs, _seed(rng)))
    lj.save_set(tmp_path / "s", aset, params=params, metadata={"note": "x"})
    back = lj.restore_set(tmp_path / "s", params=params)
    assert back.names == aset.names and back.members == aset.members
    assert back.config == aset.config
    for x, y in zip(jax.tree.leaves(back.adapters), jax.tree.leaves(aset.adapters)):
        np.testing.assert_array_equal(x, y)
    flat = lj.restore_set(tmp_path / "s")            # no params: flat {path: node}
    np.testing.assert_array_equal(flat.adapters["stack"].a, aset.adapters["stack"].a)
    np.testing.assert_array_equal(lj.select_adapter(flat, "a", trim=True)["q"].b,
                                  lj.select_adapter(aset, "a", trim=True)["q"].b)
    assert lj.checkpoint_info(tmp_path / "s").metadata["note"] == "x"
    one, one_cfg = _members(params, {"a": cfgs["a"]}, 0)["a"]
    lj.save(tmp_path / "one", one, one_cfg)
    with pytest.raises(lj.CheckpointError, match="single adapter, not an adapter set"):
        lj.restore_set(tmp_path / "one")
    with pytest.raises(ValueError, match="reserved"):
        lj.save_set(tmp_path / "t", aset, metadata={"lora_jax.adapter_set": 1})


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def err(tmp_path_factory):
    """Shared inputs of the error cases: a two-adapter set over ``_small_params``."""
    gen = np.random.default_rng(zlib.crc32(b"errors") ^ SEED)
    params = _small_params(gen)
    cfg = lj.LoraConfig(rank=2, targets=("q", "v"))
    ad = random_adapters(params, cfg, seed=int(gen.integers(2**31)))
    aset = lj.adapter_set({"a": (ad, cfg), "b": (ad, cfg)})

    def saved(set_metadata):
        """A single-set checkpoint whose adapter-set metadata is ``set_metadata``."""
        path = tmp_path_factory.mktemp("set") / "ckpt"
        lj.save(path, aset.adapters, aset.config,
                metadata={"lora_jax.adapter_set": set_metadata})
        return path

    return SimpleNamespace(params=params, cfg=cfg, ad=ad, aset=aset, x=jnp.ones((3, 12)),
                           mixed=lj.apply_mixed(_q_matmul), saved=saved)


def _q_matmul(p, x):
    return x @ p["q"]


def _ids(*ids):
    return jnp.asarray(ids, jnp.int32)


def _adapters_for(e, **leaves):
    """Random adapters of ``e.cfg`` for ``e.params`` with some leaves replaced."""
    return random_adapters({**e.params, **leaves}, e.cfg, seed=3)


def _without_stack(e):
    return random_adapters({"q": e.params["q"], "v": e.params["v"]}, e.cfg, seed=2)


def _bf16(tree):
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim else x, tree)


def _fully_trained(e):
    tcfg = e.cfg.replace(train="stack")
    return random_adapters(e.params, tcfg, seed=1), tcfg


def _with_rank4(e):
    c4 = e.cfg.replace(rank=4)
    return lj.add_adapter(e.aset, "c", random_adapters(e.params, c4, seed=5), c4)


def _b_transposed(e):
    q = e.ad["q"]
    return {**e.ad, "q": lj.LoraWeights(q.a, q.b.T, q.scale)}


def _with_magnitude(e):
    return {**e.ad, "q": e.ad["q"]._replace(m=jnp.ones((10,)))}


_BAD_SET_META = {"names": ["a"], "ranks": [[["q", 2], ["v", 2]]]}   # + "configs" in the case


def _case(id, exc, match, call):
    return pytest.param(exc, match, call, id=id)


ERROR_CASES = [
    # --- lj.adapter_set: its argument
    _case("set-reserved-base-name", ValueError, r"'__base__' is reserved",
          lambda e: lj.adapter_set({lj.BASE: (e.ad, e.cfg)})),
    _case("set-duplicate-names", ValueError, r"names must be unique; \['a'\] appear more than once",
          lambda e: lj.adapter_set([("a", e.ad, e.cfg), ("a", e.ad, e.cfg)])),
    _case("set-empty", ValueError, "needs at least one adapter",
          lambda e: lj.adapter_set({})),
    _case("set-config-not-a-LoraConfig", TypeError,
          r"adapter 'a': expected its lj.LoraConfig, got str. Fix: pass \(adapters, config\) pairs",
          lambda e: lj.adapter_set({"a": (e.ad, "cfg")})),
    _case("set-value-not-a-pair", TypeError,
          r"adapter 'a': expected an \(adapters, config\) pair, got dict",
          lambda e: lj.adapter_set({"a": e.ad})),
    _case("set-sequence-not-triples", TypeError, r"expected \(name, adapters, config\) triples",
          lambda e: lj.adapter_set([("a", e.ad)])),
    _case("set-not-a-dict-or-sequence", TypeError,
          r"adapter_set takes \{name: \(adapters, config\)\} .*; got ArrayImpl",
          lambda e: lj.adapter_set(e.ad["q"].a)),
    _case("set-empty-name", TypeError, r"adapter names must be non-empty strs; got ''",
          lambda e: lj.adapter_set({"": (e.ad, e.cfg)})),
    # --- lj.adapter_set: each member against its config and the others
    _case("member-rank-vs-config", ValueError, r"q: adapter 'a' has rank 2 but its config gives "
          "rank 3", lambda e: lj.adapter_set({"a": (e.ad, e.cfg.replace(rank=3))})),
    _case("member-tree-structure", ValueError,
          r"(?s)adapter 'b' does not have the tree structure of 'a'.*only in 'a': \['stack'\]",
          lambda e: lj.adapter_set({"a": (e.ad, e.cfg), "b": (_without_stack(e), e.cfg)})),
    _case("member-dtype", ValueError, r"q: adapter 'b' has a/b dtypes bfloat16/bfloat16, "
          "adapter 'a' has float32/float32",
          lambda e: lj.adapter_set({"a": (e.ad, e.cfg), "b": (_bf16(e.ad), e.cfg)})),
    _case("member-shape", ValueError, r"q: adapter 'b' has \(stacked, in, out\) = "
          r"\(\(\), 12, 7\), adapter 'a' has \(\(\), 12, 10\)",
          lambda e: lj.adapter_set({"a": (e.ad, e.cfg),
                                    "b": (_adapters_for(e, q=jnp.zeros((12, 7))), e.cfg)})),
    _case("member-fully-trained-leaf", ValueError, "stack: adapter 'a' has a fully-trained leaf",
          lambda e: lj.adapter_set({"a": _fully_trained(e)})),
    _case("member-is-already-a-set", ValueError, r"q: adapter 'x' has a scale of shape \(2,\)",
          lambda e: lj.adapter_set({"x": (e.aset.adapters, e.cfg)})),
    _case("member-not-a-lora-pair", ValueError,
          r"q: adapter 'a' has a \(12, 2\) and b \(10, 2\), not a LoRA pair",
          lambda e: lj.adapter_set({"a": (_b_transposed(e), e.cfg)})),
    _case("member-dora", ValueError, "q: adapter 'a' has a DoRA magnitude m here but its config "
          "has use_dora=False",
          lambda e: lj.adapter_set({"a": (_with_magnitude(e), e.cfg)})),
    _case("member-without-lora", ValueError, "adapter 'a' holds no LoraWeights",
          lambda e: lj.adapter_set({"a": ({"q": None, "v": None, "stack": None}, e.cfg)})),
    _case("add-a-set-as-member", TypeError, "adapter 'c': got an AdapterSet where one adapter",
          lambda e: lj.add_adapter(e.aset, "c", e.aset, e.cfg)),
    # --- select_adapter / adapter_ids
    _case("select-not-a-set", TypeError, r"lj.select_adapter: expected an lj.AdapterSet, got dict",
          lambda e: lj.select_adapter(e.ad, "a")),
    _case("select-index-out-of-range", ValueError,
          r"adapter index 5 is out of range for a set of 2 adapters \['a', 'b'\]",
          lambda e: lj.select_adapter(e.aset, 5)),
    _case("select-by-float", TypeError, r"named by a str \(or an int index\); got float 1.5",
          lambda e: lj.select_adapter(e.aset, 1.5)),
    _case("ids-unknown-name", ValueError, r"example 1: no adapter called 'c'; the set holds "
          r"\['a', 'b'\]", lambda e: lj.adapter_ids(e.aset, ["a", "c"])),
    _case("ids-str-not-sequence", TypeError, "must be a sequence of adapter names.*got str",
          lambda e: lj.adapter_ids(e.aset, "a")),
    # --- apply_mixed: construction
    _case("mixed-fn-not-callable", TypeError, "fn must be callable; got str",
          lambda e: lj.apply_mixed("model")),
    _case("mixed-strict-not-bool", TypeError, "strict must be a bool; got 1",
          lambda e: lj.apply_mixed(lambda p, x: x, strict=1)),
    _case("mixed-in_axes-str", ValueError, r"in_axes='0' must be an int, None, or a tuple",
          lambda e: lj.apply_mixed(lambda p, x: x, in_axes="0")),
    _case("mixed-negative-out_axes", ValueError, r"out_axes=-1 must be an int >= 0",
          lambda e: lj.apply_mixed(_q_matmul, out_axes=-1)),
    # --- apply_mixed: call
    _case("mixed-id-out-of-range", ValueError, r"adapter_ids hold \[2\], outside \[-1, 2\)",
          lambda e: e.mixed(e.params, e.aset, _ids(0, 2, 1), e.x)),
    _case("mixed-ids-not-1d", ValueError,
          r"adapter_ids must be one int per example \(shape \(batch,\)\), got int32\(3, 1\)",
          lambda e: e.mixed(e.params, e.aset, jnp.zeros((3, 1), jnp.int32), e.x)),
    _case("mixed-batch-vs-ids", ValueError, r"argument 0 has a leaf of shape \(3, 12\) whose "
          "axis 0 should hold the 2 examples",
          lambda e: e.mixed(e.params, e.aset, _ids(0, 1), e.x)),
    _case("mixed-in_axes-length", ValueError,
          r"in_axes=\(0, 0\) must be .* one int/None per positional argument of fn after params "
          r"\(1 given\)",
          lambda e: lj.apply_mixed(_q_matmul, in_axes=(0, 0))(e.params, e.aset, _ids(0, 1, 0),
                                                             e.x)),
    _case("mixed-output-without-batch", ValueError,
          r"output for one example has shape \(\), with no example axis 0",
          lambda e: lj.apply_mixed(lambda p, x: _q_matmul(p, x).sum())(e.params, e.aset,
                                                                     _ids(0, 1, 0), e.x)),
    _case("mixed-not-a-set", TypeError, r"lj.apply_mixed: expected an lj.AdapterSet, got dict",
          lambda e: e.mixed(e.params, e.ad, _ids(0, 1, 0), e.x)),
    # --- combine / merge_weighted
    _case("combine-unknown-method", ValueError,
          r"method='ties' is not one of \('cat', 'svd', 'linear'\)",
          lambda e: lj.combine(e.aset, {"a": 1.0}, method="ties")),
    _case("combine-rank-without-svd", ValueError,
          r"rank= applies to method='svd' only .*; got method='cat'",
          lambda e: lj.combine(e.aset, {"a": 1.0}, method="cat", rank=2)),
    _case("combine-rank-zero", ValueError, "rank=0 must be a positive int",
          lambda e: lj.combine(e.aset, {"a": 1.0}, rank=0)),
    _case("combine-nan-weight", ValueError, "the weight of 'a' is nan; weights must be finite",
          lambda e: lj.combine(e.aset, {"a": float("nan")})),
    _case("combine-too-many-weights", ValueError, r"3 weights for a set of 2 adapters \['a', 'b'\]",
          lambda e: lj.combine(e.aset, [1.0, 2.0, 4.0])),
    _case("combine-weights-not-dict-or-sequence", TypeError,
          r"weights must be \{name: weight\} or a sequence .*; got float",
          lambda e: lj.combine(e.aset, 1.0)),
    _case("combine-no-weights", ValueError, "no adapters to combine: weights is empty",
          lambda e: lj.combine(e.aset, {})),
    _case("combine-linear-mixed-ranks", ValueError,
          r"method='linear': q has adapters of different ranks \{'a': 2, 'c': 4\}",
          lambda e: lj.combine(_with_rank4(e), {"a": 1.0, "c": 1.0}, method="linear")),
    _case("merge_weighted-base-weight", ValueError,
          "'__base__' is not an adapter and can't be weighted",
          lambda e: lj.merge_weighted(e.params, e.aset, {lj.BASE: 1.0})),
    # --- restore_set: a step whose set metadata is damaged or does not fit its arrays
    _case("restore-meta-vs-arrays", lj.CheckpointError,
          r"metadata names 1 adapters but the arrays hold \(2,\); the step is inconsistent",
          lambda e: lj.restore_set(e.saved({**_BAD_SET_META, "configs": [e.cfg.to_dict()]}))),
    _case("restore-meta-unreadable", lj.CheckpointError,
          r"adapter-set metadata can't be read \(KeyError: 'configs'\)",
          lambda e: lj.restore_set(e.saved({"names": ["a", "b"]}))),
]


@pytest.mark.parametrize("exc, match, call", ERROR_CASES)
def test_errors(err, exc, match, call):
    with pytest.raises(exc, match=match):
        call(err)


@pytest.mark.slow
def test_mixed_batch_on_a_quantized_base(rng):
    """QLoRA: the frozen weights are NF4 containers, dequantized at their use."""
    gen = _gen(rng)
    params = {"l1": {"kernel": jnp.asarray(gen.standard_normal((64, 64)) / 8, jnp.float32)},
              "l2": {"kernel": jnp.asarray(gen.standard_normal((64, 32)) / 8, jnp.float32)}}
    fn = lambda p, x: jax.nn.gelu(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]  # noqa: E731
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*kernel")
    quantized = lj.quantize(params, config=cfg)
    aset = lj.adapter_set(_members(params, {"x": cfg, "y": cfg.replace(rank=2)}, _seed(rng)))
    x = jnp.asarray(gen.standard_normal((4, 3, 64)), jnp.float32)
    _check_mixed(fn, quantized, aset, jnp.asarray([1, -1, 0, 1], jnp.int32), [x],
                 ref=jax.jit(lambda p, x: fn(lj.dequantize(p), x)),
                 vs_merged=False)   # merging into NF4 would requantize
