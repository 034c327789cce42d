"""analyze / truncate / extract, checked against dense float64 numpy SVDs.

Tolerances: `analyze` and `truncate` work in float64 from the factors, so
singular values agree with the dense float64 SVD of the same factors to
1e-9 of the largest. Adapters written back in float32 (truncate) or
computed by a float32 SVD (extract) agree to 1e-5 of the largest entry;
bfloat16 factors to 2e-2.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._analysis import analyze as _analysis
from lora_jax._analysis import extract as _extract
from examples import gpt
from tests._asserts import assert_close, perturb_b, rel_err
from tests.conftest import SMALL


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _dense(node):
    """scale * a @ b in float64, shape (*lead, in, out)."""
    a, b = _f64(node.a), _f64(node.b)
    s = _f64(node.scale)
    s = s.reshape(s.shape + (1,) * (a.ndim - s.ndim))
    return s * np.matmul(a, b)


def _np_rng(key):
    """A numpy Generator seeded from the test's PRNG key (no per-shape compiles)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())


def _random_adapters(rng, shapes, *, rank, dtype=jnp.float32, stacked=None):
    """params {name: W} and adapters with random a and b (nonzero update)."""
    g = _np_rng(rng)
    params, ad = {}, {}
    for name, (n_in, n_out) in shapes.items():
        lead = () if stacked is None else (stacked,)
        params[name] = jnp.asarray(g.standard_normal((*lead, n_in, n_out)), jnp.float32)
        a = g.standard_normal((*lead, n_in, rank))
        b = 0.1 * g.standard_normal((*lead, rank, n_out))
        ad[name] = lj.LoraWeights(jnp.asarray(a, dtype), jnp.asarray(b, dtype),
                                  jnp.float32(1.5))
    return params, ad


# ----------------------------------------------------------------------------- analyze


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_analyze_matches_dense_svd(rng, dtype):
    params, ad = _random_adapters(rng, {"q": (48, 40), "fc": (40, 96)}, rank=6, dtype=dtype)
    cfg = lj.LoraConfig(rank=6, alpha=9, targets="q|fc")
    rep = lj.analyze(params, ad, cfg)
    assert [s.path for s in rep] == ["fc", "q"]
    for s in rep:
        dw = _dense(ad[s.path])
        ref = np.linalg.svd(dw, compute_uv=False)
        assert s.shape == dw.shape and s.layer == ()
        np.testing.assert_allclose(s.singular_values, ref[:6], rtol=0, atol=1e-9 * ref[0])
        assert np.all(ref[6:] < 1e-9 * ref[0])           # the update has rank <= r
        assert math.isclose(s.norm, np.linalg.norm(dw), rel_tol=1e-9)
        assert math.isclose(s.relative_norm, np.linalg.norm(dw) / np.linalg.norm(
            _f64(params[s.path])), rel_tol=1e-6)
        # Effective-rank measures from their definitions on the reference.
        e = np.cumsum(ref ** 2) / np.sum(ref ** 2)
        assert s.rank_for_energy(0.9) == int(np.argmax(e >= 0.9)) + 1
        assert s.rank_for_energy(0.99) == int(np.argmax(e >= 0.99)) + 1
        p = ref[:6] / ref[:6].sum()
        assert math.isclose(s.effective_rank, math.exp(-np.sum(p * np.log(p))), rel_tol=1e-8)
        for k in range(7):
            approx = np.linalg.norm(ref[k:]) / np.linalg.norm(ref)
            assert math.isclose(s.error_at(k), approx, rel_tol=1e-7, abs_tol=1e-9)


