"""SIGKILL at random moments of a save: the previous step always survives.

A zygote process imports jax and lora_jax once (without starting a JAX
backend) and forks one saver per trial, so each trial costs a fork, not a
Python start. The saver saves steps in a loop (adapters, optimizer state and
rng, synchronous or asynchronous Orbax writes) until the test SIGKILLs it at
a random moment. After every kill the test checks that every listed step
restores bit-exactly (with a verified sha256), that the latest step is at
least the last one the saver reported finished, and that a half-written
step is invisible; the next saver then writes over the leftovers.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import lora_jax as lj
from tests.conftest import ROOT, SEED

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

TRIALS = 12

# The saver's data is a pure function of the step, so the test can rebuild it.
_DATA = textwrap.dedent("""
    import numpy as np

    N_LAYERS, D, R = 6, 384, 48

    def data_for(step):
        g = np.random.default_rng(1000 + step)
        ad = {f"l{i}": {"kernel": (g.standard_normal((D, R), dtype=np.float32),
                                   g.standard_normal((R, D), dtype=np.float32))}
              for i in range(N_LAYERS)}
        opt = {"mu": g.standard_normal((N_LAYERS, D, R), dtype=np.float32),
               "count": np.asarray(step, np.int32)}
        return ad, opt, np.asarray([step, 7], np.uint32)
