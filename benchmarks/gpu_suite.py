"""A GPU run ready to go: training MFU, mixed-adapter serving and bf16 correctness in one JSON.

One command on an NVIDIA GPU (H100 / H200 class) runs three sections and writes
``benchmarks/out/gpu_suite_<platform>.json``, naming the GPU (``device_kind``):

``training``
  bench_gpu.py's ~1B Llama-shaped decoder (TinyLlama-1.1B's shape, bfloat16, sequence
  2048, batch 4; its ``Llama``, ``build``, ``matmul_params`` and ``peak_flops``, imported,
  not copied): full fine-tuning, LoRA r=16 and NF4 QLoRA, interleaved rounds of
  back-to-back steps. Per variant: step time, tokens/s and MFU counted as bench_gpu.py
  counts it (``tokens/s * F / peak``, F = 6N per token for full fine-tuning and 4N for
  LoRA / QLoRA, N = the matmul parameters), XLA's cost and memory analyses; the device's
  peak and current bytes in use after all three ran; and LoRA MFU / full MFU against the
  target >= 0.9 (``met`` true/false; the peak cancels in the ratio, so it is the ratio of
  achieved model FLOP/s and is recorded on any device).

``correctness``
  On one batch of the same model, LoRA with non-zero random B (``lj.apply`` on the
  bfloat16 base, bfloat16 factors) and the merged model (``lj.merge`` into the bfloat16
  base) are each compared with a float32 reference: the float32 weights merged in
  float32 and run in float32 at ``jax.default_matmul_precision("highest")``. Then the
  same for QLoRA (``lj.apply`` on the NF4 base) against ``lj.dequantize`` of that base
  merged (the reference: the dequantized base in float32, merged in float32). The
  tolerances (`TOLERANCES`, also written to the JSON) are, per path:
    - logits: ``||x - ref|| / ||ref||`` (Frobenius, over the whole batch) <= 0.1, for
      the unmerged and the merged bfloat16 model each;
    - the unmerged path loses at most 2x what merging does: relative error of
      ``lj.apply`` <= 2 x the merged model's (floored at 1e-4);
    - loss: ``|loss - loss_ref| <= 2e-2`` (absolute, nats; the loss is ~ln(vocab));
    - the adapter matters: the adapted reference differs from the unadapted one by at
      least 4x the largest logits error above (else any adapter would pass).
  bfloat16 keeps 8 significant bits (rounding 2^-9 ~ 2e-3 relative per operation), and
  a randomly initialised 22-layer decoder accumulates it: on this project's 2-core CPU
  (where XLA may compute bfloat16 products in float32) the relative logits error was
  6e-3 for the tiny model, 1.1e-2 for bench_gpu.py's ``small`` one, and 3.1e-2 (LoRA,
  both paths) / 2.7e-2 (QLoRA) for the 1b shape on 1 x 128 tokens, with loss differences
  <= 4e-3 and an adapter effect of 0.69; the 0.1 and 2e-2 leave ~3-5x room. A GPU's
  cuBLAS rounds differently, so a GPU run is their first test there.

``multi``
  bench_multi.py's serving figures for its full configuration (examples/gpt.py
  REFERENCE, 16 adapters of rank 8, 64 x 128 tokens; 5 rounds, 15 decode rounds, 100
  swaps: its defaults), by calling its ``setup`` and ``run_part``: mixed / single /
  loop / merge throughput, the decode-shaped batch, rank padding vs grouping, hot swap
  (and compilations during swaps), and training many adapters at once.

Time budget: every section (and every part of ``multi``) records its wall time; before
the correctness check and each part of ``multi`` the script checks the time left of
``--budget-s`` (default 450 s) against a rough need for that part and skips it, saying so
in the JSON (``suite.skipped``), when it would not fit. A running compile cannot be
interrupted, so the budget bounds the start of work, not its end.

Estimate of the full GPU run (NOT measured: this script has never run on a GPU in this
project; no GPU has been lent to it): training at 8192 tokens/step is ~6e13 FLOP per
full-FT step, ~0.15 s at 40% MFU on an H100/H200, so 3 variants x (1 warm-up + 4 rounds)
x 5 steps take well under a minute; the compiles of the three 1B train steps (one
scanned layer each) are guessed at 30-90 s each, the four 1B forwards of the
correctness check at 10-30 s each, and bench_multi.py's ~40 small compiles plus its
timing at 1-3 minutes. That sums to roughly 3.5-7 minutes, under the 8-minute target if
the compile guesses hold; the budget guard drops the last parts of ``multi`` if they do
not. No GPU figure in this docstring or in benchmarks/RESULTS.md comes from a run.

``--tiny`` runs every section on the tiny configurations (bench_gpu.py's ``tiny``
decoder, bench_multi.py's ``--smoke`` decoder, fewer rounds) on any device, CPU
included, and writes ``gpu_suite_tiny_<platform>.json``: it checks that the suite works,
not how fast anything is. Without ``--tiny`` the script refuses to run on anything but
a GPU (exit status 2).

Usage:
  python benchmarks/gpu_suite.py                    # on an NVIDIA GPU, < 8 minutes
  python benchmarks/gpu_suite.py --tiny             # anywhere, ~1 minute on 2 CPU cores
  python benchmarks/gpu_suite.py --budget-s 600 --peak-tflops 989 --out /tmp/suite.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

T_START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402
import bench_gpu  # noqa: E402
import bench_multi  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lora_jax as lj  # noqa: E402
from examples import llama  # noqa: E402

VARIANTS = ("full", "lora", "qlora")
RANK = 16
TOLERANCES = dict(
    logits_rel=0.1,           # ||x - ref||_F / ||ref||_F, each bfloat16 path vs the float32 ref
    unmerged_over_merged=2.0,  # the lj.apply path's error / the merged model's error
    ratio_floor=1e-4,          # the merged error the ratio is taken against is at least this
    loss_abs=2e-2,             # |loss - loss_ref|, nats
    adapter_effect_over_error=4.0,  # ||ref - ref_without_adapter|| / ||ref|| vs the errors
)


# Sizes. GPU: bench_gpu.py's 1b configuration and default steps x rounds, bench_multi.py's
# default rounds; tiny: the smallest configurations, 4 rounds (so quartiles exist).
@dataclasses.dataclass(frozen=True, kw_only=True)
class Sizes:
    config: str          # bench_gpu.CONFIGS key
    steps: int           # training steps per variant per round
    rounds: int          # interleaved training rounds (after one warm-up round)
    check_batch: int     # sequences in the correctness check
    multi_smoke: bool    # bench_multi.py's --smoke decoder
    multi_rounds: int
    decode_rounds: int
    swaps: int
    budget_s: float      # default --budget-s


SIZES = {
    "gpu": Sizes(config="1b", steps=5, rounds=4, check_batch=2, multi_smoke=False,
                 multi_rounds=5, decode_rounds=15, swaps=100, budget_s=450.0),
    "tiny": Sizes(config="tiny", steps=1, rounds=4, check_batch=2, multi_smoke=True,
                  multi_rounds=2, decode_rounds=2, swaps=5, budget_s=600.0),
}
# Rough wall time each later part needs on an H100-class GPU (guesses, see the docstring);
# a part starts only if this much of the budget is left.
NEEDS_S = {"correctness": 90.0, "multi/setup": 10.0, "multi/throughput": 60.0,
           "multi/decode": 50.0, "multi/padding": 25.0, "multi/swap": 15.0,
           "multi/train": 40.0}


class Budget:
    """Wall time left of ``total_s`` since the script started; records what it skipped."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.skipped: dict[str, str] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - T_START

    def allows(self, name: str) -> bool:
        left = self.total_s - self.elapsed()
        if left >= NEEDS_S[name]:
            return True
        self.skipped[name] = (f"skipped: {left:.0f} s of the {self.total_s:.0f} s budget left, "
                              f"~{NEEDS_S[name]:.0f} s needed (estimate)")
        print(f"{name}: {self.skipped[name]}", flush=True)
        return False


