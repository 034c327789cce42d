"""Benchmark of `lj.apply` on the reference decoder: FLOPs, memory, step time.

Compares one training step of full fine-tuning, of LoRA through
``lj.merge`` inside the step, and of LoRA through ``lj.apply`` (the jaxpr
rewrite), on the reference decoder (examples/gpt.py REFERENCE) and on its
``nn.scan`` + ``nn.remat`` variant; and inference (base, merged, unmerged
``lj.apply``). XLA's cost and memory analyses come from the compiled
executables; step times are medians over interleaved (round-robin) runs,
so every variant sees the same machine load. Writes
``benchmarks/out/bench_apply.json`` and prints a table.

Usage:
  python benchmarks/bench_apply.py [--rounds 15] [--reps 2] [--only plain|scan]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import _common  # noqa: E402  (benchmarks/_common.py; the script's directory is on sys.path)
import lora_jax as lj  # noqa: E402
from examples import gpt  # noqa: E402

BATCH, SEQ, RANK, ALPHA = 8, 128, 8, 16.0


# ----------------------------------------------------------------------------- FLOP floors


def floors(c: gpt.GPTConfig, *, scan: bool) -> dict:
    """Hand-counted matmul FLOPs of one step (what XLA's cost analysis counts).

    XLA counts a while loop's body once, so with ``scan`` every per-layer
    term is counted for one layer; with remat (always on with scan here)
    the backward body recomputes the layer's forward.
    """
    n = BATCH * SEQ
    d, m, r = c.d_model, c.d_mlp, RANK
    p_layer = 4 * d * d + 2 * d * m                      # q, k, v, o, fc1, fc2
    p_head = d * c.vocab
    attn = 2 * 2 * BATCH * c.n_heads * SEQ * SEQ * (d // c.n_heads)  # qk^T and pv
    lora = 2 * n * r * (4 * (d + d) + (d + m) + (m + d))  # x@a and t@b, one pass, one layer
    mm = 2 * n * p_layer                                  # one pass over a layer's weights
    head = 2 * n * p_head
    skip = 3 * 2 * n * d * d + 3 * 2 * n * r * d          # layer 0 needs no dx for q, k, v
    if not scan:
        L = c.n_layers
        full = 3 * (L * (mm + attn) + head)
        fwd = L * (mm + attn) + head
        lora_step = fwd + L * lora + (L * mm + head) + 2 * L * attn + 2 * L * lora - skip
        return dict(full=full, lora=lora_step, fwd=fwd, lora_fwd=fwd + L * lora)
    fwd_body = mm + attn
    full = fwd_body + (fwd_body + 2 * mm + 2 * attn) + 3 * head
    lora_step = (fwd_body + lora) + (fwd_body + lora + mm + 2 * attn + 2 * lora) + 2 * head
    return dict(full=full, lora=lora_step, fwd=fwd_body + head, lora_fwd=fwd_body + lora + head)


# ----------------------------------------------------------------------------- variants


def build(c: gpt.GPTConfig):
    model, variables = gpt.init_linen(c, seed=0)
    layouts = {r"params/blocks/.*": lj.Layout(1, 1, 1)} if c.scan else {}
    config = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=gpt.TARGETS, layouts=layouts)
    adapters = lj.init(variables, config, key=jax.random.key(1))
    # A non-zero B, so the adapter changes the model (as after some training).
    adapters = jax.tree.map(
        lambda n: n._replace(b=0.01 * jax.random.normal(jax.random.key(2), n.b.shape))
        if lj.is_lora(n) else n, adapters, is_leaf=lj.is_lora)
    tokens = gpt.random_tokens(c, BATCH, seed=0, length=SEQ)
    tx = optax.adam(1e-4)

    def full_step(params, opt_state, tokens):
        loss, g = jax.value_and_grad(gpt.loss_fn(model.apply))(params, tokens)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    lora_apply = lj.apply(model.apply, config)
    lora_autodiff = lj.apply(model.apply, config, custom_grad=False)
    loss_apply = lambda p, ad, tok: gpt.loss_fn(lambda v, t: lora_apply(p, ad, t))(None, tok)  # noqa
    loss_autodiff = lambda p, ad, tok: gpt.loss_fn(  # noqa
        lambda v, t: lora_autodiff(p, ad, t))(None, tok)
    loss_merge = lambda p, ad, tok: gpt.loss_fn(model.apply)(lj.merge(p, ad, config), tok)  # noqa
    ltx = lj.optimizer(tx)
    steps = {
        "full_ft": (jax.jit(full_step, donate_argnums=(0, 1)),
                    lambda: [jax.tree.map(jnp.copy, variables), tx.init(variables), tokens],
                    lambda state, out: [out[0], out[1], state[2]]),
        "merge_in_step": (lj.make_train_step(loss_merge, ltx),
                          lambda: [variables, jax.tree.map(jnp.copy, adapters),
                                   ltx.init(adapters), tokens],
                          lambda state, out: [state[0], out[0], out[1], state[3]]),
        "apply": (lj.make_train_step(loss_apply, ltx),
                  lambda: [variables, jax.tree.map(jnp.copy, adapters), ltx.init(adapters),
                           tokens],
                  lambda state, out: [state[0], out[0], out[1], state[3]]),
        "apply_autodiff": (lj.make_train_step(loss_autodiff, ltx),
                           lambda: [variables, jax.tree.map(jnp.copy, adapters),
                                    ltx.init(adapters), tokens],
                           lambda state, out: [state[0], out[0], out[1], state[3]]),
    }
    merged = lj.merge(variables, adapters, config)
    x = tokens[:, :-1]
    infer = {
        "infer_base": (jax.jit(model.apply), lambda: [variables, x], None),
        "infer_merged": (jax.jit(model.apply), lambda: [merged, x], None),
        "infer_unmerged": (jax.jit(lora_apply), lambda: [variables, adapters, x], None),
    }
    explanation = lj.explain(model.apply, config, variables, adapters, x)
    return steps, infer, explanation


# Shared with the other benchmarks: compile + XLA analyses, round-robin timing.
analyse, interleaved, runner = _common.analyse, _common.interleaved, _common.runner


def bench(c: gpt.GPTConfig, label: str, rounds: int, reps: int) -> dict:
    steps, infer, explanation = build(c)
    out = {"explain_fallbacks": explanation.n_fallbacks,
           "explain_rules": {p: dict(r) for p, r in explanation.rules.items()}}
    runners = {}
    for name, (fn, make_state, advance) in {**steps, **infer}.items():
        res, compiled = analyse(fn, make_state())
        out[name] = res
        runners[name] = runner(compiled, make_state, advance)
        print(f"[{label}] {name}: {res['flops'] / 1e9:.2f} GFLOP, compile {res['compile_s']:.1f}s",
              flush=True)
    t = interleaved(runners, rounds, reps)
    for name in t:
        out[name].update(t[name])
    out["floors"] = floors(c, scan=c.scan)
    return out


def ratios(res: dict) -> dict:
    f, a, m = res["full_ft"], res["apply"], res["merge_in_step"]
    b, u = res["infer_base"], res["infer_unmerged"]
    fl = res["floors"]
    return {
        "flops_apply_over_full": a["flops"] / f["flops"],
        "flops_merge_over_full": m["flops"] / f["flops"],
        "floor_apply_over_full": fl["lora"] / fl["full"],
        "flops_apply_vs_floor": a["flops"] / fl["lora"],
        "time_apply_over_full": a["median_s"] / f["median_s"],
        "time_merge_over_full": m["median_s"] / f["median_s"],
        "mem_apply_over_full": a["total_bytes"] / f["total_bytes"],
        "temp_apply_over_full": a["temp_bytes"] / f["temp_bytes"],
        "infer_flops_merged_over_base": res["infer_merged"]["flops"] / b["flops"],
        "infer_flops_unmerged_over_base": u["flops"] / b["flops"],
        "infer_time_unmerged_over_base": u["median_s"] / b["median_s"],
        "infer_time_merged_over_base": res["infer_merged"]["median_s"] / b["median_s"],
    }


def table(label: str, res: dict) -> str:
    rows = [f"== {label} ==",
            f"{'variant':16} {'GFLOP':>8} {'GB acc':>7} {'args MB':>8} {'temp MB':>8} "
            f"{'out MB':>7} {'compile s':>9} {'median ms':>9}"]
    for k in ("full_ft", "merge_in_step", "apply", "infer_base", "infer_merged",
              "infer_unmerged"):
        r = res[k]
        rows.append(f"{k:16} {r['flops'] / 1e9:8.2f} {r['bytes_accessed'] / 1e9:7.2f} "
                    f"{r['arg_bytes'] / 1e6:8.1f} {r['temp_bytes'] / 1e6:8.1f} "
                    f"{r['out_bytes'] / 1e6:7.1f} {r['compile_s']:9.2f} "
                    f"{r['median_s'] * 1e3:9.1f}")
    fl = res["floors"]
    rows.append(f"hand-counted matmul floor: full {fl['full'] / 1e9:.2f} GFLOP, "
                f"LoRA {fl['lora'] / 1e9:.2f} GFLOP (ratio {fl['lora'] / fl['full']:.4f})")
    for k, v in res["ratios"].items():
        rows.append(f"  {k:34} {v:.4f}")
    rows.append(f"  explain fallbacks: {res['explain_fallbacks']}")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", choices=("plain", "scan"), default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "bench_apply.json"))
    args = ap.parse_args()
    results = {"machine": dict(platform=platform.platform(), processor=platform.processor(),
                               cpu_count=os.cpu_count(), device=str(jax.devices()[0]),
                               python=platform.python_version()),
               "versions": dict(jax=jax.__version__, flax=flax.__version__,
                                optax=optax.__version__, lora_jax=lj.__version__),
               "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
               "settings": dict(batch=BATCH, seq=SEQ, rank=RANK, alpha=ALPHA,
                                rounds=args.rounds, reps=args.reps)}
    variants = {"plain": gpt.REFERENCE,
                "scan_remat": gpt.GPTConfig(scan=True, remat=True)}
    if args.only == "plain":
        variants.pop("scan_remat")
    elif args.only == "scan":
        variants.pop("plain")
    for label, c in variants.items():
        res = bench(c, label, args.rounds, args.reps)
        res["ratios"] = ratios(res)
        results[label] = res
        print(table(label, res), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