""")

_ZYGOTE = _DATA + textwrap.dedent(f"""
    import json, os, signal, sys, time
    sys.path.insert(0, {ROOT!r})
    import jax                    # imported, but no backend starts before fork
    import lora_jax as lj

    CFG = lj.LoraConfig(rank=R, alpha=2 * R, targets=r"l\\d+/kernel")

    def adapters(ad):
        return {{k: {{"kernel": lj.LoraWeights(a, b, np.float32(2.0))}}
                 for k, v in ad.items() for a, b in [v["kernel"]]}}

    def saver(directory, use_async):
        with lj.Checkpointer(directory, max_to_keep=2, async_save=use_async) as ck:
            print(json.dumps({{"ready": os.getpid()}}), flush=True)
            first = True   # a new process's first save is slower (warm-up)
            while True:
                step = 0 if ck.latest_step is None else ck.latest_step + 1
                ad, opt, rng = data_for(step)
                t0 = time.perf_counter()
                ck.save(step, adapters(ad), CFG, opt_state=opt, rng=rng)
                ck.wait()
                print(json.dumps({{"done": step, "pid": os.getpid(), "first": first,
                                  "secs": time.perf_counter() - t0}}), flush=True)
                first = False

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # killed savers are reaped at once
    print(json.dumps({{"zygote": os.getpid()}}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                saver(cmd["dir"], cmd["async"])
            finally:
                os._exit(1)
        print(json.dumps({{"forked": pid}}), flush=True)
""")

exec(_DATA)  # noqa: S102 - data_for, shared with the zygote


def _reader(stream, q):
    for line in stream:
        try:
            q.put(json.loads(line))
        except json.JSONDecodeError:
            pass


def _next(q, key, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            msg = q.get(timeout=0.5)
        except queue.Empty:
            continue
        if key in msg:
            return msg
        if "done" in msg:
            _next.done.append(msg)
    raise AssertionError(f"no {key!r} message from the zygote within {timeout}s")


_next.done = []


def _gone(pid, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.005)
    raise AssertionError(f"killed saver {pid} did not go away")


def _check_directory(directory, last_done):
    """Every listed step restores bit-exactly; the partial one is invisible."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    partial = [n for n in names if "orbax-checkpoint-tmp" in n]
    if last_done < 0:
        try:
            info = lj.checkpoint_info(directory)
        except lj.CheckpointError:
            return partial, None
    else:
        info = lj.checkpoint_info(directory)
    assert info.steps[-1] >= last_done, (info.steps, last_done)
    for p in partial:
        assert int(p.split(".")[0]) not in info.steps
    for step in info.steps:
        ad, _ = lj.restore(directory, step=step)      # flat form, sha256-verified
        want, opt, rng = data_for(step)
        for name, layer in want.items():
            a, b = layer["kernel"]
            got = ad[f"{name}/kernel"]
            assert np.array_equal(np.asarray(got.a), a) and np.array_equal(np.asarray(got.b), b)
    return partial, info.steps


def _drain(q):
    """Moves the "done" messages waiting in ``q`` onto ``_next.done``."""
    while True:
        try:
            msg = q.get_nowait()
        except queue.Empty:
            return
        if "done" in msg:
            _next.done.append(msg)


def _tmp_names(directory) -> set:
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return {n for n in names if "orbax-checkpoint-tmp" in n}


def _wait_for_partial(directory, q, timeout=120.0):
    """Blocks until this saver has finished one step and is writing another
    (a new Orbax tmp directory exists, not a leftover of an earlier kill)."""
    deadline = time.time() + timeout
    before = None
    while time.time() < deadline:
        if before is None:
            try:
                msg = q.get(timeout=0.001)
            except queue.Empty:
                continue
            if "done" in msg:
                _next.done.append(msg)
                before = _tmp_names(directory)
            continue
        if _tmp_names(directory) - before:
            return
    raise AssertionError(f"the saver wrote no step within {timeout}s")


def run_kill_trials(directory: str, *, trials: int, seed: int, budget_s: float | None = None
                    ) -> dict:
    """Runs ``trials`` kill trials (stopping early only past ``budget_s``, if given);
    raises on the first failure.

    Trials alternate between two kinds. A *random* kill lands anywhere within
    the first save plus about two more. A *targeted* kill waits until the
    saver has finished one step and is writing the next (Orbax's tmp
    directory exists), then kills it: a complete previous step and a save in
    flight, by construction. Returns ``{"trials", "targeted", "mid_save",
    "steps_done", "median_save_s", "median_first_save_s"}``: ``mid_save``
    counts kills that left a partial step behind.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    zygote = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=env)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(zygote.stdout, q), daemon=True).start()
    gen = np.random.default_rng(seed)
    last_done, done, targeted, mid_save, save_secs, first_secs = -1, 0, 0, 0, [], []
    guess = 0.5
    t_start = time.time()
    try:
        _next(q, "zygote")
        while done < trials and (budget_s is None or time.time() - t_start < budget_s):
            zygote.stdin.write(json.dumps({"dir": directory, "async": done % 2 == 1}) + "\n")
            zygote.stdin.flush()
            pid = _next(q, "forked")["forked"]
            _next(q, "ready")
            if done % 2 == 1:
                _wait_for_partial(directory, q)
                targeted += 1
            elif first_secs:
                later = save_secs or first_secs
                horizon = float(np.median(first_secs)) + 2 * float(np.median(later))
                time.sleep(gen.uniform(0.0, horizon))
            else:  # no save finished yet: widen the guess until one does
                guess = min(8.0, guess * 1.5)
                time.sleep(gen.uniform(0.0, guess))
            os.kill(pid, signal.SIGKILL)
            _gone(pid)
            time.sleep(0.05)
            _drain(q)
            for msg in _next.done:
                last_done = max(last_done, msg["done"])
                (first_secs if msg["first"] else save_secs).append(msg["secs"])
            _next.done.clear()
            partial, _ = _check_directory(directory, last_done)
            mid_save += bool(partial)
            done += 1
    finally:
        zygote.stdin.close()
        zygote.kill()
        zygote.wait()
        zygote.stdout.close()
    return {"trials": done, "targeted": targeted, "mid_save": mid_save,
            "steps_done": last_done + 1,
            "median_save_s": float(np.median(save_secs)) if save_secs else None,
            "median_first_save_s": float(np.median(first_secs)) if first_secs else None}


@pytest.mark.slow
def test_sigkill_during_save_never_loses_the_previous_step(tmp_path):
    r = run_kill_trials(str(tmp_path / "ckpt"), trials=TRIALS, seed=SEED)
    print(f"\nkill test: {r['trials']} trials ({r['targeted']} targeted), {r['mid_save']} "
          f"killed mid-save (partial step left behind), {r['steps_done']} steps completed, "
          f"median save {r['median_save_s']}s (first save of a process "
          f"{r['median_first_save_s']}s)")
    # Every trial's own checks passed (run_kill_trials raises otherwise). Each
    # targeted trial completed a step before its kill, so steps accumulate.
    assert r["trials"] == TRIALS and r["targeted"] == TRIALS // 2
    assert r["steps_done"] >= r["targeted"]
