"""Checkpoints under ordinary, careless use: two writers on one directory,
readers beside a writer, the user's own folders, copied / renamed / linked
steps, a full disk, and bad arguments -- each with the outcome it must have
(refused with a message naming the directory and the fix, and nothing lost)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax._checkpoint import lease as lease_mod
from tests._asserts import assert_trees_close, random_adapters
from tests.conftest import ROOT, SEED

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CFG = lj.LoraConfig(rank=4, alpha=8, targets=r".*/kernel")


def _params(seed=SEED):
    gen = np.random.default_rng(seed)
    return {"l1": {"kernel": gen.normal(size=(24, 32)).astype(np.float32),
                   "bias": gen.normal(size=(32,)).astype(np.float32)},
            "l2": {"kernel": gen.normal(size=(32, 16)).astype(np.float32)}}


@pytest.fixture(scope="module")
def base():
    params = jax.tree.map(np.asarray, _params())
    return params, random_adapters(params, CFG, seed=SEED)


def _tree(directory):
    """{relative path: bytes} of every file under directory."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, directory)] = Path(p).read_bytes()
    return out


# ----------------------------------------------------------------------------- one writer


def test_second_writer_in_this_process_is_refused_and_names_the_holder(tmp_path, base):
    params, ad = base
    with lj.Checkpointer(tmp_path) as first:
        first.save(0, ad, CFG)
        first.wait()
        with pytest.raises(lj.CheckpointError, match=rf"another writer holds this run directory: "
                           rf"process {os.getpid()} on host .*two writers would overwrite each "
                           rf"other's steps\. Fix: let that writer finish"):
            lj.Checkpointer(tmp_path)
        with pytest.raises(lj.CheckpointError, match="another writer holds"):
            lj.save(tmp_path, ad, CFG, step=1)
        # readers are fine beside the writer, and see its steps
        with lj.Checkpointer(tmp_path, read_only=True) as reader:
            assert reader.steps == [0]
        back, _ = lj.restore(tmp_path, params=params)
        assert_trees_close(back, ad, exact=True)
        first.save(1, ad, CFG)
    assert lj.Checkpointer(tmp_path, read_only=True).steps == [0, 1]
    # the lease went with close(): the next writer gets it
    lj.save(tmp_path, ad, CFG)
    assert lj.checkpoint_info(tmp_path).step == 2
    assert not os.path.exists(tmp_path / lease_mod.LEASE_FILE)


def test_readers_never_touch_a_writers_save_in_flight(tmp_path, base):
    """A read-only Checkpointer, lj.restore, lj.checkpoint_info and a refused writer
    leave every file -- including an unfinished save's -- exactly as it was."""
    params, ad = base
    with lj.Checkpointer(tmp_path, async_save=False) as writer:
        writer.save(0, ad, CFG, params=params)
        inflight = tmp_path / "1.orbax-checkpoint-tmp-1234"   # what an async save looks like
        os.makedirs(inflight / "adapters")
        (inflight / "adapters" / "part").write_bytes(b"being written")
        before = _tree(tmp_path)
        with lj.Checkpointer(tmp_path, read_only=True) as r:
            assert r.steps == [0]
            r.restore(params=params)
        lj.restore(tmp_path, params=params)
        lj.checkpoint_info(tmp_path)
        with pytest.raises(lj.CheckpointError, match="another writer"):
            lj.Checkpointer(tmp_path, max_to_keep=1)
        assert _tree(tmp_path) == before
        shutil.rmtree(inflight)


