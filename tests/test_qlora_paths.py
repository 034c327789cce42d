"""A quantized (QLoRA) frozen base through every entry point that takes params.

``q = lj.quantize(params, ...)`` (NF4 or int8 containers) goes through
checkpoints (`save` / `restore`, `restore_state`, the command line), PEFT
files, adapter sets (`merge_weighted`, `combine`), `analyze`, `describe`,
`summary`, `plan` and `apply` (LoRA and DoRA). Each result is checked against
the same call on the dequantized base ``lj.dequantize(q)``, the float
reference: equal to float32 rounding, or bit for bit where the operation is
exact (the same float32 values go through the same computation). Checkpoints
saved on ``q`` must also restore onto the float base ``q`` was quantized from
(train on NF4, merge into the float weights), and refuse any other base.
"""

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from examples import llama
from lora_jax.__main__ import main
from tests._asserts import assert_close, assert_trees_close, perturb_b, rel_err

METHODS = ("nf4", "int8")
CONTAINER = {"nf4": lj.NF4Weight, "int8": lj.Int8Weight}
CFG = llama.LlamaConfig(vocab=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64)
MODEL = llama.Llama(CFG)
NORM = r"params/model/norm/weight"
# LoRA on every projection, the final norm trained fully; every kernel is
# quantized (lm_head too: quantized but frozen), the config's train leaf never.
LORA = lj.LoraConfig(rank=4, alpha=8, targets=llama.TARGETS, train=NORM)
APPLY_RTOL = 1e-5      # lj.apply on q vs fn(merge(dequantize(q))): float32 rounding