# ----------------------------------------------------------------------------- training


def _steps_runner(compiled, state, advance, steps: int, losses: list):
    """A blocking ``() -> None`` running ``steps`` back-to-back steps (bench_gpu.py's way)."""

    def run():
        nonlocal state
        for _ in range(steps):
            out = compiled(*state)
            state = advance(state, out)
        jax.block_until_ready(out)
        losses.append(float(out[2]))
    return run


def training(model, params, tokens, *, steps: int, rounds: int, peak) -> tuple[dict, object]:
    """Tokens/s, MFU and memory of full fine-tuning, LoRA and QLoRA; and the LoraConfig."""
    t0 = time.perf_counter()
    built, skipped, config = bench_gpu.build(model, params, tokens, rank=RANK,
                                             variants=list(VARIANTS))
    n = bench_gpu.matmul_params(params)
    flops_per_token = {"full": 6 * n, "lora": 4 * n, "qlora": 4 * n}
    res, runners, losses = {}, {}, {}
    for name, (fn, state, advance) in built.items():
        res[name], compiled = _common.analyse(fn, state)
        losses[name] = []
        runners[name] = _steps_runner(compiled, state, advance, steps, losses[name])
        print(f"training {name}: compiled in {res[name]['compile_s']:.1f}s", flush=True)
    base, adapters = built["lora"][1][0], built["lora"][1][1]
    fallbacks = lj.explain(model.apply, config, base, adapters, tokens[:, :-1]).n_fallbacks
    del built, base, adapters
    timed = _common.interleaved(runners, rounds, 1, warmup=1)
    tokens_per_step = int(tokens.shape[0] * (tokens.shape[1] - 1))
    for name, t in timed.items():
        per_step = _common.summarize([x / steps for x in t["times_s"]])
        tps = tokens_per_step / per_step["median_s"]
        res[name].update(per_step, steps_per_round=steps, tokens_per_s=tps,
                         model_flops_per_token=flops_per_token[name],
                         model_flops_per_s=tps * flops_per_token[name],
                         mfu=tps * flops_per_token[name] / peak if peak else None,
                         losses=losses[name])
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    ratio = res["lora"]["model_flops_per_s"] / res["full"]["model_flops_per_s"]
    out: dict[str, Any] = dict(
        variants=res, skipped=skipped, peak_flops=peak, lora_explain_fallbacks=fallbacks,
        tokens_per_step=tokens_per_step,
        memory=dict(device_peak_bytes_in_use=stats.get("peak_bytes_in_use"),
                    device_bytes_in_use=stats.get("bytes_in_use"),
                    device_bytes_limit=stats.get("bytes_limit"),
                    xla_total_bytes={k: res[k].get("total_bytes") for k in res},
                    host_peak_rss_bytes=_common.peak_rss_bytes()),
        targets={"lora MFU / full MFU": dict(
            measured=ratio, target=">= 0.90", met=bool(ratio >= 0.9),
            basis="ratio of achieved model FLOP/s (4N and 6N per token); the peak cancels")})
    del runners
    out["wall_s"] = time.perf_counter() - t0
    return out, config