def test_analyze_stacked_and_structured(rng):
    """A scan-stacked leaf: one row per layer, each equal to that layer's dense SVD."""
    params, ad = _random_adapters(rng, {"w": (24, 20)}, rank=4, stacked=3)
    # alpha 6 / rank 4 = the adapters' scale 1.5
    cfg = lj.LoraConfig(rank=4, alpha=6, targets="w", layouts={"w": lj.Layout(1, 1, 1)})
    rep = lj.analyze(params, ad, cfg)
    assert [s.layer for s in rep] == [(0,), (1,), (2,)]
    dw = _dense(ad["w"])
    for s in rep:
        ref = np.linalg.svd(dw[s.layer], compute_uv=False)[:4]
        np.testing.assert_allclose(s.singular_values, ref, rtol=0, atol=1e-9 * ref[0])
        w = _f64(params["w"][s.layer])
        assert math.isclose(s.base_norm, np.linalg.norm(w), rel_tol=1e-6)
    dicts = rep.to_dicts()
    assert dicts[1]["layer"] == [1] and dicts[1]["shape"] == [24, 20]
    assert dicts[1]["singular_values"] == [float(x) for x in rep.spectra[1].singular_values]
    text = str(rep)
    assert "|dW|/|W|" in text and len(text.splitlines()) == 2 + 3
    assert len(rep.summary().splitlines()) == 3


def test_analyze_gpt_skips_train_and_frozen(rng, small_gpt):
    _, variables = small_gpt
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=gpt.TARGETS, train=r".*/ln_f/scale")
    ad = perturb_b(lj.init(variables, cfg, key=rng), key=jax.random.fold_in(rng, 1))
    rep = lj.analyze(variables, ad, cfg)
    assert len(rep) == 6 * SMALL.n_layers
    specs = lj.describe(variables, cfg).specs
    for s in rep:
        node, spec = _get(ad, s.path), specs[s.path]
        assert s.shape == (spec.in_size, spec.out_size)
        ref = np.linalg.svd(_dense(node), compute_uv=False)[:4]
        np.testing.assert_allclose(s.singular_values, ref, rtol=0, atol=1e-9 * ref[0])
        w = _f64(_get(variables, s.path))
        assert math.isclose(s.relative_norm, np.linalg.norm(_dense(node)) / np.linalg.norm(w),
                            rel_tol=1e-6)
    # Without params: same spectra (no base norms).
    rep2 = lj.analyze(None, ad, cfg)
    assert [s.path for s in rep2] == [s.path for s in rep]
    assert all(s.base_norm is None for s in rep2)
    np.testing.assert_array_equal(rep2.spectra[0].singular_values,
                                  rep.spectra[0].singular_values)


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def test_analyze_never_forms_the_dense_update(rng):
    """in = out = 2e5 at rank 4: the dense update would need 160 GB."""
    g = _np_rng(rng)
    a = jnp.asarray(g.standard_normal((200_000, 4)), jnp.float32)
    b = jnp.asarray(g.standard_normal((4, 200_000)), jnp.float32)
    ad = {"w": lj.LoraWeights(a, b, jnp.float32(0.5))}
    s = lj.analyze(None, ad, lj.LoraConfig(rank=4, targets="w")).spectra[0]
    # Reference from the 4x4 Gram matrices: sv(dW)^2 = eig((A^T A)(B B^T)) * s^2.
    ga, gb = _f64(a).T @ _f64(a), _f64(b) @ _f64(b).T
    ref = np.sqrt(np.sort(np.linalg.eigvals(ga @ gb).real)[::-1]) * 0.5
    np.testing.assert_allclose(s.singular_values, ref, rtol=1e-8)


def test_analyze_zero_update():
    ad = {"w": lj.LoraWeights(jnp.ones((8, 2)), jnp.zeros((2, 5)), jnp.float32(1.0))}
    s = lj.analyze(None, ad, lj.LoraConfig(rank=2, targets="w")).spectra[0]
    assert s.norm == 0 and s.effective_rank == 0 and s.rank_for_energy(0.9) == 0
    assert s.error_at(0) == 0 and np.all(s.energy == 0)


def test_analyze_adapter_set_scales(rng):
    """A leading adapter axis with one scale per adapter."""
    g = _np_rng(rng)
    a = jnp.asarray(g.standard_normal((2, 10, 3)), jnp.float32)
    b = jnp.asarray(g.standard_normal((2, 3, 7)), jnp.float32)
    ad = {"w": lj.LoraWeights(a, b, jnp.array([1.0, 4.0]))}
    rep = lj.analyze(None, ad, lj.LoraConfig(rank=3, targets="w"))
    s0, s1 = rep.spectra
    dw = _dense(ad["w"])
    for s, d in ((s0, dw[0]), (s1, dw[1])):
        np.testing.assert_allclose(s.singular_values, np.linalg.svd(d, compute_uv=False)[:3],
                                   rtol=1e-9)


