"""`lj.truncate` with a global budget (``total_rank=`` / ``total_energy=``), checked
against an independent float64 numpy reference.

The reference builds each layer's ``dW = scale * a @ b`` densely in float64 from
the (float32 or bfloat16) factors, takes ``np.linalg.svd``, sorts every layer's
singular values together (largest first; ties: earlier leaf, earlier layer, earlier
direction) and keeps each layer's best rank-k_l approximation.

The adapters are built with prescribed singular values: the values of all layers
together are a random permutation of ``c * (1, 2, ..., N)``, so consecutive ones
differ by ``c`` (>= 2% of the largest) and every cut, and every layer's rank-k
subspace, is well defined for every seed (float32 rounding moves them by ~1e-7).

Tolerances: float32 factors, 1e-5 of the largest entry (merged weights and each
layer's update); bfloat16 factors, the rounding bound ``3 u |a| @ |b|`` per entry
(``u = 2**-8``, the factors written back in bfloat16), which holds for any input.
"""

import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._analysis import analyze as _analysis
from tests._asserts import assert_close, rel_err
from tests.conftest import SEED


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _dense(node):
    """scale * a @ b in float64, shape (*lead, in, out)."""
    a, b = _f64(node.a), _f64(node.b)
    s = _f64(node.scale)
    return s.reshape(s.shape + (1,) * (a.ndim - s.ndim)) * np.matmul(a, b)


def _best_rank_k(dw, k):
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    return (u[:, :k] * s[None, :k]) @ vt[:k]


def _spectra(g, layouts):
    """Per leaf, descending singular values (*lead, r): all of them together a random
    permutation of c * (1..N)."""
    sizes = [math.prod(lead) * r for lead, r in layouts]
    values = g.uniform(0.5, 1.0) * g.permutation(np.arange(1, sum(sizes) + 1)).astype(float)
    out, start = [], 0
    for (lead, r), n in zip(layouts, sizes, strict=True):
        block = values[start:start + n].reshape(*lead, r)
        out.append(-np.sort(-block, axis=-1))
        start += n
    return out


def _factors(g, sv, n_in, n_out, scale, dtype=jnp.float32):
    """a (*lead, in, r), b (*lead, r, out) with scale * a @ b = U diag(sv) V^T per layer;
    a and b are mixed by a random well-conditioned r x r matrix (not orthogonal)."""
    lead, r = sv.shape[:-1], sv.shape[-1]
    a, b = np.empty((*lead, n_in, r)), np.empty((*lead, r, n_out))
    for idx in np.ndindex(*lead):
        u = np.linalg.qr(g.standard_normal((n_in, r)))[0]
        v = np.linalg.qr(g.standard_normal((n_out, r)))[0]
        d = g.uniform(0.5, 2.0, r)
        q = np.linalg.qr(g.standard_normal((r, r)))[0]
        root = np.sqrt(sv[idx])
        a[idx] = (u * root) @ q * d                         # U sqrt(S) Q D
        b[idx] = ((q / d).T * root) @ v.T / scale           # D^-1 Q^T sqrt(S) V^T / scale
    return jnp.asarray(a, dtype), jnp.asarray(b, dtype)


def _reference_ranks(adapters, paths, *, total_rank=None, total_energy=None):
    """{path: kept ranks (*lead)} by the global rule, from dense float64 SVDs."""
    entries, total = [], 0.0
    for order, p in enumerate(paths):
        node = adapters[p]
        dw, r = _dense(node), node.a.shape[-1]
        lead = dw.shape[:-2]
        for flat, idx in enumerate(np.ndindex(*lead)):
            s = np.linalg.svd(dw[idx], compute_uv=False)[:r]
            total += float(np.sum(np.linalg.svd(dw[idx], compute_uv=False) ** 2))
            entries += [(-float(x), order, flat, j) for j, x in enumerate(s)]
    entries.sort()
    if total_rank is not None:
        n = min(total_rank, len(entries))
    else:
        n, acc = 0, 0.0
        while acc < total_energy * total:
            acc += entries[n][0] ** 2
            n += 1
    kept = {p: np.zeros(adapters[p].a.shape[:-2], int) for p in paths}
    for _, order, flat, _ in entries[:n]:
        k = kept[paths[order]]
        k[np.unravel_index(flat, k.shape)] += 1
    return kept