# ----------------------------------------------------------------------------- correctness


def _compare(got, ref, tokens) -> dict:
    got = got.astype(jnp.float32)
    return dict(logits_rel=float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)),
                logits_max_abs_over_max_ref=float(jnp.max(jnp.abs(got - ref))
                                                  / jnp.max(jnp.abs(ref))),
                loss=float(bench_gpu.loss_of(got, tokens)))


def _verdict(unmerged: dict, merged: dict, ref_loss: float, effect: float) -> dict:
    tol = TOLERANCES
    worst = max(unmerged["logits_rel"], merged["logits_rel"])
    checks = {
        "unmerged logits_rel <= logits_rel": unmerged["logits_rel"] <= tol["logits_rel"],
        "merged logits_rel <= logits_rel": merged["logits_rel"] <= tol["logits_rel"],
        "unmerged logits_rel <= unmerged_over_merged x max(merged, ratio_floor)":
            unmerged["logits_rel"] <= tol["unmerged_over_merged"]
            * max(merged["logits_rel"], tol["ratio_floor"]),
        "unmerged |loss - loss_ref| <= loss_abs": abs(unmerged["loss"] - ref_loss)
            <= tol["loss_abs"],
        "merged |loss - loss_ref| <= loss_abs": abs(merged["loss"] - ref_loss)
            <= tol["loss_abs"],
        "adapter effect >= adapter_effect_over_error x worst error":
            effect >= tol["adapter_effect_over_error"] * worst,
    }
    checks = {k: bool(v) for k, v in checks.items()}
    return dict(checks=checks, passed=all(checks.values()))