_WRITER = textwrap.dedent("""
    import os, sys, time
    import jax, numpy as np
    import lora_jax as lj
    directory, ready, go = sys.argv[1:4]
    gen = np.random.default_rng(int(sys.argv[4]))
    params = {"w": gen.normal(size=(512, 512)).astype(np.float32)}
    cfg = lj.LoraConfig(rank=8, targets="w")
    ad = lj.init(params, cfg, key=jax.random.key(1))
    ad = {"w": ad["w"]._replace(b=gen.normal(size=(8, 512)).astype(np.float32))}
    ckpt = lj.Checkpointer(directory)              # asynchronous writer
    ckpt.save(0, ad, cfg, params=params)
    ckpt.wait()
    ckpt.save(1, ad, cfg, params=params)           # in flight while the other process tries
    open(ready, "w").close()
    deadline = time.time() + 120
    while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.05)
    ckpt.close()
    np.save(os.path.join(directory, "..", "b.npy"), np.asarray(ad["w"].b))
    print("closed", ckpt.steps)
""")


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_processes_second_writer_refused_first_save_completes(tmp_path):
    run = tmp_path / "run"
    ready, go = tmp_path / "ready", tmp_path / "go"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(script), str(run), str(ready), str(go),
                             str(SEED)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the writer never got to its second save"
            time.sleep(0.05)
        with pytest.raises(lj.CheckpointError,
                           match=rf"another writer holds this run directory: process "
                                 rf"{proc.pid} on host"):
            lj.Checkpointer(run)
        p = {"w": np.zeros((512, 512), np.float32)}
        cfg = lj.LoraConfig(rank=8, targets="w")
        with pytest.raises(lj.CheckpointError, match=f"process {proc.pid}"):
            lj.save(run, lj.init(p, cfg, key=jax.random.key(0)), cfg)
        with lj.Checkpointer(run, read_only=True) as r:        # reading is allowed
            assert 0 in r.steps
    finally:
        go.touch()
        out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "closed [0, 1]" in out
    info = lj.checkpoint_info(run)
    assert info.step == 1
    back, _ = lj.restore(run)
    np.testing.assert_array_equal(np.asarray(back["w"].b), np.load(tmp_path / "b.npy"))


def test_a_dead_writers_lease_is_taken_over_on_this_host(tmp_path, base):
    _, ad = base
    dead = {"owner": "f" * 32, "pid": 2 ** 22 + 12345, "host": lease_mod._host(),
            "since": time.time() - 60, "renewed": time.time() - 30}
    (tmp_path / lease_mod.LEASE_FILE).write_text(json.dumps(dead))
    lj.save(tmp_path, ad, CFG)             # the lock is free: its holder is gone
    assert lj.checkpoint_info(tmp_path).step == 0


def test_a_lease_held_on_another_host_is_refused_unless_forced(tmp_path, base):
    _, ad = base
    other = {"owner": "e" * 32, "pid": 4242, "host": "trainer-node-7",
             "since": time.time() - 60, "renewed": time.time() - 5}
    (tmp_path / lease_mod.LEASE_FILE).write_text(json.dumps(other))
    with pytest.raises(lj.CheckpointError,
                       match=r"leased to process 4242 on host 'trainer-node-7'.*can't tell from "
                             r"here whether that writer is still running\. Fix: if it is gone, "
                             r"pass force=True"):
        lj.save(tmp_path, ad, CFG)
    assert lj.Checkpointer(tmp_path, read_only=True).steps == []
    lj.save(tmp_path, ad, CFG, force=True)
    assert lj.checkpoint_info(tmp_path).step == 0


def test_a_writer_whose_lease_was_taken_over_stops(tmp_path, base):
    _, ad = base
    ckpt = lj.Checkpointer(tmp_path, async_save=False)
    ckpt.save(0, ad, CFG)
    # another host forced the lease over (its flock can't reach this one, e.g. NFS)
    taker = {"owner": "d" * 32, "pid": 1, "host": "elsewhere", "since": time.time(),
             "renewed": time.time()}
    (tmp_path / lease_mod.LEASE_FILE).write_text(json.dumps(taker))
    with pytest.raises(lj.CheckpointError, match="this writer's lease was taken over by process "
                                                 "1 on host 'elsewhere'"):
        ckpt.save(1, ad, CFG)
    ckpt.close()
    assert lj.Checkpointer(tmp_path, read_only=True).steps == [0]


# ----------------------------------------------------------------------------- retention