@functools.cache
def _shapes():
    return jax.eval_shape(MODEL.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def _random_base(key):
    """Llama params drawn from ``key``: N(0, 0.05) weights, 1 + N(0, 0.1) norm weights
    (drawn with numpy, seeded by the key's data: nothing to compile per shape)."""
    gen = np.random.default_rng(np.asarray(jax.random.key_data(key)))

    def draw(keypath, s):
        x = gen.standard_normal(s.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * x if lj.path_str(keypath).endswith("/weight")
                           else 0.05 * x, s.dtype)
    return jax.tree_util.tree_map_with_path(draw, _shapes())


def _setup(rng, method, config=LORA):
    """``(params, q, dq, adapters, key)``: a random float base, it quantized, it
    dequantized, adapters made on ``q`` whose B is non-zero, and a fresh key for
    the test's own draws."""
    k_base, k_init, k_b, k_rest = jax.random.split(rng, 4)
    params = _random_base(k_base)
    q = lj.quantize(params, targets=r".*/kernel", method=method, config=config)
    ad = perturb_b(lj.init(q, config, key=k_init), key=k_b, std=0.05)
    if config.train:   # the fully-trained norm moves away from the base too
        ad = jax.tree_util.tree_map_with_path(
            lambda p, x: x * 1.5 if lj.path_str(p) == NORM else x, ad, is_leaf=lj.is_lora)
    return params, q, lj.dequantize(q), ad, k_rest


def _flat(tree):
    """``{path: leaf}`` of a params tree (quantized weights stay whole containers)."""
    return {lj.path_str(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(tree, is_leaf=lj.is_quantized)[0]}


def _flat_adapters(adapters):
    return {lj.path_str(p): n for p, n in
            jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lj.is_lora)[0]}


def _tokens(key):
    return jax.random.randint(key, (2, 8), 0, CFG.vocab, jnp.int32)


def _assert_same_storage(actual, expected, what):
    """Two quantized containers with bit-identical storage and the same settings."""
    assert type(actual) is type(expected), f"{what}: {type(actual)} != {type(expected)}"
    assert actual.settings() == expected.settings(), what
    assert_trees_close(actual, expected, exact=True)


@pytest.mark.slow
def test_setup_is_a_real_qlora_base(rng):
    params, q, dq, ad, _ = _setup(rng, "nf4")
    flat = _flat(q)
    kernels = [p for p in flat if p.endswith("/kernel")]
    assert kernels and all(lj.is_quantized(flat[p]) for p in kernels)
    assert not lj.is_quantized(flat[NORM])
    # NF4 is lossy (about 10% relative on Gaussian weights), so "equal to the
    # dequantized base" and "equal to the float base" are different claims
    k = "params/model/layers_0/mlp/up_proj/kernel"
    assert 0.02 < rel_err(_flat(dq)[k], _flat(params)[k]) < 0.2


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_save_restore_on_quantized_base(tmp_path, rng, method):
    params, q, dq, ad, key = _setup(rng, method)
    lj.save(tmp_path, ad, LORA, params=q)
    back, cfg = lj.restore(tmp_path, params=q)
    assert cfg == LORA
    assert_trees_close(back, ad, exact=True)
    # the fingerprint recorded: the dequantized values at the sampled positions,
    # and how each weight is stored
    fp = lj.checkpoint_info(tmp_path).fingerprint
    assert fp == json.loads(json.dumps(lj.base_fingerprint(q, LORA)))
    assert set(fp["targets"]) == set(lj.describe(q, LORA).specs)
    # every leaf of the base is covered, the quantized ones with their storage
    assert set(fp["leaves"]) == {lj.path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(
        q, is_leaf=lambda x: isinstance(x, lj.LeafContainer))[0]}
    assert {fp["leaves"][p]["storage"]["method"] for p in fp["targets"]} == {method}
    # QLoRA: trained on the quantized base, restored onto the float base it was
    # quantized from (which is quantized the same way for the check)
    on_float, cfg = lj.restore(tmp_path, params=params)
    assert cfg == LORA
    assert_trees_close(on_float, ad, exact=True)
    # another base of the same architecture, float or quantized, is refused
    other = _random_base(key)
    with pytest.raises(lj.BaseMismatchError, match=r"different base.*\n.*/kernel: "):
        lj.restore(tmp_path, params=other)
    with pytest.raises(lj.BaseMismatchError, match="different base"):
        lj.restore(tmp_path, params=lj.quantize(other, targets=r".*/kernel", method=method,
                                                config=LORA))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_restore_onto_dequantized_base(tmp_path, rng, method):
    params, q, dq, ad, _ = _setup(rng, method)
    lj.save(tmp_path, ad, LORA, params=q)
    back, _ = lj.restore(tmp_path, params=dq)
    assert_trees_close(back, ad, exact=True)


def _random_grads(adapters, key):
    """Gradients drawn at random, shaped like ``adapters``: the optimizer state only
    has to be a real one (`test_apply_*` checks the forward pass on q)."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves, strict=True)])


@contextlib.contextmanager
def _strict():
    """The session's strict dtype and rank promotion, inside a ``standard_promotion``
    test: lora_jax itself runs strict there too (and reuses what the other tests
    compiled, which another promotion mode would compile again)."""
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


@pytest.mark.slow
@pytest.mark.standard_promotion   # optax's adam (its update alone runs outside _strict)
@pytest.mark.parametrize("method", METHODS)
def test_restore_state_with_optimizer_state(tmp_path, rng, method):
    tx = lj.optimizer(optax.adam(1e-2))

    @jax.jit
    def update(adapters, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state

    with _strict():
        params, q, dq, ad, key = _setup(rng, method)
        k_grads, k_rng, k_other = jax.random.split(key, 3)
        grads = [_random_grads(ad, jax.random.fold_in(k_grads, i)) for i in range(3)]
        start, opt = ad, tx.init(ad)
    for g in grads[:2]:
        ad, opt = update(ad, opt, g)
    with _strict():
        # the steps moved the adapters; the state is Adam's m and v of them
        a = "params/model/layers_0/self_attn/q_proj/kernel"
        assert rel_err(_flat_adapters(ad)[a].a, _flat_adapters(start)[a].a) > 1e-4
        assert lj.summary(q, ad, opt_state=opt).optimizer_state == \
            2 * lj.summary(q, ad).trainable
        lj.save(tmp_path, ad, LORA, step=2, params=q, opt_state=opt, rng=k_rng)
        for base in (q, params):    # the quantized base, and the float one it came from
            state, cfg = lj.restore_state(tmp_path, params=base, tx=tx)
            assert cfg == LORA and state.step == 2
            assert_trees_close(state.adapters, ad, exact=True)
            assert_trees_close(state.opt_state, opt, exact=True)
            assert np.array_equal(jax.random.key_data(state.rng), jax.random.key_data(k_rng))
        with pytest.raises(lj.BaseMismatchError, match="different base"):
            lj.restore_state(tmp_path, params=_random_base(k_other), tx=tx)
    # resuming from the restored state is the uninterrupted run, bit for bit
    assert_trees_close(update(state.adapters, state.opt_state, grads[2]),
                       update(ad, opt, grads[2]), exact=True)


# ----------------------------------------------------------------------------- PEFT files


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("method", METHODS)
def test_peft_roundtrip_equals_float_base_roundtrip(tmp_path, rng, method, dora):
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    cfg = LORA.replace(use_dora=True) if dora else LORA
    params, q, dq, ad, key = _setup(rng, method, cfg)
    lj.export_peft(tmp_path / "q", ad, cfg, key_map="llama", params=q)
    lj.export_peft(tmp_path / "f", ad, cfg, key_map="llama", params=dq)
    got, got_cfg = lj.import_peft(tmp_path / "q", q, key_map="llama")
    want, want_cfg = lj.import_peft(tmp_path / "f", dq, key_map="llama")
    assert got_cfg == want_cfg and got_cfg.use_dora == dora
    assert_trees_close(got, want, exact=True)
    assert_trees_close(got, ad, exact=True)           # nothing lost on the way
    # the files hold the same tensors (modules_to_save: the norm, written whole)
    tq = load_file(tmp_path / "q" / "adapter_model.safetensors")
    tf = load_file(tmp_path / "f" / "adapter_model.safetensors")
    assert sorted(tq) == sorted(tf) and "base_model.model.model.norm.weight" in tq
    assert_trees_close(tq, tf, exact=True)
    # the file from q carries q's fingerprint: the float base it came from is
    # accepted, another base refused
    back, _ = lj.import_peft(tmp_path / "q", params, key_map="llama")
    assert_trees_close(back, ad, exact=True)
    with pytest.raises(lj.BaseMismatchError, match="different base"):
        lj.import_peft(tmp_path / "q", _random_base(key), key_map="llama")


# ----------------------------------------------------------------------------- adapter sets


def _two_adapters(q, key):
    """An adapter set of two adapters for ``q`` with different ranks and targets."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    c1 = lj.LoraConfig(rank=4, alpha=8, targets=llama.TARGETS)
    c2 = lj.LoraConfig(rank=2, alpha=6, targets=llama.ATTENTION)
    a1 = perturb_b(lj.init(q, c1, key=k1), key=k2, std=0.05)
    a2 = perturb_b(lj.init(q, c2, key=k3), key=k4, std=0.05)
    return lj.adapter_set({"x": (a1, c1), "y": (a2, c2)})


def _assert_requantized(merged_q, merged_f, q, dq, targets, method):
    """``merged_q`` (merged into q) is ``merged_f`` (merged into dq) stored like q:
    targets requantized from the same float32 sum, the rest untouched."""
    mq, mf, fq, fd = _flat(merged_q), _flat(merged_f), _flat(q), _flat(dq)
    assert mq.keys() == mf.keys() == fq.keys()
    for path, leaf in mq.items():
        if path not in targets:
            # not adapted (lm_head, norms, embeddings): left as they were
            if lj.is_quantized(leaf):
                _assert_same_storage(leaf, fq[path], path)
            else:
                assert np.array_equal(leaf, fq[path]), path
            assert np.array_equal(mf[path], fd[path]), path
            continue
        _assert_same_storage(leaf, fq[path].requantize(mf[path]), path)
        # within one rounding of the requantization, element by element
        err = float(jnp.max(jnp.abs(leaf.dequantize() - mf[path])))
        assert err <= leaf.rounding_bound(), (path, err, leaf.rounding_bound())
        # and the adapters did act
        assert rel_err(mf[path], fd[path]) > 1e-3, path
    assert {type(mq[p]) for p in targets} == {CONTAINER[method]}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_merge_weighted_into_quantized_base(rng, method):
    params, q, dq, _, key = _setup(rng, method)
    aset = _two_adapters(q, key)
    weights = {"x": 1.0, "y": -0.5}
    targets = set(lj.describe(q, aset.config).specs)
    with pytest.warns(lj.LoraWarning, match=rf"merging adapters into a {method} weight") as rec:
        merged_q = lj.merge_weighted(q, aset, weights)
    # one warning per adapted weight, naming it
    assert sorted(str(w.message).split(":")[0] for w in rec) == sorted(targets)
    merged_f = lj.merge_weighted(dq, aset, weights)
    _assert_requantized(merged_q, merged_f, q, dq, targets, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_combined_adapter_merges_into_quantized_base(rng, method):
    params, q, dq, _, key = _setup(rng, method)
    aset = _two_adapters(q, key)
    weights = {"x": 1.0, "y": -0.5}
    exact = lj.merge_weighted(dq, aset, weights)
    for how, rank in (("cat", None), ("svd", 6)):   # svd at the full rank 4 + 2: exact too
        comb = lj.combine(aset, weights, method=how, rank=rank)
        targets = set(lj.describe(q, comb.config).specs)
        with pytest.warns(lj.LoraWarning, match=rf"merging an adapter into a {method} weight"):
            merged_q = lj.merge(q, comb.adapters, comb.config)
        merged_f = lj.merge(dq, comb.adapters, comb.config)
        _assert_requantized(merged_q, merged_f, q, dq, targets, method)
        # the combination is the weighted sum (factors rounded to float32 once)
        assert_trees_close(merged_f, exact, rtol=1e-5)


# ----------------------------------------------------------------------------- reports


@pytest.mark.parametrize("method", METHODS)
def test_analyze_on_quantized_base_equals_dequantized(rng, method):
    params, q, dq, ad, _ = _setup(rng, method)
    got, want = lj.analyze(q, ad, LORA), lj.analyze(dq, ad, LORA)
    assert len(got.spectra) == len(want.spectra) == len(lj.describe(q, LORA).specs)
    flat = _flat(dq)
    for g, w in zip(got.spectra, want.spectra, strict=True):
        assert (g.path, g.layer, g.shape) == (w.path, w.layer, w.shape)
        # the spectrum comes from the factors alone: the same numbers
        np.testing.assert_array_equal(g.singular_values, w.singular_values)
        # ||W|| of the dequantized weight, either way (float32 norms: 1e-6)
        assert abs(g.base_norm - w.base_norm) <= 1e-6 * w.base_norm, g.path
        assert abs(g.relative_norm - w.relative_norm) <= 1e-6 * w.relative_norm, g.path
        ref = np.linalg.norm(np.asarray(flat[g.path], np.float64))
        assert abs(g.base_norm - ref) <= 1e-5 * ref, g.path
        assert g.relative_norm > 0


@pytest.mark.parametrize("method", METHODS)
def test_describe_summary_plan_on_quantized_base(rng, method):
    params, q, dq, ad, _ = _setup(rng, method)
    d_q, d_f = lj.describe(q, LORA), lj.describe(params, LORA)
    assert d_q.specs == d_f.specs and d_q.train == d_f.train == (NORM,)
    assert (d_q.n_params, d_q.n_adapter_params) == (d_f.n_params, d_f.n_adapter_params)
    assert str(d_q) == str(d_f)

    s_q, s_f = lj.summary(q, ad), lj.summary(params, ad)
    assert (s_q.trainable, s_q.total, s_q.lora, s_q.fully_trained, s_q.rows) == \
        (s_f.trainable, s_f.total, s_f.lora, s_f.fully_trained, s_f.rows)
    assert s_q.adapter_bytes == s_f.adapter_bytes
    flat = _flat(q)
    stored = sum(x.nbytes for x in flat.values() if lj.is_quantized(x))
    dense = sum(x.nbytes for x in flat.values() if not lj.is_quantized(x))
    assert s_q.frozen_bytes == {method: stored, "float32": dense}
    assert sum(s_f.frozen_bytes.values()) == dense + 4 * sum(
        x.size for x in flat.values() if lj.is_quantized(x))
    # about an eighth of float32 (nf4) or a quarter plus one float32 scale per
    # output unit (int8: 1/32 more with 32 inputs)
    ratio = stored / (sum(s_f.frozen_bytes.values()) - dense)
    assert (0.125 < ratio < 0.14) if method == "nf4" else (0.25 < ratio < 0.29), ratio
    assert f"{method} {stored:,} B" in str(s_q)

    p_q, p_f = lj.plan(q, LORA), lj.plan(params, LORA)
    assert (p_q.trainable, p_q.lora_params, p_q.trained_params, p_q.n_params, p_q.rows) == \
        (p_f.trainable, p_f.lora_params, p_f.trained_params, p_f.n_params, p_f.rows)
    assert p_q.trainable == s_q.trainable
    assert (p_q.adapter_bytes, p_q.optimizer_bytes) == (p_f.adapter_bytes, p_f.optimizer_bytes)


@pytest.mark.parametrize("method", METHODS)
def test_plan_counts_quantized_storage(rng, method):
    params, q, dq, ad, _ = _setup(rng, method)
    stored = sum(lj.summary(q, ad).frozen_bytes.values())
    # the exact storage, or plan's bits-per-parameter estimates (nf4 4.127, int8
    # 8: without the scales, 7% of this small base): within 10% either way (it
    # used to be the float32 size, 2.9x (int8) and 4.6x (nf4) the storage).
    assert abs(lj.plan(q, LORA).frozen_bytes - stored) <= 0.1 * stored


# ----------------------------------------------------------------------------- command line


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_cli_inspect_and_merge_into_float_base(tmp_path, rng, method, capsys):
    params, q, dq, ad, key = _setup(rng, method)
    ckpt = tmp_path / "ckpt"
    lj.save(ckpt, ad, LORA, params=q)
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    fp = lj.base_fingerprint(q, LORA)
    assert f"base fingerprint (v2, sampled, {len(fp['leaves'])} leaves):" in out
    for path in fp["targets"]:
        rec = fp["leaves"][path]
        shape = "x".join(map(str, rec["shape"]))
        assert f"  {path}  {shape}  float32 {method}  {rec['sha256'][:12]} (adapted)\n" in out, \
            path
    # QLoRA's last step: merge into the float base the quantized one came from
    base = tmp_path / "base.safetensors"
    lj.interop.save_params(base, params)
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(ckpt), "--base", str(base), "--out", str(merged)]) == 0
    want = {p: np.asarray(x) for p, x in _flat(lj.merge(params, ad, LORA)).items()}
    assert_trees_close(lj.interop.load_params(merged), want, exact=True)
    assert f"merged {len(lj.describe(q, LORA).specs)} adapted weights" in capsys.readouterr().out
    # another float base is refused (exit status 2, the reason on stderr)
    lj.interop.save_params(tmp_path / "other.safetensors", _random_base(key))
    code = main(["merge", str(ckpt), "--base", str(tmp_path / "other.safetensors"),
                 "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and "different base" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- apply


@pytest.mark.slow   # a jit compile of the whole model per case
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("method", METHODS)
def test_apply_on_quantized_base_equals_merged_dequantized(rng, method, dora):
    cfg = LORA.replace(use_dora=True) if dora else LORA
    params, q, dq, ad, key = _setup(rng, method, cfg)
    k_tok, k_init, k_m = jax.random.split(key, 3)
    # init on q sees the dequantized weights: the same A (per-path keys) and,
    # for DoRA, the same magnitudes ||W|| per output unit
    fresh_q = lj.init(q, cfg, key=k_init)
    fresh_d = lj.init(dq, cfg, key=k_init)
    assert_trees_close(fresh_q, fresh_d, rtol=1e-6)
    if dora:   # magnitudes away from ||W|| as well, so m acts
        nodes, treedef = jax.tree.flatten(ad, is_leaf=lj.is_lora)
        keys = jax.random.split(k_m, len(nodes))
        ad = jax.tree.unflatten(treedef, [
            n._replace(m=n.m * (1 + 0.2 * jax.random.normal(k, n.m.shape, n.m.dtype)))
            if lj.is_lora(n) else n for k, n in zip(keys, nodes, strict=True)])
    tokens = _tokens(k_tok)
    want = MODEL.apply(lj.merge(dq, ad, cfg), tokens)
    got = jax.jit(lj.apply(MODEL.apply, cfg, strict=True))(q, ad, tokens)
    assert_close(got, want, rtol=APPLY_RTOL)
    # the adapter changes the output by far more than the tolerance
    assert rel_err(MODEL.apply(dq, tokens), want) > 100 * APPLY_RTOL