def _check_against_reference(params, ad, out, cfg2, report, kept, *, rtol=1e-5):
    """Ranks in the config, zeroed directions, per-layer updates, merge and report."""
    merged = lj.merge(params, out, cfg2)
    rows = {(row.path, row.layer): row for row in report}
    for p, k in kept.items():
        r = ad[p].a.shape[-1]
        want_rank = r if k.min() == r else max(1, int(k.max()))
        assert cfg2.rank_for(p) == want_rank, p
        assert out[p].a.shape[-1] == want_rank and out[p].b.shape[-2] == want_rank, p
        assert float(jnp.max(out[p].scale)) == pytest.approx(cfg2.scale_for(p)), p
        dw, got = _dense(ad[p]), _dense(out[p])
        want_merged = _f64(params[p]).copy()
        for idx in np.ndindex(*k.shape):
            kl = int(k[idx])
            best = _best_rank_k(dw[idx], kl)
            want_merged[idx] += best
            a, b = _f64(out[p].a)[idx], _f64(out[p].b)[idx]
            # This layer's directions past its own k are exactly zero.
            assert not np.any(a[:, kl:]) and not np.any(b[kl:]), (p, idx, kl)
            if kl:
                assert_close(got[idx], best, rtol=rtol, what=f"{p}{idx}")
            row = rows[(p, tuple(int(i) for i in idx))]
            err = np.linalg.norm(dw[idx] - best) / np.linalg.norm(dw[idx])
            assert row.rank_kept == kl, (p, idx)
            assert math.isclose(row.error, err, rel_tol=1e-6, abs_tol=1e-9), (p, idx)
        assert_close(merged[p], want_merged, rtol=rtol, what=p)
    return merged


def _mixed_tree(g, *, alpha=8.0, use_rslora=False, dtype=jnp.float32):
    """An unstacked, a stacked and a rank-2 leaf (rank_pattern), a fully-trained leaf
    and a frozen one; singular values from `_spectra`."""
    shapes = {"q": ((), 24, 20, 6), "s": ((3,), 16, 12, 4), "u": ((), 10, 14, 2)}
    cfg = lj.LoraConfig(rank=6, alpha=alpha, targets="q|s|u", train="head",
                        rank_pattern={"s": 4, "u": 2}, use_rslora=use_rslora,
                        layouts={"s": lj.Layout(1, 1, 1)})
    svs = _spectra(g, [(lead, r) for lead, _, _, r in shapes.values()])
    params, ad = {}, {}
    for (p, (lead, n_in, n_out, _)), sv in zip(shapes.items(), svs, strict=True):
        scale = cfg.scale_for(p)
        params[p] = jnp.asarray(0.1 * g.standard_normal((*lead, n_in, n_out)), jnp.float32)
        a, b = _factors(g, sv, n_in, n_out, scale, dtype)
        ad[p] = lj.LoraWeights(a, b, jnp.float32(scale))
    params["head"] = jnp.asarray(g.standard_normal(5), jnp.float32)
    params["frozen"] = jnp.asarray(g.standard_normal((4, 4)), jnp.float32)
    ad["head"] = jnp.asarray(g.standard_normal(5), jnp.float32)
    ad["frozen"] = None
    return params, ad, cfg


PATHS = ["frozen", "head", "q", "s", "u"]          # the tree's (sorted dict) order


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_total_rank_matches_global_reference(use_rslora):
    g = np.random.default_rng(SEED + 1)
    params, ad, cfg = _mixed_tree(g, use_rslora=use_rslora)
    total = 6 + 3 * 4 + 2
    n = int(g.integers(1, total))
    out, cfg2, report = lj.truncate(ad, cfg, total_rank=n)
    lora = [p for p in PATHS if isinstance(ad[p], lj.LoraWeights)]
    kept = _reference_ranks(ad, lora, total_rank=n)
    _check_against_reference(params, ad, out, cfg2, report, kept)
    assert sum(row.rank_kept for row in report) == n
    assert out["head"] is ad["head"] and out["frozen"] is None
    assert cfg2.alpha == cfg.alpha and cfg2.use_rslora == use_rslora
    for p in lora:
        k = cfg2.rank_for(p)
        want = cfg.alpha / (math.sqrt(k) if use_rslora else k)
        assert float(out[p].scale) == pytest.approx(want)
        assert out[p].a.dtype == jnp.float32 and out[p].b.dtype == jnp.float32


