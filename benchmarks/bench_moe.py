"""Benchmark of LoRA on MoE expert weights: FLOPs (XLA's count) and step time.

One MoE feed-forward block, ``y = down_e(gelu(up_e(x)))`` for each token's
expert ``e`` (top-1 routing, tokens sorted by expert), experts stacked
``(E, d, f)`` / ``(E, f, d)``, per-expert LoRA of rank ``r`` on both. Three
ways of running the experts (the forms `lj.apply` has low-rank rules for):

* ``ragged``  -- ``lax.ragged_dot`` over the sorted tokens;
* ``einsum``  -- dispatch to ``(E, capacity, d)`` slots and a batched einsum;
* ``gather``  -- each token's expert weight gathered, ``W[ids]``, then a
  per-token product (memory-hungry: a weight copy per token; small sizes only).

For each form, three jitted steps on the same batch, interleaved round-robin
(``--rounds`` rounds of 3 calls each; medians reported), each forming the
input gradient as a block inside a network does: ``lora`` (loss and the
adapters' gradients through `lj.apply`), ``frozen`` (the frozen model's loss and input gradient: the
floor the adapter adds to) and ``full`` (loss and the experts' weight
gradients: full fine-tuning). XLA's ``cost_analysis()`` FLOPs of each, next
to the hand count of the low-rank terms, ``6 T r (d + f)`` per adapted
matrix (forward ``x a``, ``(x a) b``; backward ``g b^T``,
``(g b^T) a^T``, ``x^T (g b^T)``, ``(x a)^T g``). Note: XLA:CPU lowers
``ragged_dot`` as a dense product masked per group, so it counts (and
spends) ``E`` times a grouped kernel's FLOPs, for the frozen model and the
adapter alike; GPUs and TPUs have grouped lowerings.

Usage:
  python benchmarks/bench_moe.py [--rounds 7] [--experts 8] [--tokens 1024]
  python benchmarks/bench_moe.py --smoke        # tiny sizes: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
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


def forms(ids, sizes, n_experts, capacity):
    t = ids.shape[0]

    def ragged(p, x):
        h = jax.nn.gelu(jax.lax.ragged_dot(x, p["up"], sizes))
        return jax.lax.ragged_dot(h, p["down"], sizes)

    def einsum(p, x):
        slot = jnp.arange(t) - jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                                jnp.cumsum(sizes)[:-1]])[ids]
        xs = jnp.zeros((n_experts, capacity, x.shape[-1]), x.dtype).at[ids, slot].set(x)
        h = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", xs, p["up"]))
        y = jnp.einsum("ecf,efd->ecd", h, p["down"])
        return y[ids, slot]

    def gather(p, x):
        h = jax.nn.gelu(jnp.einsum("td,tdf->tf", x, p["up"][ids]))
        return jnp.einsum("tf,tfd->td", h, p["down"][ids])

    return {"ragged": ragged, "einsum": einsum, "gather": gather}


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def run_form(name, fn, params, x, rank, rounds):
    cfg = lj.configure(lj.LoraConfig(rank=rank, alpha=2 * rank, targets="up|down"),
                       fn, params, x)
    gen = np.random.default_rng(1)
    ad = lj.init(params, cfg, key=jax.random.key(0))
    ad = jax.tree.map(lambda n: n._replace(b=jnp.asarray(0.02 * gen.standard_normal(n.b.shape),
                                                         n.b.dtype)) if lj.is_lora(n) else n,
                      ad, is_leaf=lj.is_lora)
    fwd = lj.apply(fn, cfg)
    steps = {
        # every step also forms the input gradient, as a block inside a network does
        "lora": (jax.value_and_grad(lambda p, a, x: jnp.mean(fwd(p, a, x) ** 2), (1, 2)),
                 (params, ad, x)),
        "frozen": (jax.value_and_grad(lambda p, x: jnp.mean(fn(p, x) ** 2), 1), (params, x)),
        "full": (jax.value_and_grad(lambda p, x: jnp.mean(fn(p, x) ** 2), (0, 1)),
                 (params, x)),
    }
    res = {"fallbacks": lj.explain(fn, cfg, params, ad, x).n_fallbacks}
    compiled = {}
    for k, (f, args) in steps.items():
        t0 = time.perf_counter()
        compiled[k] = jax.jit(f).lower(*args).compile()
        res[k] = {"gflop": flops(compiled[k]) / 1e9, "compile_s": time.perf_counter() - t0,
                  "temp_mb": compiled[k].memory_analysis().temp_size_in_bytes / 1e6}
    runners = {k: (lambda c=compiled[k], a=steps[k][1]: jax.block_until_ready(c(*a)))
               for k in steps}
    timed = _common.interleaved(runners, rounds, reps=3)
    for k, v in timed.items():
        res[k]["median_ms"] = v["median_s"] * 1e3
        res[k]["q1_ms"], res[k]["q3_ms"] = v["q1_s"] * 1e3, v["q3_s"] * 1e3
    print(f"  {name}: " + ", ".join(f"{k} {res[k]['median_ms']:.2f}ms" for k in steps),
          flush=True)
    t, d, f = x.shape[0], params["up"].shape[1], params["up"].shape[2]
    res["hand_lowrank_gflop"] = 2 * 6 * t * rank * (d + f) / 1e9     # up and down
    res["lora_minus_frozen_gflop"] = res["lora"]["gflop"] - res["frozen"]["gflop"]
    res["lora_over_frozen_time"] = res["lora"]["median_ms"] / res["frozen"]["median_ms"]
    res["lora_over_full_time"] = res["lora"]["median_ms"] / res["full"]["median_ms"]
    res["lora_over_full_flops"] = res["lora"]["gflop"] / res["full"]["gflop"]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--f", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--gather-tokens", type=int, default=128,
                    help="tokens for the gather form (it copies a weight per token)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (no real figures)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "bench_moe.json"))
    a = ap.parse_args()
    if a.smoke:
        a.experts, a.tokens, a.d, a.f, a.rank, a.gather_tokens, a.rounds = 4, 32, 16, 24, 2, 16, 2
    gen = np.random.default_rng(0)
    params = {"up": jnp.asarray(gen.standard_normal((a.experts, a.d, a.f)) * 0.05, jnp.float32),
              "down": jnp.asarray(gen.standard_normal((a.experts, a.f, a.d)) * 0.05,
                                  jnp.float32)}
    results = {**_common.metadata(), "setup": dict(experts=a.experts, tokens=a.tokens, d=a.d,
                                                   f=a.f, rank=a.rank, rounds=a.rounds,
                                                   gather_tokens=a.gather_tokens)}
    for name in ("ragged", "einsum", "gather"):
        t = a.gather_tokens if name == "gather" else a.tokens
        ids = np.sort(gen.integers(0, a.experts, t)).astype(np.int32)
        sizes = np.bincount(ids, minlength=a.experts).astype(np.int32)
        fn = forms(jnp.asarray(ids), jnp.asarray(sizes), a.experts, int(sizes.max()))[name]
        x = jnp.asarray(gen.standard_normal((t, a.d)), jnp.float32)
        results[name] = run_form(name, fn, params, x, a.rank, a.rounds)
        print(name, json.dumps({k: v for k, v in results[name].items()
                                if not isinstance(v, dict)}), flush=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