def test_analyze_errors():
    cfg = lj.LoraConfig(rank=2, targets="w")
    good = lj.LoraWeights(jnp.ones((4, 2)), jnp.ones((2, 3)), jnp.float32(1))
    with pytest.raises(ValueError, match=r"w: the adapter has rank 2 .* rank 3.*truncate"):
        lj.analyze(None, {"w": good}, lj.LoraConfig(rank=3, targets="w"))
    with pytest.raises(ValueError, match=r"w: a \(4, 2\) and b \(3, 3\) do not form"):
        lj.analyze(None, {"w": good._replace(b=jnp.ones((3, 3)))}, cfg)
    with pytest.raises(ValueError, match="holds no LoraWeights"):
        lj.analyze(None, {"w": None, "h": jnp.ones(3)}, cfg)
    with pytest.raises(TypeError, match="LoraConfig"):
        lj.analyze(None, {"w": good}, {"rank": 2})
    with pytest.raises(ValueError, match=r"w: adapter shapes do not fit"):
        lj.analyze({"w": jnp.ones((5, 3))}, {"w": good}, cfg)
    s = lj.analyze(None, {"w": good}, cfg).spectra[0]
    with pytest.raises(ValueError, match="energy fraction"):
        s.rank_for_energy(1.5)


# ----------------------------------------------------------------------------- truncate


def _best_rank_k(dw, k):
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    return (u[..., :, :k] * s[..., None, :k]) @ vt[..., :k, :]


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_truncate_rank_is_best_approximation(rng, use_rslora):
    params, ad = _random_adapters(rng, {"q": (40, 32), "v": (32, 48)}, rank=8, stacked=2)
    lay = {".*": lj.Layout(1, 1, 1)}
    cfg = lj.LoraConfig(rank=8, alpha=16, targets="q|v", layouts=lay, use_rslora=use_rslora)
    ad = {p: n._replace(scale=jnp.float32(cfg.scale_for(p))) for p, n in ad.items()}
    out, cfg2, report = lj.truncate(ad, cfg, rank=3)
    assert cfg2 == cfg.replace(rank=3)
    merged = lj.merge(params, out, cfg2)            # valid for merge with the new config
    for p in ("q", "v"):
        node = out[p]
        assert node.a.shape == (2, ad[p].a.shape[1], 3) and node.a.dtype == jnp.float32
        assert float(node.scale) == pytest.approx(cfg2.scale_for(p))
        assert float(node.scale) == pytest.approx(16 / (math.sqrt(3) if use_rslora else 3))
        dw = _dense(ad[p])
        want = _f64(params[p]) + _best_rank_k(dw, 3)
        assert_close(merged[p], want, rtol=1e-5, what=p)
        # The singular values are split evenly: a^T a == b b^T == diag(S / scale).
        ata = np.einsum("lir,lis->lrs", _f64(node.a), _f64(node.a))
        bbt = np.einsum("lri,lsi->lrs", _f64(node.b), _f64(node.b))
        np.testing.assert_allclose(ata, bbt, atol=1e-4 * np.abs(ata).max())
    for row in report:
        dw = _dense(ad[row.path])[row.layer]
        err = np.linalg.norm(dw - _best_rank_k(dw, 3)) / np.linalg.norm(dw)
        assert row.rank_kept == 3 and math.isclose(row.error, err, rel_tol=1e-6)
    assert "energy kept" in str(report)