def test_retention_never_touches_the_users_folders(tmp_path, base):
    params, ad = base
    for name in ("1", "2", "3"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "notes.txt").write_text(f"user data {name}")
    for _ in range(3):
        lj.save(tmp_path, ad, CFG, max_to_keep=1)
    # the user's 1/, 2/, 3/ are not steps: saving went 0 -> 4 -> 5, pruning only ours
    assert lj.Checkpointer(tmp_path, read_only=True).steps == [5]
    for name in ("1", "2", "3"):
        assert (tmp_path / name / "notes.txt").read_text() == f"user data {name}"
    assert not (tmp_path / "0").exists() and not (tmp_path / "4").exists()


def test_saving_onto_a_users_folder_is_refused(tmp_path, base):
    _, ad = base
    os.makedirs(tmp_path / "0")
    (tmp_path / "0" / "mine").write_text("keep")
    with pytest.raises(lj.CheckpointError, match=r"0: a folder of this name exists and is not "
                                                 r"a lora_jax step.*Fix: save with another step"):
        lj.save(tmp_path, ad, CFG, step=0)
    assert (tmp_path / "0" / "mine").read_text() == "keep"


def test_retention_keeps_another_runs_steps(tmp_path, base):
    _, ad = base
    other = tmp_path / "other"
    lj.save(other, ad, CFG, step=0)
    run = tmp_path / "run"
    lj.save(run, ad, CFG, step=1)
    shutil.copytree(other / "0", run / "0")           # another run's step copied in
    lj.save(run, ad, CFG, step=2, max_to_keep=1)
    lj.save(run, ad, CFG, step=3, max_to_keep=1)
    assert lj.Checkpointer(run, read_only=True).steps == [0, 3]


def test_retention_by_metric_keeps_best_and_latest(tmp_path, base):
    _, ad = base
    losses = [0.5, 0.1, 0.9, 0.3, 0.8]
    with lj.Checkpointer(tmp_path, max_to_keep=2, best_fn=lambda m: m["loss"]) as ckpt:
        for step, loss in enumerate(losses):
            ckpt.save(step, ad, CFG, metrics={"loss": loss})
    info = lj.checkpoint_info(tmp_path, step=1)
    assert info.metrics == {"loss": 0.1}
    assert lj.Checkpointer(tmp_path, read_only=True).steps == [1, 3, 4]


# ----------------------------------------------------------------------------- identity


def _two_steps(directory, ad, params):
    tx = lj.optimizer(optax.adam(1e-3))
    opt0 = tx.init(ad)
    lj.save(directory, ad, CFG, step=0, params=params, opt_state=opt0, rng=jax.random.key(0))
    lj.save(directory, ad, CFG, step=1, params=params, opt_state=opt0, rng=jax.random.key(1))
    return tx


def test_a_copied_step_is_refused_and_readable_as_what_it_is(tmp_path, base):
    params, ad = base
    tx = _two_steps(tmp_path, ad, params)
    shutil.copytree(tmp_path / "0", tmp_path / "9")
    with pytest.raises(lj.CheckpointError,
                       match=r"the folder is step 9 but its record was written as step 0 "
                             r"\(copied or renamed: e.g. cp -r 0 9\).*pass check_identity=False"):
        lj.restore_state(tmp_path, params=params, tx=tx)
    with pytest.raises(lj.CheckpointError, match="written as step 0"):
        lj.checkpoint_info(tmp_path)
    state, _ = lj.restore_state(tmp_path, params=params, tx=tx, check_identity=False)
    assert state.step == 0                         # the record's step, not the folder's name
    info = lj.checkpoint_info(tmp_path, check_identity=False)
    assert (info.step, info.folder) == (0, "9")
    assert "step 0 in folder '9' (copied or renamed)" in str(info)
    # the genuine steps still restore
    assert lj.restore_state(tmp_path, params=params, tx=tx, step=1)[0].step == 1


def test_a_renamed_step_is_refused(tmp_path, base):
    params, ad = base
    _two_steps(tmp_path, ad, params)
    os.rename(tmp_path / "1", tmp_path / "5")
    with pytest.raises(lj.CheckpointError, match="step 5 but its record was written as step 1"):
        lj.restore(tmp_path, params=params)


