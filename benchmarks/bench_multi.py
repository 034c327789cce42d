"""Benchmark of serving many adapters on one base (`lj.apply_mixed` & co.).

The reference decoder (examples/gpt.py REFERENCE), 16 adapters of rank 8 on
q, k, v, o, fc1, fc2 (random A, non-zero B), one batch of 64 sequences x 128
tokens whose examples are assigned adapters at random. Inference forward
(logits) throughput of:

* ``mixed``   -- `lj.apply_mixed`: one jitted call for the whole batch;
* ``single``  -- `lj.apply` with one adapter for the whole batch (unmerged):
  the ceiling a mixed batch is measured against;
* ``loop``    -- PEFT's approach: a Python loop over the adapters present,
  each running its sub-batch through the jitted `lj.apply` with its adapter
  (every sub-batch size compiled beforehand; outputs scattered back);
* ``merge``   -- merging per request: per adapter present, `lj.merge` (jitted)
  then the plain model on its sub-batch;
* ``base``    -- the model without adapters, for reference.

The same five are also timed on 64 sequences x 1 token (the shape of one
decode step, without a KV cache): not in the issue's specification, but the
regime where a loop's per-call costs show.

Variants run round-robin (interleaved) so each sees the same machine load;
the summary is medians. Also: rank padding vs grouping by rank (16 adapters,
half rank 4 and half rank 16: one padded set vs one mixed call per rank
group), hot-swap latency for a ~1M-parameter adapter (host->device, and
selection from a resident set), and the compile count over 100 swaps.
XLA's cost/memory analyses of the compiled programs are recorded. Writes
``benchmarks/out/bench_multi.json`` and prints a summary.

Training (``train``): one `lj.make_mixed_train_step` step that trains 8
adapters of rank 8 at once (each example of a 16 x 128 batch assigned one at
random; Adam per adapter) against one `lj.make_train_step` step of a single
adapter on the same batch, interleaved; FLOPs from XLA's cost analysis of
both steps.

Usage:
  python benchmarks/bench_multi.py [--rounds 5] [--swaps 100]
  python benchmarks/bench_multi.py --skip throughput decode padding swap   # training only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lora_jax as lj  # noqa: E402
from examples import gpt  # noqa: E402

N_ADAPTERS, RANK, ALPHA, BATCH, SEQ = 16, 8, 16.0, 64, 128


# ----------------------------------------------------------------------------- helpers


def random_adapter(variables, config, seed: int):
    """Random A (lj.init) and a non-zero B, as after training."""
    ad = lj.init(variables, config, key=jax.random.key(seed))
    gen = np.random.default_rng(seed)
    return jax.tree.map(
        lambda n: n._replace(b=jnp.asarray(0.02 * gen.standard_normal(n.b.shape), n.b.dtype))
        if lj.is_lora(n) else n, ad, is_leaf=lj.is_lora)


def analyse(fn, *args) -> tuple[dict, object]:
    lowered = jax.jit(fn).lower(*args)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    return dict(gflop=float(cost["flops"]) / 1e9, compile_s=compile_s,
                temp_mb=mem.temp_size_in_bytes / 1e6,
                arg_mb=mem.argument_size_in_bytes / 1e6), compiled


def interleaved(runners: dict, rounds: int) -> dict:
    """Round-robin timing of ``() -> None`` runners that block; one warm-up each."""
    for run in runners.values():
        run()
    times = {k: [] for k in runners}
    for r in range(rounds):
        for k, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{rounds}: " +
              ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    return {k: dict(median_s=statistics.median(v), min_s=min(v), max_s=max(v), times_s=v)
            for k, v in times.items()}


def groups_of(ids: np.ndarray) -> dict:
    """``{adapter index: example indices}`` for the adapters present."""
    return {int(i): np.nonzero(ids == i)[0] for i in np.unique(ids)}


def loop_runner(fwd, variables, adapters_of, tokens, ids):
    """PEFT's approach: one call per adapter present, on its sub-batch; the
    outputs are put back in batch order on the device."""
    groups = groups_of(ids)
    subs = {i: jnp.asarray(np.asarray(tokens)[idx]) for i, idx in groups.items()}
    order = np.concatenate(list(groups.values()))
    inverse = jnp.asarray(np.argsort(order))

    def run():
        parts = [fwd(variables, adapters_of(i), subs[i]) for i in groups]
        return jax.block_until_ready(jnp.take(jnp.concatenate(parts), inverse, axis=0))
    return run


class CompileCounter:
    """Counts XLA compilations while active (public jax.monitoring events)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0

    def _listener(self, name, duration, **kw):
        self.count += name == self.EVENT

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


# ----------------------------------------------------------------------------- parts