def test_truncate_energy_per_leaf(rng):
    """energy=f keeps per leaf the smallest rank reaching f in every layer."""
    g = _np_rng(rng)
    # Layer spectra with known shapes: diag singular values in orthonormal bases.
    q1, _ = np.linalg.qr(g.standard_normal((30, 6)))
    q2, _ = np.linalg.qr(g.standard_normal((20, 6)))
    sv = np.array([[10.0, 1.0, 0.5, 0.1, 0.0, 0.0],      # 99%: 2
                    [10.0, 8.0, 6.0, 3.0, 0.1, 0.0]])     # 99%: 4
    a = jnp.asarray(np.stack([q1 * s for s in sv]), jnp.float32)
    b = jnp.asarray(np.stack([q2.T, q2.T]), jnp.float32)
    other = g.standard_normal((16, 6)) @ np.diag([5.0, 1e-3, 0, 0, 0, 0])
    ad = {"s": lj.LoraWeights(a, b, jnp.float32(1.0)),
          "u": lj.LoraWeights(jnp.asarray(other, jnp.float32),
                              jnp.asarray(g.standard_normal((6, 12)), jnp.float32),
                              jnp.float32(1.0)),
          "head": jnp.ones(3)}
    cfg = lj.LoraConfig(rank=6, alpha=6, targets="s|u", train="head",
                        layouts={"s": lj.Layout(1, 1, 1)})
    out, cfg2, rep = lj.truncate(ad, cfg, energy=0.99)
    assert out["s"].a.shape[-1] == 4 and out["u"].a.shape[-1] == 1
    assert cfg2.rank_for("s") == 4 and cfg2.rank_for("u") == 1 and cfg2.rank == 6
    assert out["head"] is ad["head"]
    for row in rep:
        assert 1.0 - row.error ** 2 >= 0.99 - 1e-12
        dw = _dense(ad[row.path])[row.layer]
        k = row.rank_kept
        got = _dense(out[row.path])[row.layer]
        assert rel_err(got, _best_rank_k(dw, k)) < 1e-5
    # The config it returns validates the adapters (merge path).
    params = {"s": jnp.zeros((2, 30, 20)), "u": jnp.zeros((16, 12)), "head": jnp.zeros(3)}
    lj.merge(params, out, cfg2)


def test_truncate_keeps_lower_ranks_and_dtype(rng):
    _, ad = _random_adapters(rng, {"w": (20, 16)}, rank=4, dtype=jnp.bfloat16)
    cfg = lj.LoraConfig(rank=4, targets="w")
    out, cfg2, rep = lj.truncate(ad, cfg, rank=4)
    assert out["w"] is ad["w"] and cfg2 is cfg and rep.spectra[0].error == pytest.approx(0)
    out, cfg2, _ = lj.truncate(ad, cfg, rank=2)
    assert out["w"].a.dtype == jnp.bfloat16 and out["w"].b.dtype == jnp.bfloat16
    ref = _best_rank_k(_dense(ad["w"]), 2)
    assert rel_err(_dense(out["w"]), ref) < 2e-2


def test_truncate_mixed_ranks_use_rank_pattern(rng):
    _, ad = _random_adapters(rng, {"a/w": (20, 16)}, rank=4)
    _, ad2 = _random_adapters(jax.random.fold_in(rng, 1), {"b/w": (20, 16)}, rank=2)
    ad = {"a": {"w": ad["a/w"]}, "b": {"w": ad2["b/w"]}}
    cfg = lj.LoraConfig(rank=4, targets=".*/w", rank_pattern={"b/.*": 2})
    out, cfg2, _ = lj.truncate(ad, cfg, rank=3)
    assert out["b"]["w"] is ad["b"]["w"]
    assert cfg2.rank_for("a/w") == 3 and cfg2.rank_for("b/w") == 2
    assert cfg2.rank_pattern[0] == (re.escape("a/w"), 3)
    lj.analyze(None, out, cfg2)   # consistent


def test_truncate_errors(rng):
    _, ad = _random_adapters(rng, {"w": (8, 6)}, rank=2)
    cfg = lj.LoraConfig(rank=2, targets="w")
    with pytest.raises(ValueError, match="exactly one of rank=k or energy=f"):
        lj.truncate(ad, cfg)
    with pytest.raises(ValueError, match="exactly one"):
        lj.truncate(ad, cfg, rank=1, energy=0.9)
    with pytest.raises(ValueError, match="rank=0 must be a positive int"):
        lj.truncate(ad, cfg, rank=0)
    with pytest.raises(ValueError, match=r"energy=1.5 must be a fraction in \(0, 1\]"):
        lj.truncate(ad, cfg, energy=1.5)
    with pytest.raises(ValueError, match="w: the adapter has rank 2"):
        lj.truncate(ad, lj.LoraConfig(rank=4, targets="w"), rank=1)


