"""Orbax adapter checkpoints: round trips, resuming, retention, integrity,
base fingerprints and every bad input, each with the error it must raise."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from examples import gpt
from tests._asserts import assert_trees_close, random_adapters
from tests.conftest import ROOT, SEED

# Orbax leaves a coroutine behind after a failed read ("Event loop is closed").
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CFG = lj.LoraConfig(rank=4, alpha=8, targets=gpt.TARGETS, train=r"params/ln_f/(scale|bias)")


@pytest.fixture(scope="module")
def trained():
    """(variables, adapters with non-zero B and perturbed train leaves); fresh per run."""
    variables = _gpt_params()
    return variables, random_adapters(variables, CFG, seed=SEED)


def _gpt_params(**changes):
    """Random params of a reference-GPT variant (eval_shape: no init compile)."""
    cfg = gpt.GPTConfig(**{**dict(vocab=97, d_model=64, n_heads=4, n_layers=2, d_mlp=128,
                                  max_len=16), **changes})
    shapes = jax.eval_shape(gpt.GPT(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    gen = np.random.default_rng(SEED)
    return jax.tree.map(lambda s: jnp.asarray(gen.normal(size=s.shape), s.dtype), shapes)


def _files(directory):
    return [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]


# ----------------------------------------------------------------------------- round trips


def test_roundtrip_bit_exact_params_like_and_flat(tmp_path, trained):
    variables, ad = trained
    lj.save(tmp_path, ad, CFG, params=variables)
    back, cfg = lj.restore(tmp_path, params=variables)
    assert cfg == CFG
    assert_trees_close(back, ad, exact=True)
    back2, _ = lj.restore(tmp_path, like=ad)
    assert_trees_close(back2, ad, exact=True)
    flat, _ = lj.restore(tmp_path)
    nodes = {lj.path_str(p): n for p, n in
             jax.tree_util.tree_flatten_with_path(ad, is_leaf=lambda x: x is None or lj.is_lora(x))[0]
             if n is not None}
    assert list(flat) == list(nodes)
    assert_trees_close(flat, nodes, exact=True)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_resume_equals_uninterrupted_training(tmp_path, rng):
    k0, k1, k2 = jax.random.split(rng, 3)
    variables = {"l0": {"kernel": jax.random.normal(k0, (16, 32))},
                 "l1": {"kernel": jax.random.normal(k1, (32, 8)), "bias": jnp.zeros(8)}}
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*/kernel", train="l1/bias")
    tx = lj.optimizer(optax.adam(1e-2))
    x = jax.random.normal(k2, (8, 16))

    def loss(params, adapters, x):
        p = lj.merge(params, adapters, cfg)
        h = jnp.tanh(x @ p["l0"]["kernel"]) @ p["l1"]["kernel"] + p["l1"]["bias"][None]
        return jnp.mean((h - 1.0) ** 2)

    step = lj.make_train_step(loss, tx, donate=False)
    tokens = x
    ad = lj.init(variables, cfg, key=rng)
    opt = tx.init(ad)
    for _ in range(2):
        ad, opt, _ = step(variables, ad, opt, tokens)
    with lj.Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, ad, cfg, params=variables, opt_state=opt, rng=jax.random.key(7))
    for _ in range(2):
        ad, opt, _ = step(variables, ad, opt, tokens)

    state, cfg2 = lj.restore_state(tmp_path, params=variables, tx=tx)
    assert state.step == 2 and cfg2 == cfg
    assert jax.random.key_data(state.rng).tolist() == jax.random.key_data(jax.random.key(7)).tolist()
    ad2, opt2 = state.adapters, state.opt_state
    for _ in range(2):
        ad2, opt2, _ = step(variables, ad2, opt2, tokens)
    assert_trees_close(ad2, ad, exact=True)
    assert_trees_close(opt2, opt, exact=True)


def test_async_retention_keeps_best_and_always_latest(tmp_path, trained):
    variables, ad = trained
    losses = [0.9, 0.3, 0.5, 0.2, 0.8]
    with lj.Checkpointer(tmp_path, max_to_keep=2, best_fn=lambda m: m["loss"],
                         best_mode="min") as ckpt:
        for s, l in enumerate(losses):
            ckpt.save(s, ad, CFG, metrics={"loss": l})
        ckpt.wait()
        # Orbax's best-2 alone would keep [1, 3] and delete the latest step 4.
        assert ckpt.steps == [1, 3, 4]
        with pytest.raises(ValueError, match="got no metrics"):
            ckpt.save(5, ad, CFG)
    with lj.Checkpointer(tmp_path / "latest", max_to_keep=2, async_save=True) as ckpt:
        for s in range(4):
            ckpt.save(s * 10, ad, CFG)
    assert lj.checkpoint_info(tmp_path / "latest").steps == [20, 30]


def test_async_save_then_donate(tmp_path):
    """Once an async save returns, a train step may donate (overwrite) the buffers."""
    import warnings
    params = {f"w{i}": jax.ShapeDtypeStruct((512, 512), jnp.float32) for i in range(4)}
    cfg = lj.LoraConfig(rank=32, targets=r"w\d")
    ad = random_adapters(params, cfg, seed=SEED, b_std=1.0)
    want = jax.tree.map(np.array, ad)
    overwrite = jax.jit(lambda t: jax.tree.map(lambda x: x * 0 + 7.0, t), donate_argnums=0)
    with lj.Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(0, ad, cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "some donated buffers were not usable"
            jax.block_until_ready(overwrite(ad))
    back, _ = lj.restore(tmp_path, like=want)
    assert_trees_close(back, want, exact=True)


def test_restore_into_given_sharding(tmp_path, trained):
    variables, ad = trained
    lj.save(tmp_path, ad, CFG)
    dev = jax.local_devices()[-1]
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("x",))
    named = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    for sh in (jax.sharding.SingleDeviceSharding(dev), named):
        back, _ = lj.restore(tmp_path, params=variables, shardings=sh)
        for x in jax.tree.leaves(back):
            assert x.sharding == sh
        assert_trees_close(back, ad, exact=True)


@pytest.mark.slow
@pytest.mark.subprocess
def test_restore_resharded_across_devices(tmp_path):
    """Saved sharded over 4 (host) devices, restored into a 2x2 mesh."""
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        import jax, jax.numpy as jnp, numpy as np, lora_jax as lj
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        params = {{"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)), jnp.float32)}}
        cfg = lj.LoraConfig(rank=8, targets="w")
        ad = lj.init(params, cfg, key=jax.random.key(0))
        ad = {{"w": ad["w"]._replace(b=jnp.ones((8, 32)))}}
        m4 = Mesh(np.array(jax.devices()), ("x",))
        ad = jax.device_put(ad, NamedSharding(m4, P()))
        ad = {{"w": ad["w"]._replace(a=jax.device_put(ad["w"].a, NamedSharding(m4, P("x", None))))}}
        lj.save({str(tmp_path)!r}, ad, cfg)
        m22 = Mesh(np.array(jax.devices()).reshape(2, 2), ("model", "data"))
        sh = lj.LoraWeights(NamedSharding(m22, P("model", "data")), NamedSharding(m22, P(None, "data")),
                            NamedSharding(m22, P()))
        back, _ = lj.restore({str(tmp_path)!r}, params=params, shardings={{"w": sh}})
        assert back["w"].a.sharding == sh.a and back["w"].b.sharding == sh.b
        assert back["w"].a.addressable_shards[0].data.shape == (32, 4)
        assert np.array_equal(np.asarray(back["w"].a), np.asarray(ad["w"].a))
        print("RESHARD_OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert "RESHARD_OK" in out.stdout, out.stderr[-3000:]


def test_inspect_reads_no_arrays(tmp_path, trained):
    variables, ad = trained
    lj.save(tmp_path, ad, CFG, params=variables, metadata={"run": "abc"})
    for f in _files(tmp_path / "0" / "adapters"):
        os.remove(f)  # inspect must not need them
    info = lj.checkpoint_info(tmp_path)
    desc = lj.describe(variables, CFG)
    assert info.config == CFG and info.metadata == {"run": "abc"}
    lora_rows = {r[0]: r for r in info.rows if r[1] == "lora"}
    assert set(lora_rows) == set(desc.specs)
    assert sum(r[6] for r in lora_rows.values()) == desc.n_adapter_params
    assert set(info.fingerprint["targets"]) == set(desc.specs)
    text = str(info)
    assert "params/block_0/attn/q/kernel" in text and "base fingerprint" in text
    with pytest.raises(lj.CheckpointError, match="reading the arrays failed"):
        lj.restore(tmp_path, params=variables)


def test_checkpoint_bytes_close_to_raw(tmp_path, rng):
    """On-disk size <= 1.05x the raw array bytes + 64 KB (random, incompressible data)."""
    params = {f"l{i}": {"kernel": jax.ShapeDtypeStruct((512, 512), jnp.float32)}
              for i in range(4)}
    cfg = lj.LoraConfig(rank=64, targets=r".*/kernel")
    ad = random_adapters(params, cfg, seed=SEED)
    lj.save(tmp_path, ad, cfg)
    info = lj.checkpoint_info(tmp_path)
    assert info.array_bytes == 4 * 2 * 512 * 64 * 4
    assert info.disk_bytes <= 1.05 * info.array_bytes + 64 * 1024, \
        (info.disk_bytes, info.array_bytes)


# ----------------------------------------------------------------------------- integrity


def _corrupt_each_chunk(tmp_path, variables, ad, cfg, corrupt):
    """Corrupts each array chunk file (> 1 KB) of a fresh checkpoint copy in turn.

    Returns the CheckpointError messages; a corruption that restored without
    error must have restored exactly the saved arrays (the bytes it hit are
    never read, e.g. an index node superseded by the merged one).
    """
    import shutil
    src = tmp_path / "src"
    lj.save(src, ad, cfg)
    chunks = [f for f in _files(src / "0" / "adapters")
              if "/d/" in f and os.path.getsize(f) > 1024]
    assert chunks
    errors = []
    for i, f in enumerate(chunks):
        dst = tmp_path / f"copy{i}"
        shutil.copytree(src, dst)
        g = str(dst) + f[len(str(src)):]
        data = bytearray(Path(g).read_bytes())
        Path(g).write_bytes(bytes(corrupt(data)))
        try:
            back, _ = lj.restore(dst, params=variables)
        except lj.CheckpointError as e:
            assert "Fix:" in str(e)
            errors.append(str(e))
        else:
            assert_trees_close(back, ad, exact=True)
    return errors


def test_flipped_byte_is_caught_and_named(tmp_path, rng):
    """Orbax reads a flipped byte in array data silently (wrong values); the
    sha256 catches it and names the array. (Arrays > 1 KB: smaller ones live
    inside Orbax's checksummed index nodes, where a flip is a DATA_LOSS error.)"""
    variables = {f"params/l{i}": {"kernel": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
                 for i in range(3)}
    cfg = lj.LoraConfig(rank=8, targets=r".*/kernel")
    ad = random_adapters(variables, cfg, seed=SEED)

    def flip(data):
        data[len(data) // 2] ^= 0x01
        return data

    errors = _corrupt_each_chunk(tmp_path, variables, ad, cfg, flip)
    named = [m for m in errors
             if re.search(r"params/\S+/(a|b|scale|bias) does not match the sha256", m)]
    assert named, errors


def test_truncated_file(tmp_path, trained):
    variables, ad = trained
    errors = _corrupt_each_chunk(tmp_path, variables, ad, CFG, lambda d: d[: len(d) // 2])
    assert errors and all("truncated or corrupted" in m or "sha256" in m for m in errors), errors


def _edit_record(directory, step, fn, rehash=False):
    path = os.path.join(directory, str(step), "lora_jax", "metadata")
    rec = json.loads(Path(path).read_text())
    fn(rec)
    if rehash:
        from lora_jax._checkpoint.record import sha256_json
        rec["config_sha256"] = sha256_json(rec["config"])
        rec["sha256"] = sha256_json({k: v for k, v in rec.items() if k != "sha256"})
    Path(path).write_text(json.dumps(rec))


def test_unknown_format_version(tmp_path, trained):
    variables, ad = trained
    lj.save(tmp_path, ad, CFG)
    _edit_record(tmp_path, 0, lambda r: r.update(format_version=3), rehash=True)
    with pytest.raises(lj.CheckpointError, match="format version 3 is not supported.*upgrade"):
        lj.restore(tmp_path, params=variables)
    with pytest.raises(lj.CheckpointError, match="format version 3"):
        lj.checkpoint_info(tmp_path)


def test_edited_config_and_metadata_detected(tmp_path, trained):
    variables, ad = trained
    lj.save(tmp_path, ad, CFG)
    _edit_record(tmp_path, 0, lambda r: r["config"].update(alpha=99.0))
    with pytest.raises(lj.CheckpointError, match="LoraConfig does not match its sha256"):
        lj.restore(tmp_path, params=variables)
    lj.save(tmp_path, ad, CFG, step=1)
    _edit_record(tmp_path, 1, lambda r: r["metadata"].update(x=1))
    with pytest.raises(lj.CheckpointError, match="metadata does not match its sha256"):
        lj.checkpoint_info(tmp_path, step=1)
    with open(tmp_path / "1" / "lora_jax" / "metadata", "w") as fh:
        fh.write('{"format": "lora_jax.adapter_ch')
    with pytest.raises(lj.CheckpointError, match="reading the checkpoint metadata"):
        lj.restore(tmp_path, params=variables, step=1)


# ----------------------------------------------------------------------------- base fingerprint


@pytest.mark.slow
def test_base_fingerprint_checks(tmp_path, trained, rng):
    variables, ad = trained
    lj.save(tmp_path, ad, CFG, params=variables)
    # a different base of the same shapes
    gen = np.random.default_rng(SEED)
    other = jax.tree.map(lambda x: x + 0.01 * gen.standard_normal(x.shape).astype(np.float32),
                         variables)
    with pytest.raises(lj.BaseMismatchError, match="(?s)different base.*params/block_0.*Fix"):
        lj.restore(tmp_path, params=other)
    with pytest.warns(lj.LoraWarning, match="different base"):
        lj.restore(tmp_path, params=other, on_base_mismatch="warn")
    lj.restore(tmp_path, params=other, on_base_mismatch="ignore")
    # the merged base is not the base (restoring onto it would apply the delta twice)
    with pytest.raises(lj.BaseMismatchError):
        lj.restore(tmp_path, params=lj.merge(variables, ad, CFG))
    # a bfloat16 copy of the right base passes
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables)
    back, _ = lj.restore(tmp_path, params=bf16)
    assert_trees_close(back, ad, exact=True)
    # and a bfloat16 copy of another base does not (across dtypes the check
    # has bfloat16 resolution: `other`, 1% away, would pass it)
    another = jax.tree.map(lambda x: jnp.asarray(gen.standard_normal(x.shape), jnp.bfloat16),
                           variables)
    with pytest.raises(lj.BaseMismatchError):
        lj.restore(tmp_path, params=another)


def test_fingerprint_is_sampled_and_cheap():
    # A 4096 x 4096 weight: one element of every row and every column is read.
    w = jnp.zeros((4096, 4096), jnp.bfloat16)
    fp = lj.base_fingerprint({"w": w}, lj.LoraConfig(rank=8, targets="w"))
    rec = fp["leaves"]["w"]
    assert fp["version"] == 2 and fp["mode"] == "sampled" and fp["targets"] == ["w"]
    assert len(rec["values"]) == 8 and len(rec["sha256"]) == 64
    assert lj.check_base({"w": w}, fp) == []
    w2 = w.at[4095, 4095].set(1.0)  # the last element is always sampled
    assert lj.check_base({"w": w2}, fp, on_mismatch="ignore") == []
    with pytest.raises(lj.BaseMismatchError):
        lj.check_base({"w": w2}, fp)


def test_fingerprint_covers_the_whole_base(rng):
    """Every leaf counts -- untargeted kernels, biases, norms -- and a changed row of
    one kernel or one changed norm scale is caught; full mode catches one element."""
    k = jax.random.split(rng, 4)
    base = {"q": {"kernel": jax.random.normal(k[0], (512, 512))},
            "mlp": {"kernel": jax.random.normal(k[1], (512, 256)),
                    "bias": jax.random.normal(k[2], (256,))},
            "norm": {"scale": jnp.ones(512)}}
    cfg = lj.LoraConfig(rank=4, targets=r"q/kernel")
    fp = lj.base_fingerprint(base, cfg)
    assert sorted(fp["leaves"]) == ["mlp/bias", "mlp/kernel", "norm/scale", "q/kernel"]
    assert lj.check_base(base, fp) == []
    row = int(jax.random.randint(k[3], (), 0, 512))
    one_row = {**base, "mlp": {**base["mlp"],
                               "kernel": base["mlp"]["kernel"].at[row].multiply(1.001)}}
    one_norm = {**base, "norm": {"scale": base["norm"]["scale"].at[row].set(1.01)}}
    bias = {**base, "mlp": {**base["mlp"], "bias": base["mlp"]["bias"] + 1e-3}}
    for changed, path in ((one_row, "mlp/kernel"), (one_norm, "norm/scale"), (bias, "mlp/bias")):
        with pytest.raises(lj.BaseMismatchError, match=rf"(?s)different base.*{path}: sampled"):
            lj.check_base(changed, fp)
    extra = {**base, "head": {"kernel": jnp.ones((512, 4))}}
    with pytest.raises(lj.BaseMismatchError, match=r"head/kernel: in the given params, not in"):
        lj.check_base(extra, fp)
    full = lj.base_fingerprint(base, None, mode="full")
    col = int(jax.random.randint(k[3], (), 0, 256))
    one_element = {**base, "mlp": {**base["mlp"], "kernel": base["mlp"]["kernel"].at[
        row, col].add(1e-6)}}
    assert lj.check_base(base, full) == []
    with pytest.raises(lj.BaseMismatchError, match=r"mlp/kernel: content differ"):
        lj.check_base(one_element, full)


def test_version_1_fingerprints_are_still_checked(rng):
    """lora_jax 0.1 recorded targeted weights only, at 256 random positions."""
    from lora_jax._checkpoint.fingerprint import _content
    w = jax.random.normal(rng, (64, 64))
    digest, values = _content(w, "sampled", version=1)
    v1 = {"version": 1, "targets": {"w": {"shape": [64, 64], "dtype": "float32",
                                          "sha256": digest, "values": values}}}
    assert lj.check_base({"w": w, "b": jnp.ones(3)}, v1) == []      # other leaves: not in v1
    with pytest.raises(lj.BaseMismatchError):
        lj.check_base({"w": -w}, v1)


# ----------------------------------------------------------------------------- bad inputs


def test_shape_mismatch_with_base(tmp_path, trained):
    _, ad = trained
    lj.save(tmp_path, ad, CFG)
    wider = _gpt_params(d_model=96)
    with pytest.raises(lj.CheckpointError,
                       match=r"(?s)adapter shapes do not fit the weight.*expected a \(96, 4\)"):
        lj.restore(tmp_path, params=wider)


def test_missing_and_extra_entries(tmp_path, trained):
    variables, ad = trained
    lj.save(tmp_path, ad, CFG)
    deeper = _gpt_params(n_layers=3)
    with pytest.raises(lj.CheckpointError, match="params/block_2/attn/k/kernel"):
        lj.restore(tmp_path, params=deeper)
    shallow = _gpt_params(n_layers=1)
    with pytest.raises(lj.CheckpointError,
                       match=r"saved but not in the target: \['params/block_1/attn/k/kernel'"):
        lj.restore(tmp_path, params=shallow)
    like = dict(ad)
    like = jax.tree.map(lambda x: x, ad, is_leaf=lambda x: x is None or lj.is_lora(x))
    like["params"]["block_0"]["attn"]["q"]["kernel"] = None
    with pytest.raises(lj.CheckpointError, match="block_0/attn/q/kernel"):
        lj.restore(tmp_path, like=like)


def test_rank_above_min_dims(tmp_path, rng):
    params = {"w": jax.random.normal(rng, (64, 64))}
    cfg = lj.LoraConfig(rank=8, targets="w")
    lj.save(tmp_path, random_adapters(params, cfg, seed=SEED), cfg)
    with pytest.raises(lj.CheckpointError, match=r"w: rank 8 exceeds min\(in, out\)"):
        lj.restore(tmp_path, params={"w": jnp.ones((64, 4))})


def test_nonfinite_refused_on_save_and_restore(tmp_path, trained):
    variables, ad = trained
    bad = jax.tree.map(lambda x: x, ad, is_leaf=lambda x: x is None or lj.is_lora(x))
    node = bad["params"]["block_1"]["mlp"]["fc2"]["kernel"]
    bad["params"]["block_1"]["mlp"]["fc2"]["kernel"] = node._replace(b=node.b.at[0, 0].set(jnp.nan))
    with pytest.raises(lj.CheckpointError, match="block_1/mlp/fc2/kernel/b: 1 NaN/Inf"):
        lj.save(tmp_path, bad, CFG)
    assert not os.path.exists(tmp_path / "0")
    lj.save(tmp_path, bad, CFG, check_finite=False)
    with pytest.raises(lj.CheckpointError, match="block_1/mlp/fc2/kernel/b: 1 NaN/Inf.*Fix"):
        lj.restore(tmp_path, params=variables)
    back, _ = lj.restore(tmp_path, params=variables, check_finite=False)
    assert np.isnan(np.asarray(back["params"]["block_1"]["mlp"]["fc2"]["kernel"].b)[0, 0])


def test_dtype_never_cast_silently(tmp_path, trained):
    variables, ad = trained
    lj.save(tmp_path, ad, CFG)
    def to_bf16(node):
        if not lj.is_lora(node):
            return node
        return node._replace(a=jax.ShapeDtypeStruct(node.a.shape, jnp.bfloat16),
                             b=jax.ShapeDtypeStruct(node.b.shape, jnp.bfloat16))

    like_bf16 = jax.tree.map(to_bf16, ad, is_leaf=lambda x: x is None or lj.is_lora(x))
    with pytest.raises(lj.CheckpointError, match="saved as float32 but like= asks for bfloat16.*"
                                                 "dtype=jnp.bfloat16"):
        lj.restore(tmp_path, like=like_bf16)
    back, cfg = lj.restore(tmp_path, like=like_bf16, dtype=jnp.bfloat16)
    q = back["params"]["block_0"]["attn"]["q"]["kernel"]
    assert q.a.dtype == jnp.bfloat16 and q.scale.dtype == jnp.float32 and cfg.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(q.b), np.asarray(
        ad["params"]["block_0"]["attn"]["q"]["kernel"].b.astype(jnp.bfloat16)))
    # the default restores as saved
    back, cfg = lj.restore(tmp_path, params=variables)
    assert back["params"]["block_0"]["attn"]["q"]["kernel"].a.dtype == jnp.float32


def test_failed_saves_leave_previous_step_intact(tmp_path, trained):
    variables, ad = trained
    lj.save(tmp_path, ad, CFG, step=3)
    before = {f: Path(f).read_bytes() for f in _files(tmp_path)}
    with pytest.raises(ValueError, match="callable"):
        lj.save(tmp_path, ad, CFG.replace(targets=lambda p, x: "kernel" in p))
    with pytest.raises(TypeError):
        lj.save(tmp_path, ad, CFG, metadata={"f": object()})
    with pytest.raises(ValueError, match="step 2 is not after the latest saved step 3"):
        lj.save(tmp_path, ad, CFG, step=2)
    with pytest.raises(ValueError, match="config does not target"):
        lj.save(tmp_path, ad, lj.LoraConfig(rank=4, targets=r".*/q/kernel", train="params/ln_f/.*"))
    with pytest.raises(ValueError, match="do not fit the weight"):
        lj.save(tmp_path, ad, CFG, params=_gpt_params(d_model=96))
    after = {f: Path(f).read_bytes() for f in _files(tmp_path)}
    assert after == before
    back, _ = lj.restore(tmp_path, params=variables)
    assert_trees_close(back, ad, exact=True)


def test_missing_directory_and_step(tmp_path, trained):
    variables, ad = trained
    with pytest.raises(lj.CheckpointError, match="no such checkpoint directory"):
        lj.restore(tmp_path / "nope", params=variables)
    lj.save(tmp_path, ad, CFG)
    with pytest.raises(lj.CheckpointError, match=r"no complete checkpoint for step 5; steps present: \[0\]"):
        lj.restore(tmp_path, params=variables, step=5)
    os.makedirs(tmp_path / "empty" / "1.orbax-checkpoint-tmp")
    with pytest.raises(lj.CheckpointError, match="only unfinished saves"):
        lj.restore(tmp_path / "empty", params=variables)


def test_restore_state_errors(tmp_path, trained):
    variables, ad = trained
    lj.save(tmp_path, ad, CFG)
    with pytest.raises(lj.CheckpointError, match="no training state"):
        lj.restore_state(tmp_path, params=variables, tx=lj.optimizer(optax.sgd(0.1)))
    tx = lj.optimizer(optax.adam(1e-3))
    lj.save(tmp_path, ad, CFG, step=1, opt_state=tx.init(ad))
    with pytest.raises(TypeError, match="pass tx="):
        lj.restore_state(tmp_path, params=variables)
    with pytest.raises(lj.CheckpointError, match="optimizer state and the target differ"):
        lj.restore_state(tmp_path, params=variables, tx=lj.optimizer(optax.sgd(0.1, momentum=0.9)))