def throughput(model, variables, config, aset, tokens, ids, rounds) -> dict:
    mixed_fn = lj.apply_mixed(model.apply)
    single_fn = lj.apply(model.apply, config)
    merge_fn = jax.jit(lambda v, ad: lj.merge(v, ad, config))
    fwd_single = jax.jit(single_fn)
    fwd_base = jax.jit(model.apply)
    ad0 = lj.select_adapter(aset, 0)
    ids_j = jnp.asarray(ids)
    res = {}
    res["mixed"], c_mixed = analyse(mixed_fn, variables, aset, ids_j, tokens)
    res["single"], c_single = analyse(single_fn, variables, ad0, tokens)
    res["base"], c_base = analyse(model.apply, variables, tokens)
    for k in ("mixed", "single", "base"):
        print(f"{k}: {res[k]['gflop']:.1f} GFLOP, temp {res[k]['temp_mb']:.0f} MB, "
              f"compile {res[k]['compile_s']:.1f}s", flush=True)
    selected = {i: lj.select_adapter(aset, i) for i in range(aset.n)}
    # compile every sub-batch size the loops will see (reported, not timed)
    t0 = time.perf_counter()
    for i, idx in groups_of(ids).items():
        sub = tokens[: len(idx)]
        jax.block_until_ready(fwd_single(variables, selected[i], sub))
        jax.block_until_ready(fwd_base(variables, sub))
    jax.block_until_ready(merge_fn(variables, ad0))
    res["loop_compile_s"] = time.perf_counter() - t0
    res["loop_sizes"] = sorted({len(v) for v in groups_of(ids).values()})

    def merged_fwd(v, ad, sub):
        return fwd_base(merge_fn(v, ad), sub)

    runners = {
        "mixed": lambda: jax.block_until_ready(c_mixed(variables, aset, ids_j, tokens)),
        "single": lambda: jax.block_until_ready(c_single(variables, ad0, tokens)),
        "loop": loop_runner(fwd_single, variables, selected.__getitem__, tokens, ids),
        "merge": loop_runner(merged_fwd, variables, selected.__getitem__, tokens, ids),
        "base": lambda: jax.block_until_ready(c_base(variables, tokens)),
    }
    # the loop reproduces the mixed batch's outputs (a check, not timed)
    want = np.asarray(c_mixed(variables, aset, ids_j, tokens))
    got = np.asarray(runners["loop"]())
    res["loop_vs_mixed_max_rel"] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    t = interleaved(runners, rounds)
    tokens_per_batch = int(np.prod(tokens.shape))
    for k, v in t.items():
        res.setdefault(k, {}).update(v, tokens_per_s=tokens_per_batch / v["median_s"])
    res["ratios"] = {
        "mixed_over_single_throughput": t["single"]["median_s"] / t["mixed"]["median_s"],
        "mixed_over_loop_throughput": t["loop"]["median_s"] / t["mixed"]["median_s"],
        "mixed_over_merge_throughput": t["merge"]["median_s"] / t["mixed"]["median_s"],
        "single_over_base_throughput": t["base"]["median_s"] / t["single"]["median_s"],
    }
    # the same ratios taken within each round, then the median: robust to load drifting
    # between rounds (both variants of a round ran back to back)
    res["paired_ratios"] = {
        k: statistics.median(x / y for x, y in zip(t[num]["times_s"], t[den]["times_s"]))
        for k, num, den in (("mixed_over_single_throughput", "single", "mixed"),
                            ("mixed_over_loop_throughput", "loop", "mixed"),
                            ("mixed_over_merge_throughput", "merge", "mixed"),
                            ("single_over_base_throughput", "base", "single"))}
    return res