def test_a_symlinked_step_from_another_run_is_refused(tmp_path, base):
    params, ad = base
    _two_steps(tmp_path / "a", ad, params)
    lj.save(tmp_path / "b", ad, CFG, step=0, params=params)
    os.symlink(tmp_path / "a" / "1", tmp_path / "b" / "1")
    with pytest.raises(lj.CheckpointError, match=r"step 1 is a link to .*a/1, another "
                                                 r"directory's step"):
        lj.restore(tmp_path / "b", params=params)


def test_a_step_copied_from_another_run_is_refused(tmp_path, base):
    params, ad = base
    _two_steps(tmp_path / "a", ad, params)
    lj.save(tmp_path / "b", ad, CFG, step=0, params=params)
    shutil.copytree(tmp_path / "a" / "1", tmp_path / "b" / "1")
    rid = json.loads((tmp_path / "b" / ".lora_jax-run").read_text())["run_id"]
    with pytest.raises(lj.CheckpointError, match=rf"written by another run \(run id [0-9a-f]+; "
                                                 rf"this directory's run is {rid}\)"):
        lj.restore(tmp_path / "b", params=params)
    back, _ = lj.restore(tmp_path / "b", params=params, check_identity=False)
    assert_trees_close(back, ad, exact=True)


def test_a_whole_run_directory_copied_elsewhere_still_restores(tmp_path, base):
    """Binding is to the run, not to the absolute path: a moved run is the same run."""
    params, ad = base
    tx = _two_steps(tmp_path / "a", ad, params)
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    state, _ = lj.restore_state(tmp_path / "moved", params=params, tx=tx)
    assert state.step == 1
    moved, original = lj.checkpoint_info(tmp_path / "moved"), lj.checkpoint_info(tmp_path / "a")
    assert moved.run_id == original.run_id


# ----------------------------------------------------------------------------- faults