def test_stacked_layers_keep_different_ranks():
    """Layer 0 keeps 3, layer 1 keeps 1, layer 2 keeps none: rank 3, zeros beyond k_l."""
    g = np.random.default_rng(SEED + 2)
    c = g.uniform(0.5, 2.0)
    sv = c * np.array([[9.0, 8.0, 7.0, 0.5, 0.4],
                       [6.0, 0.3, 0.2, 0.1, 0.09],
                       [0.05, 0.04, 0.03, 0.02, 0.01]])
    cfg = lj.LoraConfig(rank=5, alpha=10, targets="w", layouts={"w": lj.Layout(1, 1, 1)})
    a, b = _factors(g, sv, 16, 12, cfg.scale_for("w"))
    ad = {"w": lj.LoraWeights(a, b, jnp.float32(cfg.scale_for("w")))}
    params = {"w": jnp.asarray(0.1 * g.standard_normal((3, 16, 12)), jnp.float32)}
    out, cfg2, report = lj.truncate(ad, cfg, total_rank=4)
    kept = _reference_ranks(ad, ["w"], total_rank=4)
    np.testing.assert_array_equal(kept["w"], [3, 1, 0])
    _check_against_reference(params, ad, out, cfg2, report, kept)
    assert cfg2.rank == 3 and float(out["w"].scale) == pytest.approx(10 / 3)
    assert [row.rank_kept for row in report] == [3, 1, 0]
    assert report.spectra[2].error == pytest.approx(1.0)
    # Layer 2's update is zero: its merged weight is the base, bit for bit.
    merged = lj.merge(params, out, cfg2)
    np.testing.assert_array_equal(np.asarray(merged["w"][2]), np.asarray(params["w"][2]))


def test_leaves_cut_to_zero_keep_rank_one_zero_factors():
    g = np.random.default_rng(SEED + 3)
    cfg = lj.LoraConfig(rank=4, alpha=6, targets="big|small|one",
                        rank_pattern={"small": 3, "one": 1})
    sizes = {"big": (4, 100.0), "small": (3, 1.0), "one": (1, 0.5)}
    params, ad = {}, {}
    for p, (r, top) in sizes.items():
        sv = top * (1.0 - 0.1 * np.arange(r)) * g.uniform(0.8, 1.0)
        a, b = _factors(g, sv, 12, 10, cfg.scale_for(p))
        ad[p] = lj.LoraWeights(a, b, jnp.float32(cfg.scale_for(p)))
        params[p] = jnp.asarray(g.standard_normal((12, 10)), jnp.float32)
    out, cfg2, report = lj.truncate(ad, cfg, total_rank=4)
    kept = _reference_ranks(ad, ["big", "one", "small"], total_rank=4)
    assert {p: int(k) for p, k in kept.items()} == {"big": 4, "one": 0, "small": 0}
    merged = _check_against_reference(params, ad, out, cfg2, report, kept)
    for p in ("small", "one"):
        assert out[p].a.shape == (12, 1) and out[p].b.shape == (1, 10)
        assert not np.any(np.asarray(out[p].a)) and not np.any(np.asarray(out[p].b))
        assert cfg2.rank_for(p) == 1 and float(out[p].scale) == pytest.approx(6.0)
        np.testing.assert_array_equal(np.asarray(merged[p]), np.asarray(params[p]))
    assert out["big"] is ad["big"] and cfg2.rank_for("big") == 4
    assert {row.path: (row.rank_kept, row.error) for row in report} == {
        "big": (4, pytest.approx(0.0, abs=1e-9)), "one": (0, pytest.approx(1.0)),
        "small": (0, pytest.approx(1.0))}


