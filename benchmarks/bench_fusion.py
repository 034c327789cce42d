"""What the matmul kernel's fusions buy: an ablation on the reference decoder's LoRA step.

Three builds of the same LoRA training step (examples/gpt.py REFERENCE, Linen,
Adam, rank r on q, k, v, o, fc1, fc2), against the frozen forward+backward of
`bench_scaling.py` (the step LoRA cannot avoid; see its docstring):

  separate     each projection its own kernel (lora_jax 0.2's form)
  shared       the default: q, k and v (one input) share ``x @ [a_q|a_k|a_v]``,
               ``x.T @ [dt_q|dt_k|dt_v]`` and ``[dt_q|dt_k|dt_v] @ [a_q|a_k|a_v].T``

``separate`` is built by switching sharing off inside lora_jax for the time
of tracing (a private hook, for this ablation only). A third form, the input
gradient as one product ``[g | dt] @ [W | a].T``, was measured in the same
way and dropped (no faster, 15% more temporary memory: RESULTS.md). Reports XLA's own
figures -- FLOPs (cost analysis), bytes accessed, temporary bytes (memory
analysis), which do not depend on the machine's load -- and interleaved step
times (medians) with the adapter overhead ``lora / frozen - 1``.

Usage:
  python benchmarks/bench_fusion.py [--ranks 8,16] [--rounds 7] [--reps 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402
import bench_scaling  # noqa: E402

from examples import gpt  # noqa: E402
from lora_jax._apply import rules  # noqa: E402

VARIANTS = ("separate", "shared")


@contextlib.contextmanager
def build(variant: str):
    """lora_jax with the fusions of ``variant`` only, while a step is traced."""
    shared = dict(rules.SHARED)
    if variant == "separate":
        rules.SHARED.clear()
    try:
        yield
    finally:
        rules.SHARED.update(shared)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="8,16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="a tiny model (for tests)")
    ap.add_argument("--out", default=os.path.join(_common.OUT_DIR, "bench_fusion.json"))
    args = ap.parse_args(argv)
    cfg = gpt.GPTConfig(**{**gpt.REFERENCE.__dict__, "max_len": args.seq})
    if args.tiny:
        cfg = gpt.GPTConfig(vocab=97, d_model=64, n_heads=4, n_layers=2, d_mlp=128, max_len=16)
        args.ranks, args.batch, args.seq, args.rounds = "4", 2, 16, 1
    ranks = [int(r) for r in args.ranks.split(",")]
    result = _common.metadata()
    result["settings"] = dict(model="examples/gpt.py REFERENCE" if not args.tiny else "tiny",
                              batch=args.batch, seq=args.seq, ranks=ranks,
                              rounds=args.rounds, reps=args.reps)
    figures, runners = {}, {}
    for variant in VARIANTS:
        with build(variant):
            steps = bench_scaling.steps_for(cfg, args.batch, args.seq, ranks)
            for name, (fn, make_state, advance) in steps.items():
                if name == "full" or (name == "frozen" and variant != VARIANTS[0]):
                    continue
                key = name if name == "frozen" else f"{name}_{variant}"
                figures[key], compiled = _common.analyse(fn, make_state())
                runners[key] = _common.runner(compiled, make_state, advance)
                f = figures[key]
                print(f"{key:22} {f['flops'] / 1e9:8.2f} GFLOP  "
                      f"{f['bytes_accessed'] / 2**20:9.0f} MiB accessed  "
                      f"{f['temp_bytes'] / 2**20:6.0f} MiB temp", flush=True)
    timing = _common.interleaved(runners, args.rounds, args.reps)
    frozen = timing["frozen"]["median_s"]
    for key, t in timing.items():
        figures[key].update(t)
        if key != "frozen":
            figures[key]["overhead_time"] = t["median_s"] / frozen - 1
            # paired: each round's step over that round's frozen step (drift cancels)
            figures[key]["overhead_time_paired"] = statistics.median(
                v / f for v, f in zip(t["times_s"], timing["frozen"]["times_s"],
                                      strict=True)) - 1
            figures[key]["overhead_flops"] = figures[key]["flops"] / figures["frozen"]["flops"] - 1
    result["variants"] = figures
    print(f"{'variant':22} {'median ms':>10} {'overhead t':>11} {'paired':>8} "
          f"{'overhead F':>11} {'MiB accessed':>13} {'MiB temp':>9}")
    for key, f in figures.items():
        ot = f"{f['overhead_time']:+.3f}" if "overhead_time" in f else ""
        op = f"{f['overhead_time_paired']:+.3f}" if "overhead_time" in f else ""
        of = f"{f['overhead_flops']:+.3f}" if "overhead_flops" in f else ""
        print(f"{key:22} {f['median_s'] * 1e3:10.1f} {ot:>11} {op:>8} {of:>11} "
              f"{f['bytes_accessed'] / 2**20:13.0f} {f['temp_bytes'] / 2**20:9.0f}")
    _common.write_json(args.out, result)


if __name__ == "__main__":
    main()