def correctness(model, params, tokens, config) -> dict:
    """LoRA and QLoRA (unmerged, bfloat16) and their merged models vs float32 references."""
    t0 = time.perf_counter()
    compute = model.c.dtype
    model32 = bench_gpu.Llama(dataclasses.replace(model.c, dtype=jnp.float32), model.remat,
                              model.attention)
    x = tokens[:, :-1]
    fwd = jax.jit(lj.apply(model.apply, config))
    plain = jax.jit(model.apply)
    merge = jax.jit(lambda p, ad: lj.merge(p, ad, config))
    ref_fn = jax.jit(model32.apply)

    def reference(p):
        with jax.default_matmul_precision("highest"):
            return ref_fn(p, x)

    adapters = bench_multi.random_adapter(params, config, 7)   # non-zero B
    ad16 = bench_gpu.cast(adapters, compute)

    def bases(name):
        """(float32 reference base, the base lj.apply runs on, its bfloat16 dense form),
        built one kind at a time to keep fewer 1B copies alive."""
        base16 = bench_gpu.cast(params, compute)
        if name == "lora":
            return params, base16, base16
        qbase = lj.quantize(base16, targets=bench_gpu.TARGETS, method="nf4", config=config)
        deq = lj.dequantize(qbase)                               # bfloat16
        return bench_gpu.cast(deq, jnp.float32), qbase, deq

    out = {}
    for name in ("lora", "qlora"):
        dense, stored, dense16 = bases(name)
        ref = reference(merge(dense, adapters))
        ref_loss = float(bench_gpu.loss_of(ref, tokens))
        effect = float(jnp.linalg.norm(ref - reference(dense)) / jnp.linalg.norm(ref))
        del dense
        unmerged = _compare(fwd(stored, ad16, x), ref, tokens)
        del stored
        merged = _compare(plain(merge(dense16, adapters), x), ref, tokens)
        del ref, dense16
        out[name] = dict(reference_loss=ref_loss, adapter_effect_rel=effect,
                         unmerged=unmerged, merged=merged,
                         **_verdict(unmerged, merged, ref_loss, effect))
        print(f"correctness {name}: logits rel err unmerged {unmerged['logits_rel']:.2e}, "
              f"merged {merged['logits_rel']:.2e}; loss {unmerged['loss']:.4f} / "
              f"{merged['loss']:.4f} vs {ref_loss:.4f}: "
              f"{'pass' if out[name]['passed'] else 'FAIL'}", flush=True)
    return dict(out, tolerances=TOLERANCES, batch=list(x.shape),
                reference="float32 weights merged in float32, float32 compute, "
                          "jax.default_matmul_precision('highest'); QLoRA: the NF4 base "
                          "dequantized (lj.dequantize), then the same",
                unmerged="lj.apply on the bfloat16 (or NF4) base, bfloat16 A and B, "
                         "bfloat16 compute",
                merged="lj.merge into the bfloat16 base (QLoRA: its dequantized bfloat16 "
                       "weights), bfloat16 compute",
                passed=all(out[k]["passed"] for k in ("lora", "qlora")),
                wall_s=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- multi


def multi(sizes: Sizes, budget: Budget) -> dict:
    """bench_multi.py's parts, each while the budget allows, with its wall time."""
    t0 = time.perf_counter()
    objects = bench_multi.setup(sizes.multi_smoke, sizes.multi_rounds)
    results = objects[0]
    out: dict[str, Any] = dict(
        setup=results["setup"], part_wall_s={},
        settings=dict(rounds=sizes.multi_rounds, decode_rounds=sizes.decode_rounds,
                      swaps=sizes.swaps))
    for part in bench_multi.PARTS:
        if not budget.allows(f"multi/{part}"):
            continue
        t = time.perf_counter()
        bench_multi.run_part(part, *objects, rounds=sizes.multi_rounds,
                             decode_rounds=sizes.decode_rounds, n_swaps=sizes.swaps)
        out[part] = results[part]
        out["part_wall_s"][part] = time.perf_counter() - t
    out["wall_s"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- main


def _summary(result: dict) -> str:
    lines = [f"GPU suite ({result['suite']['mode']}) on {result['machine']['device_kind']}: "
             f"{result['suite']['wall_s']:.0f} s (budget {result['suite']['budget_s']:.0f} s)"]
    tr = result["training"]
    for name in VARIANTS:
        v = tr["variants"][name]
        mfu = "n/a (no peak for this device)" if v["mfu"] is None else f"{v['mfu']:.3f}"
        lines.append(f"  {name:6} {v['median_s'] * 1e3:9.1f} ms/step {v['tokens_per_s']:11.0f} "
                     f"tokens/s  MFU {mfu}  XLA {_common.fmt_mib(v.get('total_bytes'))} MiB")
    t = tr["targets"]["lora MFU / full MFU"]
    lines.append(f"  LoRA MFU / full MFU {t['measured']:.3f} (target >= 0.90: "
                 f"{'met' if t['met'] else 'missed'}); device peak "
                 f"{_common.fmt_mib(tr['memory']['device_peak_bytes_in_use'])} MiB")
    if "correctness" in result:
        c = result["correctness"]
        lines.append("  correctness: " + ", ".join(
            f"{k} {'pass' if c[k]['passed'] else 'FAIL'} (logits rel err "
            f"{c[k]['unmerged']['logits_rel']:.1e} unmerged, {c[k]['merged']['logits_rel']:.1e} "
            f"merged; tol {TOLERANCES['logits_rel']:.0e})" for k in ("lora", "qlora")))
    m = result.get("multi", {})
    if "throughput" in m:
        r = m["throughput"]["ratios"]
        lines.append(f"  multi: mixed/single {r['mixed_over_single_throughput']:.2f}x, "
                     f"mixed/loop {r['mixed_over_loop_throughput']:.2f}x")
    if "swap" in m:
        lines.append(f"  multi: compiles during {m['swap']['swaps']} swaps: "
                     f"{m['swap']['compiles_during_swaps']}")
    if "train" in m:
        lines.append("  multi: train mixed/single time "
                     f"{m['train']['mixed_over_single_time']:.2f}x")
    for name, why in result["suite"]["skipped"].items():
        lines.append(f"  {name}: {why}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--tiny", action="store_true",
                    help="every section on the tiny configurations, on any device")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-time budget in seconds (default 450 on a GPU, 600 with --tiny)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 peak in TFLOP/s (default: bench_gpu.py's "
                         "table of known GPUs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = jax.devices()[0]
    if not args.tiny and device.platform != "gpu":
        print(f"gpu_suite.py needs an NVIDIA GPU (found {device.platform}: "
              f"{getattr(device, 'device_kind', device.platform)}); `--tiny` runs the tiny "
              f"configuration anywhere", file=sys.stderr)
        return 2
    mode = "tiny" if args.tiny else "gpu"
    sizes = SIZES[mode]
    budget = Budget(args.budget_s or sizes.budget_s)
    out_path = args.out or os.path.join(
        _common.OUT_DIR, f"gpu_suite_{'tiny_' if args.tiny else ''}{device.platform}.json")

    fields, seq, batch = bench_gpu.CONFIGS[sizes.config]
    model_fields: dict[str, Any] = dict(fields)
    c = llama.LlamaConfig(**model_fields, max_len=seq, dtype=jnp.dtype("bfloat16"))
    model = bench_gpu.Llama(c, "dots", None)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    tokens = jax.random.randint(jax.random.key(2), (batch, seq + 1), 0, c.vocab)
    peak = bench_gpu.peak_flops(device, args.peak_tflops)
    result = _common.metadata(argv)
    result["settings"] = dict(
        config=sizes.config, model=dataclasses.asdict(c) | {"dtype": str(c.dtype)},
        seq=seq, batch=batch, rank=RANK, remat="dots", attention="auto",
        n_params=int(sum(x.size for x in jax.tree.leaves(params))),
        n_matmul_params=int(bench_gpu.matmul_params(params)), sizes=dataclasses.asdict(sizes))

    result["training"], config = training(model, params, tokens, steps=sizes.steps,
                                          rounds=sizes.rounds, peak=peak)
    if budget.allows("correctness"):
        result["correctness"] = correctness(model, params, tokens[:sizes.check_batch],
                                            config)
    del params
    if budget.allows("multi/setup"):
        result["multi"] = multi(sizes, budget)
    wall = budget.elapsed()
    result["suite"] = dict(mode=mode, budget_s=budget.total_s, wall_s=wall,
                           within_budget=wall <= budget.total_s, skipped=budget.skipped,
                           section_wall_s={k: result[k]["wall_s"] for k in
                                           ("training", "correctness", "multi") if k in result},
                           gpu_figures=device.platform == "gpu" and not args.tiny)
    _common.write_json(out_path, result)
    print(_summary(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
