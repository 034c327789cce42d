"""FLOPs of a LoRA step with layouts read from the program, per ecosystem.

For each model of ``tests/test_ecosystems.py`` (Flax Linen layers and stacks,
NNX, Equinox, Haiku, a Gemma-library-shaped einsum transformer, Keras 3),
built ``--width`` times wider than in the tests, the config has no
``layouts=``: `lj.configure` reads them. Reported from XLA's cost analysis
(compile only, nothing timed): FLOPs of one LoRA step (gradient w.r.t. the
adapters through `lj.apply`) over full fine-tuning (gradient w.r.t. every
param) and over merging inside the step (gradient through ``lj.merge``);
fallbacks (dense uses) found by `lj.explain`. Note: XLA counts a ``scan``
body once, so stacked models count one layer for every per-layer term in all
three variants alike.

  python benchmarks/bench_zero_config.py [--width 8] [--rank 8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lora_jax as lj  # noqa: E402
from benchmarks._common import metadata  # noqa: E402
from tests.test_ecosystems import BUILDERS  # noqa: E402


def measure(name: str, width: int, rank: int) -> dict:
    case = BUILDERS[name](jax.random.key(0), width)
    fn, params, args = case["fn"], case["params"], case["args"]
    cfg = lj.configure(lj.LoraConfig(rank=1, alpha=2, targets=case["targets"]),
                       fn, params, *args)
    # rank `rank`, capped at min(in, out) for the few small heads
    caps = {re.escape(p): min(rank, s.in_size, s.out_size)
            for p, s in lj.describe(params, cfg).specs.items() if min(s.in_size, s.out_size) < rank}
    cfg = cfg.replace(rank=rank, alpha=2.0 * rank, rank_pattern=caps)
    ad = lj.init(params, cfg, key=jax.random.key(1))
    loss = lambda y: jnp.mean(jnp.square(y))  # noqa: E731
    fwd = lj.apply(fn, cfg)

    def flops(f, *xs):
        return float(jax.jit(f).lower(*xs).compile().cost_analysis()["flops"])

    lora = flops(jax.grad(lambda a, p, *x: loss(fwd(p, a, *x))), ad, params, *args)
    merged = flops(jax.grad(lambda a, p, *x: loss(fn(lj.merge(p, a, cfg), *x))), ad, params,
                   *args)
    full = flops(jax.grad(lambda p, *x: loss(fn(p, *x))), params, *args)
    e = lj.explain(fn, cfg, params, ad, *args)
    return {"model": name, "targets": len(e.rules), "fallbacks": e.n_fallbacks,
            "lora_gflop": lora / 1e9, "full_gflop": full / 1e9, "merge_gflop": merged / 1e9,
            "lora_over_full": lora / full, "lora_over_merge_in_step": lora / merged}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--only", default=None, help="comma-separated model names")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(BUILDERS)
    rows = []
    for name in names:
        r = measure(name, args.width, args.rank)
        rows.append(r)
        print(f"{name:14s} targets {r['targets']:3d}  fallbacks {r['fallbacks']}  "
              f"LoRA/full {r['lora_over_full']:.3f}  LoRA/merge-in-step "
              f"{r['lora_over_merge_in_step']:.3f}  ({r['lora_gflop']:.3f} GFLOP)", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": metadata(), "width": args.width, "rank": args.rank,
                       "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