def padding_vs_grouping(model, variables, tokens, ids, rounds) -> dict:
    """16 adapters, ranks 4 and 16 alternating: one padded set (every example at
    rank 16) vs one set per rank and one mixed call per group."""
    members, by_rank = {}, {4: {}, 16: {}}
    for i in range(N_ADAPTERS):
        r = 4 if i % 2 == 0 else 16
        cfg = lj.LoraConfig(rank=r, alpha=2.0 * r, targets=gpt.TARGETS)
        pair = (random_adapter(variables, cfg, 100 + i), cfg)
        members[f"a{i}"] = pair
        by_rank[r][f"a{i}"] = pair
    padded = lj.adapter_set(members)
    sets = {r: lj.adapter_set(m) for r, m in by_rank.items()}
    mixed = jax.jit(lj.apply_mixed(model.apply))
    # example e uses adapter ids[e]; in its rank group that is index ids[e] // 2
    group_idx = {r: np.nonzero((ids % 2 == 0) == (r == 4))[0] for r in (4, 16)}
    subs = {r: jnp.asarray(np.asarray(tokens)[idx]) for r, idx in group_idx.items()}
    sub_ids = {r: jnp.asarray((ids[idx] // 2).astype(np.int32)) for r, idx in group_idx.items()}
    ids_j = jnp.asarray(ids)

    inverse = jnp.asarray(np.argsort(np.concatenate(list(group_idx.values()))))

    def grouped():
        parts = [mixed(variables, sets[r], sub_ids[r], subs[r]) for r in group_idx]
        return jax.block_until_ready(jnp.take(jnp.concatenate(parts), inverse, axis=0))

    want = np.asarray(mixed(variables, padded, ids_j, tokens))
    err = float(np.max(np.abs(np.asarray(grouped()) - want)) / np.max(np.abs(want)))
    t = interleaved({"padded": lambda: jax.block_until_ready(
        mixed(variables, padded, ids_j, tokens)), "grouped": grouped}, rounds)
    return dict(t, group_sizes={r: len(v) for r, v in group_idx.items()},
                grouped_vs_padded_max_rel=err,
                padded_over_grouped_throughput=t["grouped"]["median_s"] /
                t["padded"]["median_s"],
                padded_over_grouped_paired=statistics.median(
                    g / p for g, p in zip(t["grouped"]["times_s"], t["padded"]["times_s"])))


def swaps(model, variables, n_swaps: int) -> dict:
    """Hot swap of a ~1M-parameter adapter (rank 28 on the reference targets)."""
    cfg = lj.LoraConfig(rank=28, alpha=56.0, targets=gpt.TARGETS)
    n_params = lj.summary(variables, lj.init(variables, cfg, key=jax.random.key(0))).trainable
    host = [jax.tree.map(np.asarray, random_adapter(variables, cfg, 200 + i)) for i in range(8)]
    aset = lj.adapter_set({f"s{i}": (jax.device_put(h), cfg) for i, h in enumerate(host)})
    fwd = jax.jit(lj.apply(model.apply, aset.config))
    fwd_own = jax.jit(lj.apply(model.apply, cfg))
    tokens = gpt.random_tokens(model.cfg, 1, seed=3, length=SEQ)[:, :-1]
    jax.block_until_ready(fwd(variables, lj.select_adapter(aset, 0), tokens))
    jax.block_until_ready(fwd_own(variables, jax.device_put(host[0]), tokens))
    put, sel, call_same, call_new = [], [], [], []
    resident = jax.device_put(host[0])
    with CompileCounter() as cc:
        for k in range(n_swaps):
            t0 = time.perf_counter()
            ad = jax.block_until_ready(jax.device_put(host[k % len(host)]))
            put.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s = jax.block_until_ready(lj.select_adapter(aset, k % aset.n))
            sel.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(fwd_own(variables, ad, tokens))
            call_new.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(fwd_own(variables, resident, tokens))
            call_same.append(time.perf_counter() - t0)
            jax.block_until_ready(fwd(variables, s, tokens))
    med = statistics.median
    return dict(adapter_params=int(n_params), adapter_mb=4 * n_params / 1e6, swaps=n_swaps,
                compiles_during_swaps=cc.count,
                device_put_ms=1e3 * med(put), select_from_set_ms=1e3 * med(sel),
                forward_new_adapter_ms=1e3 * med(call_new),
                forward_same_adapter_ms=1e3 * med(call_same),
                device_put_ms_p90=1e3 * float(np.percentile(put, 90)))


# ----------------------------------------------------------------------------- main


def training(model, variables, mcfg, rounds: int, n_adapters: int = 8,
             batch: int = 16) -> dict:
    """One step training ``n_adapters`` adapters at once vs one single-adapter step."""
    import optax

    cfg = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=gpt.TARGETS)
    aset = lj.adapter_set({f"t{i}": (random_adapter(variables, cfg, 100 + i), cfg)
                           for i in range(n_adapters)})
    tokens = jnp.asarray(gpt.random_tokens(mcfg, batch, seed=3, length=SEQ))  # SEQ + 1 tokens
    ids = jnp.asarray(np.random.default_rng(4).integers(0, n_adapters, batch), jnp.int32)
    tx = lj.optimizer(optax.adam(1e-3))
    per_example = gpt.loss_fn(model.apply)            # written for a batch; one example here
    mixed = lj.make_mixed_train_step(per_example, tx, jit=False)
    f = lj.apply(per_example, cfg)
    single = lj.make_train_step(f, tx, jit=False)
    ad0 = lj.select_adapter(aset, 0)
    opt_m, opt_s = lj.mixed_opt_state(tx, aset), tx.init(ad0)
    res = {"adapters": n_adapters, "batch": batch, "seq": SEQ, "rank": RANK}
    res["mixed"], c_mixed = analyse(mixed, variables, aset, opt_m, ids, tokens)
    res["single"], c_single = analyse(single, variables, ad0, opt_s, tokens)
    for k in ("mixed", "single"):
        print(f"train {k}: {res[k]['gflop']:.1f} GFLOP, temp {res[k]['temp_mb']:.0f} MB, "
              f"compile {res[k]['compile_s']:.1f}s", flush=True)
    runners = {
        "mixed": lambda: jax.block_until_ready(c_mixed(variables, aset, opt_m, ids, tokens)),
        "single": lambda: jax.block_until_ready(c_single(variables, ad0, opt_s, tokens)),
    }
    t = interleaved(runners, rounds)
    for k, v in t.items():
        res[k].update(v)
    res["mixed_over_single_time"] = t["mixed"]["median_s"] / t["single"]["median_s"]
    res["paired_mixed_over_single_time"] = statistics.median(
        x / y for x, y in zip(t["mixed"]["times_s"], t["single"]["times_s"], strict=True))
    res["mixed_over_single_flops"] = res["mixed"]["gflop"] / res["single"]["gflop"]
    return res


PARTS = ("throughput", "decode", "padding", "swap", "train")


def setup(smoke: bool, rounds: int):
    """What every part runs on: ``(results, model config, model, variables, adapter set,
    tokens, ids)``, ``results`` holding the metadata and the setup record."""
    global BATCH, SEQ
    results = {
        **_common.metadata(),
        "setup": dict(model="examples/gpt.py REFERENCE", adapters=N_ADAPTERS, rank=RANK,
                      batch=BATCH, seq=SEQ, rounds=rounds),
    }
    mcfg = gpt.REFERENCE
    if smoke:
        mcfg = gpt.GPTConfig(vocab=97, d_model=64, n_heads=4, n_layers=2, d_mlp=128, max_len=16)
        BATCH, SEQ = 8, 16
        results["setup"].update(model="smoke", batch=BATCH, seq=SEQ)
    model, variables = gpt.init_linen(mcfg, seed=0)
    cfg = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=gpt.TARGETS)
    aset = lj.adapter_set({f"a{i}": (random_adapter(variables, cfg, i), cfg)
                           for i in range(N_ADAPTERS)})
    tokens = gpt.random_tokens(mcfg, BATCH, seed=1, length=SEQ)[:, :-1]
    ids = np.random.default_rng(2).integers(0, N_ADAPTERS, BATCH).astype(np.int32)
    results["setup"]["adapters_present"] = int(len(np.unique(ids)))
    return results, mcfg, model, variables, aset, tokens, ids


def run_part(part: str, results, mcfg, model, variables, aset, tokens, ids, *, rounds: int,
             decode_rounds: int, n_swaps: int) -> None:
    """Runs one of `PARTS` on `setup`'s objects, into ``results[part]``, and prints it."""
    if part == "throughput":
        results["throughput"] = throughput(model, variables, aset.config, aset, tokens, ids,
                                           rounds)
        print(json.dumps([results["throughput"][k] for k in ("ratios", "paired_ratios")],
                         indent=1), flush=True)
    elif part == "decode":
        # Not in the spec, an extra regime: one token per sequence (a decode
        # step's shape, without a KV cache), where per-call costs dominate.
        results["decode"] = throughput(model, variables, aset.config, aset, tokens[:, :1], ids,
                                       decode_rounds)
        print(json.dumps([results["decode"][k] for k in ("ratios", "paired_ratios")],
                         indent=1), flush=True)
    elif part == "padding":
        results["padding"] = padding_vs_grouping(model, variables, tokens, ids,
                                                 max(1, rounds // 2 + 1))
        print("padding vs grouping:", results["padding"]["padded_over_grouped_throughput"],
              flush=True)
    elif part == "swap":
        results["swap"] = swaps(model, variables, n_swaps)
        print(json.dumps(results["swap"], indent=1), flush=True)
    elif part == "train":
        results["train"] = training(model, variables, mcfg, rounds)
        print(json.dumps({k: v for k, v in results["train"].items()
                          if k not in ("mixed", "single")}, indent=1), flush=True)
    else:
        raise ValueError(f"unknown part {part!r}; the parts are {PARTS}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--swaps", type=int, default=100)
    ap.add_argument("--skip", nargs="*", default=(), choices=PARTS)
    ap.add_argument("--decode-rounds", type=int, default=15)
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny decoder and batch, to check the script runs (no real figures)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "bench_multi.json"))
    args = ap.parse_args()
    objects = setup(args.smoke, args.rounds)
    results = objects[0]
    for part in PARTS:
        if part not in args.skip:
            run_part(part, *objects, rounds=args.rounds, decode_rounds=args.decode_rounds,
                     n_swaps=args.swaps)
    results["machine"]["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