def test_a_full_disk_is_one_clear_error_and_earlier_steps_survive(tmp_path, base, monkeypatch):
    params, ad = base
    lj.save(tmp_path, ad, CFG, step=0)
    before = _tree(tmp_path / "0")
    import orbax.checkpoint as ocp

    real = ocp.CheckpointManager.save

    def full_disk(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(lj.CheckpointError, match=r"writing step 1 failed: the disk is full; the "
                                                 r"steps saved before it are intact.*Fix: free "
                                                 r"space"):
        lj.save(tmp_path, ad, CFG, step=1)
    monkeypatch.setattr(ocp.CheckpointManager, "save", real)
    assert _tree(tmp_path / "0") == before
    assert lj.Checkpointer(tmp_path, read_only=True).steps == [0]
    lj.save(tmp_path, ad, CFG, step=1)            # the lease was released by the failure
    assert lj.Checkpointer(tmp_path, read_only=True).steps == [0, 1]


@pytest.mark.slow
def test_inspecting_a_corrupted_step_prints_nothing_on_stderr(tmp_path, base):
    """The error is the message; no Orbax traceback ("Event loop is closed") leaks."""
    _, ad = base
    lj.save(tmp_path / "run", ad, CFG)
    meta = tmp_path / "run" / "0" / "lora_jax" / "metadata"
    meta.write_text(meta.read_text()[:-7])
    proc = subprocess.run([sys.executable, "-m", "lora_jax", "inspect", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "metadata" in lines[0] and "Traceback" not in proc.stderr
    assert "Event loop is closed" not in proc.stderr


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("step, exc, match", [
    ("0", TypeError, r"step='0' is a str, not an int\. Fix: pass step=0"),
    ("latest", TypeError, r"step='latest' is a str, not an int\. Fix: pass an int step, or "
                          r"step=None"),
    (1.0, TypeError, r"step=1\.0 is a float"),
    (True, TypeError, r"step=True is a bool"),
    (7, lj.CheckpointError, r"no complete checkpoint for step 7; steps present: \[0\]"),
])
def test_restore_step_argument(tmp_path, base, step, exc, match):
    params, ad = base
    lj.save(tmp_path, ad, CFG)
    with pytest.raises(exc, match=match):
        lj.restore(tmp_path, params=params, step=step)


@pytest.mark.parametrize("step", [-1, "3", 2.0, None.__class__])
def test_save_step_argument(tmp_path, base, step):
    _, ad = base
    with pytest.raises(ValueError, match=r"Checkpointer.save: step=.* is not a non-negative int"):
        lj.save(tmp_path, ad, CFG, step=step)
    assert lj.Checkpointer(tmp_path, read_only=True).steps == []


def test_bad_options_are_refused_before_anything_is_written(tmp_path, base):
    params, ad = base
    with pytest.raises(ValueError, match=r"lj.base_fingerprint: mode='fast' is not one of"):
        lj.save(tmp_path, ad, CFG, params=params, fingerprint="fast")
    with pytest.raises(ValueError, match="max_to_keep"):
        lj.Checkpointer(tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="best_fn, but save\\(\\) got no metrics"):
        with lj.Checkpointer(tmp_path, best_fn=lambda m: m["loss"], max_to_keep=1) as c:
            c.save(0, ad, CFG)
    with pytest.raises(ValueError, match="read_only"):
        lj.Checkpointer(tmp_path, read_only=True).save(0, ad, CFG)
    assert lj.Checkpointer(tmp_path, read_only=True).steps == []


def test_restore_into_the_wrong_base_names_the_leaf(tmp_path, base):
    params, ad = base
    lj.save(tmp_path, ad, CFG, params=params)
    other = jax.tree.map(np.copy, params)
    other["l1"]["bias"][3] += 0.5                       # an untargeted leaf
    with pytest.raises(lj.BaseMismatchError, match="l1/bias"):
        lj.restore(tmp_path, params=other)
    full = tmp_path / "full"
    lj.save(full, ad, CFG, params=params, fingerprint="full")
    changed = jax.tree.map(np.copy, params)
    changed["l2"]["kernel"][7, 5] = np.nextafter(changed["l2"]["kernel"][7, 5], np.inf)
    with pytest.raises(lj.BaseMismatchError, match="l2/kernel"):
        lj.restore(full, params=changed)


# ----------------------------------------------------------------------------- config vs arrays


@pytest.mark.parametrize("with_params", [False, True], ids=["no-params", "params"])
def test_save_refuses_a_config_that_does_not_describe_the_arrays(tmp_path, base, with_params):
    params, ad = base
    kw = {"params": params} if with_params else {}
    with pytest.raises(ValueError, match=r"l1/kernel: the adapter's scale is 2 but the config "
                                         r"gives 24\.75 = alpha 99 / rank 4.*Fix: pass the "
                                         r"config the adapters were made with \(alpha=8 here"):
        lj.save(tmp_path, ad, CFG.replace(alpha=99), **kw)
    ints = {**ad, "l2": {"kernel": ad["l2"]["kernel"]._replace(
        b=np.asarray(ad["l2"]["kernel"].b * 100).astype(np.int32))}}
    with pytest.raises(ValueError, match=r"l2/kernel: the adapter's b has dtype int32 \(4, 16\); "
                                         r"LoRA factors must be floating point"):
        lj.save(tmp_path, ints, CFG, **kw)
    assert lj.Checkpointer(tmp_path, read_only=True).steps == []


def test_stored_scales_can_be_declared_authoritative(tmp_path, base):
    """scale_from='adapters': the arrays' scales win, recorded as such, and restore,
    merge and apply all use them."""
    params, ad = base
    cfg = CFG.replace(alpha=99, scale_from="adapters")
    lj.save(tmp_path, ad, cfg, params=params)
    back, cfg2 = lj.restore(tmp_path, params=params)
    assert cfg2.scale_from == "adapters" and cfg2.alpha == 99
    np.testing.assert_array_equal(np.asarray(lj.merge(params, back, cfg2)["l1"]["kernel"]),
                                  np.asarray(lj.merge(params, ad, CFG)["l1"]["kernel"]))