# ----------------------------------------------------------------------------- extract


def _low_rank_plus_noise(g, n_in, n_out, true_rank, noise):
    """The seed's synthetic update: a rank-`true_rank` signal plus Gaussian noise
    (entries of size ~1 and ~noise)."""
    u = g.standard_normal((n_in, true_rank))
    v = g.standard_normal((true_rank, n_out)) / math.sqrt(true_rank)
    return jnp.asarray(u @ v + noise * g.standard_normal((n_in, n_out)), jnp.float32)


def test_extract_elbow_at_true_rank(rng):
    """The seed's experiment: the error curve has a sharp elbow at the true rank."""
    g = _np_rng(rng)
    base = {"w": jnp.asarray(g.standard_normal((256, 192)), jnp.float32), "b": jnp.zeros(192)}
    dw = _low_rank_plus_noise(g, 256, 192, true_rank=16, noise=0.01)
    tuned = {"w": base["w"] + dw, "b": base["b"]}
    cfg = lj.LoraConfig(rank=16, alpha=32, targets="w")
    adapters, rep = lj.extract(base, tuned, cfg)
    row = rep.spectra[0]
    dw64 = _f64(tuned["w"]) - _f64(base["w"])
    ref = np.linalg.svd(dw64, compute_uv=False)
    np.testing.assert_allclose(row.singular_values, ref, rtol=0, atol=1e-5 * ref[0])
    errs = np.array([row.error_at(k) for k in range(40)])
    ref_errs = np.array([np.linalg.norm(ref[k:]) / np.linalg.norm(ref) for k in range(40)])
    np.testing.assert_allclose(errs, ref_errs, atol=1e-4)
    # The elbow: dropping from rank 15 to 16 cuts the error ~10x; past 16 it barely moves.
    assert errs[15] > 5 * errs[16]
    assert errs[16] - errs[32] < 0.25 * errs[16]
    # The rank-16 adapters reach the optimum, and merge reproduces it.
    best = np.linalg.norm(dw64 - _best_rank_k(dw64, 16)) / np.linalg.norm(dw64)
    assert row.rank_kept == 16 and math.isclose(row.error, best, rel_tol=1e-3)
    merged = lj.merge(base, adapters, cfg)
    assert rel_err(merged["w"], _f64(base["w"]) + _best_rank_k(dw64, 16)) < 1e-5
    assert float(adapters["w"].scale) == 2.0 and adapters["b"] is None


def test_extract_randomized_matches_exact(rng, monkeypatch):
    """auto switches to the randomized SVD past a size (1024; lowered here to keep
    the test fast); it reaches the optimal error."""
    monkeypatch.setattr(_extract, "_EXACT_SVD_MAX", 256)
    g = _np_rng(rng)
    base = {"w": jnp.zeros((400, 300))}
    dw = _low_rank_plus_noise(g, 400, 300, true_rank=8, noise=0.1)
    tuned = {"w": dw}
    cfg = lj.LoraConfig(rank=8, alpha=8, targets="w")
    adapters, rep = lj.extract(base, tuned, cfg, key=rng)
    row = rep.spectra[0]
    assert len(row.singular_values) == 8 + 10 and row.tail_energy > 0   # randomized
    dw64 = _f64(dw)
    ref = np.linalg.svd(dw64, compute_uv=False)
    np.testing.assert_allclose(row.singular_values[:8], ref[:8], rtol=1e-4)
    best = np.linalg.norm(ref[8:]) / np.linalg.norm(ref)
    assert best * (1 - 1e-5) <= row.error <= best * (1 + 1e-3)   # f32 rounding below
    assert math.isclose(row.norm, np.linalg.norm(ref), rel_tol=1e-5)
    assert math.isclose(row.error_at(8), best, rel_tol=1e-3)