def test_total_energy_matches_global_reference():
    g = np.random.default_rng(SEED + 4)
    params, ad, cfg = _mixed_tree(g)
    lora = ["q", "s", "u"]
    # A fraction halfway between two consecutive cumulative energies of the sorted
    # reference spectrum (those differ by >= 3 / N**3 of the total): a well-defined cut.
    svals = np.concatenate([np.linalg.svd(_dense(ad[p]), compute_uv=False)[..., :ad[p].a.shape[-1]]
                            .reshape(-1) for p in lora])
    cum = np.cumsum(np.sort(svals)[::-1] ** 2) / np.sum(svals ** 2)
    n = int(g.integers(1, svals.size))
    fraction = float((cum[n - 1] + cum[n]) / 2)
    out, cfg2, report = lj.truncate(ad, cfg, total_energy=fraction)
    kept = _reference_ranks(ad, lora, total_energy=fraction)
    assert sum(int(k.sum()) for k in kept.values()) == n + 1
    _check_against_reference(params, ad, out, cfg2, report, kept)
    kept_energy = sum(row.norm ** 2 * (1 - row.error ** 2) for row in report)
    assert kept_energy >= fraction * sum(row.norm ** 2 for row in report)


def test_whole_budget_returns_everything_unchanged():
    g = np.random.default_rng(SEED + 5)
    _, ad, cfg = _mixed_tree(g)
    for kw in ({"total_rank": 20}, {"total_rank": 10**6}, {"total_energy": 1.0}):
        out, cfg2, report = lj.truncate(ad, cfg, **kw)
        assert cfg2 is cfg
        assert all(out[p] is ad[p] for p in PATHS), kw
        assert all(row.rank_kept == ad[row.path].a.shape[-1] for row in report)


def test_ties_go_to_the_earlier_leaf_then_layer():
    """Exact ties (equal float64 values) at the cut: the documented order decides."""
    s = [np.array([3.0, 2.0, 1.0]), np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])]
    ranks = _analysis._global_ranks(s, 4, 1.0)
    assert int(ranks[0]) == 2 and ranks[1].tolist() == [1, 1]
    ranks = _analysis._global_ranks(s, 2, 1.0)
    assert int(ranks[0]) == 1 and ranks[1].tolist() == [1, 0]
    ranks = _analysis._global_ranks(s, 5, 1.0)
    assert int(ranks[0]) == 2 and ranks[1].tolist() == [2, 1]
    # Energy: 9 + 9 of 3 * 14 reaches 3/7 exactly, so two values are kept.
    ranks = _analysis._global_ranks(s, None, 18 / 42)
    assert int(ranks[0]) == 1 and ranks[1].tolist() == [1, 0]
    # Two identical leaves: whichever wins a near-tie, exactly total_rank are kept.
    g = np.random.default_rng(SEED + 6)
    cfg = lj.LoraConfig(rank=3, targets=".*")
    a, b = _factors(g, np.array([3.0, 2.0, 1.0]), 8, 6, cfg.scale_for("x"))
    node = lj.LoraWeights(a, b, jnp.float32(cfg.scale_for("x")))
    out, cfg2, report = lj.truncate({"x": node, "y": node}, cfg, total_rank=3)
    assert sorted(row.rank_kept for row in report) == [1, 2]
    for row in report:
        assert rel_err(_dense(out[row.path]), _best_rank_k(_dense(node), row.rank_kept)) < 1e-5


def test_bfloat16_factors_keep_dtype():
    g = np.random.default_rng(SEED + 7)
    _, ad, cfg = _mixed_tree(g, dtype=jnp.bfloat16)
    lora = ["q", "s", "u"]
    n = int(g.integers(1, 20))
    out, cfg2, report = lj.truncate(ad, cfg, total_rank=n)
    kept = _reference_ranks(ad, lora, total_rank=n)
    u = 2.0 ** -8
    for p in lora:
        assert out[p].a.dtype == jnp.bfloat16 and out[p].b.dtype == jnp.bfloat16
        assert out[p].a.shape[-1] == cfg2.rank_for(p)
        dw, got = _dense(ad[p]), _dense(out[p])
        # Each factor entry is rounded once to bfloat16 (relative u): the product's
        # error is at most (2u + u^2) * scale * |a| @ |b| of the exact factors.
        scale = float(out[p].scale)
        bound = 3 * u * scale * np.abs(_f64(out[p].a)) @ np.abs(_f64(out[p].b))
        for idx in np.ndindex(*kept[p].shape):
            kl = int(kept[p][idx])
            assert [r.rank_kept for r in report if r.path == p and r.layer == idx] == [kl]
            err = np.abs(got[idx] - _best_rank_k(dw[idx], kl))
            assert np.all(err <= bound[idx] + 1e-9 * np.abs(dw[idx]).max()), (p, idx)
            assert not np.any(_f64(out[p].a)[idx][:, kl:])


