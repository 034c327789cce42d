"""Benchmark of adapter checkpoints: bytes on disk, save/restore time, kill trials.

* Size: bytes of the step's files on disk vs the raw bytes of the arrays,
  for a tiny adapter (two 64 x 64 weights, rank 4), the reference decoder's adapter (rank 8 on q, k, v, o, fc1, fc2:
  294,912 parameters) and for a 100 MiB adapter tree (50 weights of
  4096 x 4096 with rank 64, float32 standard normals: zstd saves ~7%).
* Time (100 MiB tree): `lj.save` (synchronous, includes hashing),
  `lj.Checkpointer.save` with async writes (time until it returns, and until
  the write is on disk), `lj.restore` (includes sha256 verification and the
  NaN check); for reference, plain Orbax ``StandardCheckpointer`` save and
  restore of the same tree, and sha256 of the tree alone. Variants are
  interleaved round-robin; medians of ``--rounds`` after a warm-up round.
* Base fingerprint: `lj.base_fingerprint` on 4096 x 4096 weights.
* Kill trials: ``--kill-trials`` SIGKILL trials (tests/test_killsave.py's
  harness) within ``--kill-budget`` seconds.

Writes ``benchmarks/out/bench_checkpoint.json`` and prints a summary.

Usage:
  python benchmarks/bench_checkpoint.py [--rounds 3] [--kill-trials 100] [--kill-budget 300]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

import lora_jax as lj  # noqa: E402
from examples import gpt  # noqa: E402

MIB = 1024 * 1024


def _random_adapters(params, config, seed):
    """lj.init, then every factor replaced by random normals (incompressible)."""
    ad = lj.init(params, config, key=jax.random.key(seed))
    gen = np.random.default_rng(seed)

    def fill(node):
        if not lj.is_lora(node):
            return node
        return node._replace(a=jnp.asarray(gen.standard_normal(node.a.shape, np.float32)),
                             b=jnp.asarray(gen.standard_normal(node.b.shape, np.float32)))
    return jax.tree.map(fill, ad, is_leaf=lambda x: x is None or lj.is_lora(x))


def _raw_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _big_tree(n=50, d=4096, r=64):
    params = {f"w{i:02d}": jax.ShapeDtypeStruct((d, d), jnp.float32) for i in range(n)}
    config = lj.LoraConfig(rank=r, alpha=2 * r, targets=r"w\d+")
    return params, config, _random_adapters(params, config, 0)


def _reference_tree():
    shapes = jax.eval_shape(gpt.GPT(gpt.REFERENCE).init, jax.random.key(0),
                            jnp.zeros((1, 8), jnp.int32))
    config = lj.LoraConfig(rank=8, alpha=16, targets=gpt.TARGETS)
    return shapes, config, _random_adapters(shapes, config, 1)


def size_report(name, params, config, ad, workdir) -> dict:
    d = os.path.join(workdir, f"size-{name}")
    lj.save(d, ad, config)
    info = lj.checkpoint_info(d)
    raw = _raw_bytes(ad)
    # Everything but the (zstd-compressed) array chunks: Orbax's tree metadata,
    # sharding, manifests and index nodes, and lora_jax's JSON record.
    meta = 0
    for root, _, files in os.walk(os.path.join(d, str(info.step))):
        for f in files:
            path = os.path.join(root, f)
            if not (os.sep + "d" + os.sep in path and os.path.getsize(path) > 4096):
                meta += os.path.getsize(path)
    record = os.path.getsize(os.path.join(d, str(info.step), "lora_jax", "metadata"))
    return {"tree": name, "n_params": info.n_params, "raw_bytes": raw,
            "disk_bytes": info.disk_bytes, "ratio": info.disk_bytes / raw,
            "overhead_bytes": info.disk_bytes - raw, "metadata_bytes": meta,
            "record_bytes": record,
            "n_arrays": 3 * sum(1 for r in info.rows if r[1] == "lora")}


def timing_report(ad, config, workdir, rounds) -> dict:
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ad)
    counter = iter(range(10**6))

    def fresh():
        return os.path.join(workdir, f"t{next(counter)}")

    state = {}

    def lj_save():
        d = fresh()
        t0 = time.perf_counter()
        lj.save(d, ad, config)
        state["dir"] = d
        return {"save_s": time.perf_counter() - t0}

    def lj_async():
        d = fresh()
        with lj.Checkpointer(d, async_save=True) as ck:
            t0 = time.perf_counter()
            ck.save(0, ad, config)
            t1 = time.perf_counter()
            ck.wait()
            t2 = time.perf_counter()
        return {"async_return_s": t1 - t0, "async_done_s": t2 - t0}

    def lj_restore():
        t0 = time.perf_counter()
        back, _ = lj.restore(state["dir"], like=like)
        jax.block_until_ready(back)
        return {"restore_s": time.perf_counter() - t0}

    flat = {lj.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(ad)[0]}

    def orbax_plain():
        d = fresh()
        ck = ocp.StandardCheckpointer()
        t0 = time.perf_counter()
        ck.save(d, flat)
        ck.wait_until_finished()
        t1 = time.perf_counter()
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                    for k, v in flat.items()}
        back = ck.restore(d, abstract)
        jax.block_until_ready(back)
        t2 = time.perf_counter()
        return {"orbax_save_s": t1 - t0, "orbax_restore_s": t2 - t1}

    def sha_only():
        t0 = time.perf_counter()
        for x in flat.values():
            hashlib.sha256(np.asarray(x).tobytes()).hexdigest()
        return {"sha256_s": time.perf_counter() - t0}

    variants = [lj_save, lj_restore, lj_async, orbax_plain, sha_only]
    for v in variants:          # warm-up round (compilation, first file-system use)
        v()
    samples: dict[str, list] = {}
    for _ in range(rounds):
        for v in variants:      # interleaved: every variant sees the same load
            for k, x in v().items():
                samples.setdefault(k, []).append(x)
        for name in os.listdir(workdir):
            if name.startswith("t") and os.path.join(workdir, name) != state["dir"]:
                shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    out = {k: statistics.median(v) for k, v in samples.items()}
    out["samples"] = samples
    mb = _raw_bytes(ad) / 1e6
    out["save_MBps"] = mb / out["save_s"]
    out["restore_MBps"] = mb / out["restore_s"]
    return out


def fingerprint_report(n=8, d=4096, rounds=3) -> dict:
    """Seconds per 4096 x 4096 float32 weight of `lj.base_fingerprint`, sampled (every
    row and column) and full (every byte), interleaved; medians of ``rounds``."""
    gen = np.random.default_rng(0)
    params = {f"w{i}": jnp.asarray(gen.standard_normal((d, d), np.float32)) for i in range(n)}
    config = lj.LoraConfig(rank=8, targets=r"w\d+")
    out = {"weights": n, "shape": [d, d], "rounds": rounds}
    times: dict[str, list] = {"sampled": [], "full": []}
    for mode in times:                                   # warm-up (gathers compile per shape)
        lj.base_fingerprint(params, config, mode=mode)
    for _ in range(rounds):
        for mode in times:
            t0 = time.perf_counter()
            fp = lj.base_fingerprint(params, config, mode=mode)
            times[mode].append(time.perf_counter() - t0)
            out[f"{mode}_json_bytes"] = len(json.dumps(fp))
    for mode, ts in times.items():
        out[f"{mode}_per_weight_s"] = float(np.median(ts)) / n
    out["per_weight_s"] = out["sampled_per_weight_s"]
    out["json_bytes"] = out["sampled_json_bytes"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kill-trials", type=int, default=100)
    ap.add_argument("--kill-budget", type=float, default=300.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out",
                                                  "bench_checkpoint.json"))
    args = ap.parse_args()
    results = {
        "device": str(jax.devices()[0]), "platform": platform.platform(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "versions": {"jax": jax.__version__, "orbax-checkpoint": ocp.__version__
                     if hasattr(ocp, "__version__") else None, "numpy": np.__version__,
                     "lora_jax": lj.__version__},
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
    }
    try:
        from importlib.metadata import version
        results["versions"]["orbax-checkpoint"] = version("orbax-checkpoint")
    except Exception:  # noqa: BLE001 - informational only
        pass
    workdir = tempfile.mkdtemp(prefix="bench_ckpt_")
    try:
        ref = _reference_tree()
        big = _big_tree()
        tiny_params = {f"w{i}": jax.ShapeDtypeStruct((64, 64), jnp.float32) for i in range(2)}
        tiny_cfg = lj.LoraConfig(rank=4, targets=r"w\d")
        tiny = (tiny_params, tiny_cfg, _random_adapters(tiny_params, tiny_cfg, 2))
        results["size"] = [size_report("tiny-2x64x64-r4", *tiny, workdir),
                           size_report("reference-gpt-r8", *ref, workdir),
                           size_report("100MiB", *big, workdir)]
        results["timing_100MiB"] = timing_report(big[2], big[1], workdir, args.rounds)
        results["fingerprint"] = fingerprint_report()
        if args.kill_trials:
            from tests.test_killsave import run_kill_trials
            t0 = time.perf_counter()
            kt = run_kill_trials(os.path.join(workdir, "kill"), trials=args.kill_trials,
                                 budget_s=args.kill_budget, seed=0)
            kt["seconds"] = time.perf_counter() - t0
            kt["passed"] = True  # run_kill_trials raises on the first failure
            results["kill_trials"] = kt
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    for s in results["size"]:
        print(f"size {s['tree']:>17}: {s['raw_bytes']:>11,} B raw, {s['disk_bytes']:>11,} B on "
              f"disk, ratio {s['ratio']:.4f}; metadata files {s['metadata_bytes']:,} B (of "
              f"which the lora_jax record {s['record_bytes']:,} B), {s['n_arrays']} arrays")
    t = results["timing_100MiB"]
    print(f"100 MiB: lj.save {t['save_s']:.2f}s ({t['save_MBps']:.0f} MB/s), async save returns "
          f"in {t['async_return_s']:.2f}s (on disk {t['async_done_s']:.2f}s), lj.restore "
          f"{t['restore_s']:.2f}s ({t['restore_MBps']:.0f} MB/s); plain Orbax save "
          f"{t['orbax_save_s']:.2f}s / restore {t['orbax_restore_s']:.2f}s; sha256 alone "
          f"{t['sha256_s']:.2f}s")
    fp = results["fingerprint"]
    print(f"fingerprint: {fp['sampled_per_weight_s'] * 1e3:.1f} ms (sampled) / "
          f"{fp['full_per_weight_s'] * 1e3:.1f} ms (full) per {fp['shape']} weight, "
          f"{fp['json_bytes']:,} JSON bytes for {fp['weights']} weights")
    if "kill_trials" in results:
        k = results["kill_trials"]
        print(f"kill trials: {k['trials']} run, all passed; {k['mid_save']} killed mid-save; "
              f"{k['steps_done']} saves completed; {k['seconds']:.0f}s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