def test_extract_stacked_train_and_bf16(rng):
    g = _np_rng(rng)
    base = {"w": jnp.asarray(g.standard_normal((3, 40, 30)), jnp.float32), "head": jnp.zeros(5)}
    dw = jnp.stack([_low_rank_plus_noise(g, 40, 30, 4, 0.0) for i in range(3)])
    tuned = {"w": base["w"] + dw, "head": jnp.ones(5)}
    cfg = lj.LoraConfig(rank=4, targets="w", train="head", dtype=jnp.bfloat16,
                        layouts={"w": lj.Layout(1, 1, 1)})
    ad, rep = lj.extract(base, tuned, cfg, svd="randomized", key=rng)
    assert ad["w"].a.shape == (3, 40, 4) and ad["w"].a.dtype == jnp.bfloat16
    assert [r.layer for r in rep] == [(0,), (1,), (2,)]
    np.testing.assert_array_equal(np.asarray(ad["head"]), np.ones(5))
    merged = lj.merge(base, ad, cfg)
    assert rel_err(merged["w"] - base["w"], dw) < 2e-2    # exact rank 4, bf16 factors
    for r in rep:
        assert r.error < 2e-2


def test_extract_warns_on_untargeted_changes_and_errors(rng):
    base = {"w": jnp.zeros((8, 6)), "bias": jnp.zeros(6)}
    tuned = {"w": jnp.ones((8, 6)), "bias": jnp.ones(6)}
    cfg = lj.LoraConfig(rank=1, targets="w")
    with pytest.warns(lj.LoraWarning, match=r"\['bias'\].*LoraConfig.train"):
        ad, rep = lj.extract(base, tuned, cfg)
    assert rep.spectra[0].error < 1e-6 and ad["bias"] is None
    with pytest.raises(ValueError, match="bias: base has shape \\(6,\\), tuned has \\(7,\\)"):
        lj.extract(base, {"w": tuned["w"], "bias": jnp.ones(7)}, cfg)
    with pytest.raises(ValueError, match=r"(?s)tuned_params does not mirror base_params.*missing from tuned_params: \['bias'\]"):
        lj.extract(base, {"w": tuned["w"]}, cfg)
    with pytest.raises(ValueError, match="svd='full'"):
        lj.extract(base, tuned, cfg, svd="full")
    with pytest.raises(ValueError, match="oversample=-1"):
        lj.extract(base, tuned, cfg, oversample=-1)
    with pytest.raises(ValueError, match="matched no leaf"):
        lj.extract(base, tuned, lj.LoraConfig(rank=1, targets="nope"))


def test_spectra_summary_of_a_checkpoint(rng, tmp_path):
    params, ad = _random_adapters(rng, {"q": (24, 16), "v": (24, 16)}, rank=4)
    cfg = lj.LoraConfig(rank=4, alpha=6, targets="q|v")
    lj.save(tmp_path / "ck", ad, cfg, params=params)
    text = _analysis.spectra_summary(tmp_path / "ck")
    rows = {line.split()[0]: line.split() for line in text.splitlines()[3:]}
    assert set(rows) == {"q", "v"}
    ref = lj.analyze(None, ad, cfg)
    for s in ref:
        assert rows[s.path][4] == f"{s.norm:.3g}" and rows[s.path][7] == f"{s.effective_rank:.2f}"


def test_cli_inspect_shows_spectra(rng, tmp_path, capsys):
    from lora_jax.__main__ import main

    params, ad = _random_adapters(rng, {"q": (24, 16)}, rank=4)
    cfg = lj.LoraConfig(rank=4, alpha=6, targets="q")
    lj.save(tmp_path / "ck", ad, cfg, params=params)
    assert main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    s = lj.analyze(None, ad, cfg).spectra[0]
    assert "spectra of s*A@B" in out and f"{s.effective_rank:.2f}" in out
    assert main(["inspect", str(tmp_path / "ck"), "--no-spectra"]) == 0
    assert "spectra of s*A@B" not in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