def test_dora_keeps_magnitude():
    """DoRA: the low-rank update is cut as for LoRA; the magnitude m is kept."""
    g = np.random.default_rng(SEED + 8)
    params = {"w": jnp.asarray(g.standard_normal((2, 16, 12)), jnp.float32)}
    cfg = lj.LoraConfig(rank=4, alpha=4, targets="w", use_dora=True,
                        layouts={"w": lj.Layout(1, 1, 1)})
    sv = _spectra(g, [((2,), 4)])[0]
    a, b = _factors(g, sv, 16, 12, cfg.scale_for("w"))
    # m: W's column norms (as lj.init sets it), then trained away from them.
    m = jnp.asarray(np.linalg.norm(_f64(params["w"]), axis=-2) * g.uniform(0.5, 1.5, (2, 12)),
                    jnp.float32)
    ad = {"w": lj.LoraWeights(a, b, jnp.float32(cfg.scale_for("w")), m)}
    out, cfg2, report = lj.truncate(ad, cfg, total_rank=5)
    kept = _reference_ranks(ad, ["w"], total_rank=5)["w"]
    assert out["w"].m is m and cfg2.use_dora
    dw, w = _dense(ad["w"]), _f64(params["w"])
    want = np.empty_like(w)
    for idx in np.ndindex(2):
        v = w[idx] + _best_rank_k(dw[idx], int(kept[idx]))
        want[idx] = v * (_f64(m)[idx] / np.linalg.norm(v, axis=0))[None, :]
    assert_close(lj.merge(params, out, cfg2)["w"], want, rtol=1e-5, what="w")
    assert [row.rank_kept for row in report] == kept.tolist()
    # The per-leaf mode keeps m too.
    out, cfg3, _ = lj.truncate(ad, cfg, rank=2)
    assert out["w"].m is m
    lj.merge(params, out, cfg3)


def test_budget_errors():
    g = np.random.default_rng(SEED + 9)
    cfg = lj.LoraConfig(rank=2, targets="w")
    a, b = _factors(g, np.array([2.0, 1.0]), 8, 6, cfg.scale_for("w"))
    ad = {"w": lj.LoraWeights(a, b, jnp.float32(cfg.scale_for("w")))}
    one = re.escape("it needs exactly one of rank=k or energy=f (per leaf) or total_rank=n "
                    "or total_energy=f (across all layers)")
    with pytest.raises(ValueError, match=one + re.escape(
            "; got rank=None, energy=None, total_rank=None, total_energy=None")):
        lj.truncate(ad, cfg)
    with pytest.raises(ValueError, match=one + ".*total_rank=3, total_energy=0.5"):
        lj.truncate(ad, cfg, total_rank=3, total_energy=0.5)
    with pytest.raises(ValueError, match=one + ".*got rank=1, energy=None, total_rank=3"):
        lj.truncate(ad, cfg, rank=1, total_rank=3)
    with pytest.raises(ValueError, match=one + ".*energy=0.9, total_rank=None, total_energy=0.9"):
        lj.truncate(ad, cfg, energy=0.9, total_energy=0.9)
    for bad in (0, -3, True, 2.0, "4"):
        with pytest.raises(ValueError, match=re.escape(f"lj.truncate: total_rank={bad!r} must "
                                                       f"be a positive int")):
            lj.truncate(ad, cfg, total_rank=bad)
    for bad in (0, 0.0, -0.5, 1.5, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match=re.escape(
                f"lj.truncate: total_energy={bad!r} must be a fraction in (0, 1]")):
            lj.truncate(ad, cfg, total_energy=bad)
    with pytest.raises(ValueError, match="w: the adapter has rank 2"):
        lj.truncate(ad, lj.LoraConfig(rank=4, targets="w"), total_rank=1)
    # numpy integers and floats are accepted
    assert lj.truncate(ad, cfg, total_rank=np.int64(1)).config.rank == 1
    assert lj.truncate(ad, cfg, total_energy=np.float32(1.0)).config is cfg
