"""Benchmark of `lj.apply` on the reference decoder: FLOPs, memory, step time.

One training step (Adam) of the reference decoder (examples/gpt.py
REFERENCE: 4 layers, d512, 8 heads, MLP 2048, vocab 8192; batch 8, seq 128,
float32; LoRA rank 8 on q, k, v, o, fc1, fc2), and of its ``nn.scan`` +
``nn.remat`` variant, four ways:

* ``full_ft``: full fine-tuning (grads and Adam state for every parameter);
* ``merge_in_step``: LoRA through ``lj.merge`` inside the step;
* ``apply``: LoRA through ``lj.apply`` (the default, ``custom_grad=True``);
* ``apply_autodiff``: ``lj.apply(..., custom_grad=False)`` (JAX's autodiff
  of the low-rank form, as the design prototype did);

and inference: the base model, the merged model (the same program as the
base) and the unmerged ``lj.apply`` forward. For each: XLA's FLOPs and bytes
(``compile().cost_analysis()``), memory (``memory_analysis()``: arguments,
temporaries, outputs), compile time, and the median step time over
interleaved (round-robin) runs, plus the median of per-round time ratios,
which cancels slow drifts in machine load. Prints a table and writes
``benchmarks/out/bench_apply.json``.

Usage:
  python benchmarks/bench_apply.py [--rounds 15] [--reps 2] [--only plain|scan]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lora_jax as lj  # noqa: E402
from examples import gpt  # noqa: E402

BATCH, SEQ, RANK, ALPHA = 8, 128, 8, 16.0
TRAIN = ("full_ft", "merge_in_step", "apply", "apply_autodiff")
INFER = ("infer_base", "infer_merged", "infer_unmerged")


# ----------------------------------------------------------------------------- FLOP floors


def floors(c: gpt.GPTConfig) -> dict:
    """Hand-counted matmul FLOPs of one step, as XLA's cost analysis counts them.

    Per layer, a pass over the block's weights costs ``mm = 2 N P`` (N tokens,
    P = 4 d^2 + 2 d m weights), attention ``attn`` (q k^T and p v), and the
    LoRA factors ``lora = 2 N r sum(in + out)`` (x a and t b). A step:

    * full fine-tuning: forward, input grads and weight grads of every
      matmul, attention backward twice the forward: 3 x everything;
    * LoRA floor: forward (+ one LoRA pass), input grads (not for layer 0's
      q, k, v, whose input needs no gradient), no weight grads, attention
      backward, and two LoRA passes (db and dt; da and the LoRA dx).

    With ``nn.scan`` XLA counts a loop body once, so every per-layer term
    counts one layer; with ``nn.remat`` the backward body recomputes the
    block's forward except its last product (fc2's output, which nothing in
    the backward reads), and layer 0 is not special inside the loop.
    """
    n = BATCH * SEQ
    d, m, r, v = c.d_model, c.d_mlp, RANK, c.vocab
    mm = 2 * n * (4 * d * d + 2 * d * m)
    attn = 2 * 2 * BATCH * c.n_heads * SEQ * SEQ * (d // c.n_heads)
    lora = 2 * n * r * (4 * (d + d) + (d + m) + (m + d))
    head = 2 * n * d * v
    if not c.scan:
        L = c.n_layers
        skip = 3 * 2 * n * d * d + 3 * 2 * n * r * d   # layer 0: q, k, v need no dx
        fwd = L * (mm + attn) + head
        full = 3 * fwd
        lora_step = fwd + L * lora + (L * mm + head) + 2 * L * attn + 2 * L * lora - skip
        return dict(full=full, lora=lora_step, fwd=fwd, lora_fwd=fwd + L * lora)
    fc2 = 2 * n * m * d                                 # fc2's product, not recomputed
    fc2_lora = 2 * n * r * d                            # nor its t @ b
    fwd_body = mm + attn
    recompute = fwd_body - fc2
    full = fwd_body + (recompute + 2 * mm + 2 * attn) + 3 * head
    lora_step = (fwd_body + lora) + (recompute + lora - fc2_lora + mm + 2 * attn + 2 * lora) \
        + 2 * head
    return dict(full=full, lora=lora_step, fwd=fwd_body + head, lora_fwd=fwd_body + lora + head)


# ----------------------------------------------------------------------------- variants


def build(c: gpt.GPTConfig):
    """``(train, infer, explanation)``: name -> (jitted fn, make_state, advance)."""
    model, variables = gpt.init_linen(c, seed=0)
    tokens = gpt.random_tokens(c, BATCH, seed=0, length=SEQ)
    # No layouts=: lj.configure reads them from the program (per-layer adapters
    # for the nn.scan stack).
    config = lj.configure(lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=gpt.TARGETS),
                          model.apply, variables, tokens[:, :-1])
    adapters = lj.init(variables, config, key=jax.random.key(1))
    # A non-zero B, so the adapter changes the model (as after some training).
    adapters = jax.tree.map(
        lambda n: n._replace(b=0.01 * jax.random.normal(jax.random.key(2), n.b.shape))
        if lj.is_lora(n) else n, adapters, is_leaf=lj.is_lora)
    tx = optax.adam(1e-4)

    def full_step(params, opt_state, tokens):
        loss, g = jax.value_and_grad(gpt.loss_fn(model.apply))(params, tokens)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def lora_loss(forward):
        def loss(params, adapters, tokens):
            logits = forward(params, adapters, tokens[:, :-1])
            return gpt.causal_lm_loss(logits, tokens[:, 1:])
        return loss

    fwd = lj.apply(model.apply, config)
    fwd_autodiff = lj.apply(model.apply, config, custom_grad=False)
    fwd_merge = lambda p, ad, x: model.apply(lj.merge(p, ad, config), x)  # noqa: E731
    ltx = lj.optimizer(tx)

    def lora_variant(forward):
        return (lj.make_train_step(lora_loss(forward), ltx),
                lambda: [variables, jax.tree.map(jnp.copy, adapters), ltx.init(adapters),
                         tokens],
                lambda state, out: [state[0], out[0], out[1], state[3]])

    train = {
        "full_ft": (jax.jit(full_step, donate_argnums=(0, 1)),
                    lambda: [jax.tree.map(jnp.copy, variables), tx.init(variables), tokens],
                    lambda state, out: [out[0], out[1], state[2]]),
        "merge_in_step": lora_variant(fwd_merge),
        "apply": lora_variant(fwd),
        "apply_autodiff": lora_variant(fwd_autodiff),
    }
    merged = lj.merge(variables, adapters, config)
    x = tokens[:, :-1]
    infer = {
        "infer_base": (jax.jit(model.apply), lambda: [variables, x], None),
        "infer_merged": (jax.jit(model.apply), lambda: [merged, x], None),
        "infer_unmerged": (jax.jit(fwd), lambda: [variables, adapters, x], None),
    }
    return train, infer, lj.explain(model.apply, config, variables, adapters, x)


def paired_ratio(times: dict, num: str, den: str, reps: int) -> float:
    """Median over rounds of (median of num's reps) / (median of den's reps)."""
    a, b = times[num]["times_s"], times[den]["times_s"]
    rounds = [statistics.median(a[i:i + reps]) / statistics.median(b[i:i + reps])
              for i in range(0, len(a), reps)]
    return statistics.median(rounds)


def bench(c: gpt.GPTConfig, label: str, rounds: int, reps: int) -> dict:
    train, infer, explanation = build(c)
    out = {"explain_fallbacks": explanation.n_fallbacks,
           "explain_rules": {p: dict(r) for p, r in explanation.rules.items()}}
    runners = {}
    for name, (fn, make_state, advance) in {**train, **infer}.items():
        res, compiled = _common.analyse(fn, make_state())
        out[name] = res
        runners[name] = _common.runner(compiled, make_state, advance)
        print(f"[{label}] {name}: {res['flops'] / 1e9:.2f} GFLOP, compile "
              f"{res['compile_s']:.1f} s", flush=True)
    times = _common.interleaved(runners, rounds, reps)
    for name, t in times.items():
        out[name].update(t)
    out["floors"] = floors(c)
    out["ratios"] = ratios(out, reps)
    return out


def ratios(res: dict, reps: int) -> dict:
    f, fl = res["full_ft"], res["floors"]
    b = res["infer_base"]
    out = {
        "flops_apply_over_full": res["apply"]["flops"] / f["flops"],
        "flops_floor_apply_over_full": fl["lora"] / fl["full"],
        "flops_merge_over_full": res["merge_in_step"]["flops"] / f["flops"],
        "flops_apply_autodiff_over_full": res["apply_autodiff"]["flops"] / f["flops"],
        "flops_full_over_hand_count": f["flops"] / fl["full"],
        "flops_apply_over_hand_count": res["apply"]["flops"] / fl["lora"],
        "mem_apply_over_full": res["apply"]["total_bytes"] / f["total_bytes"],
        "temp_apply_over_full": res["apply"]["temp_bytes"] / f["temp_bytes"],
        "temp_apply_autodiff_over_full": res["apply_autodiff"]["temp_bytes"] / f["temp_bytes"],
        "temp_merge_over_full": res["merge_in_step"]["temp_bytes"] / f["temp_bytes"],
        "infer_flops_merged_over_base": res["infer_merged"]["flops"] / b["flops"],
        "infer_flops_unmerged_over_base": res["infer_unmerged"]["flops"] / b["flops"],
    }
    for num, den in (("apply", "full_ft"), ("merge_in_step", "full_ft"),
                     ("apply_autodiff", "full_ft"), ("infer_unmerged", "infer_base"),
                     ("infer_merged", "infer_base")):
        key = f"time_{num}_over_{den}"
        out[key] = res[num]["median_s"] / res[den]["median_s"]
        out[key + "_paired"] = paired_ratio(res, num, den, reps)
        out[key + "_cpu"] = res[num]["cpu_median_s"] / res[den]["cpu_median_s"]
    return out


def table(label: str, res: dict) -> str:
    rows = [f"== {label} ==",
            f"{'variant':16} {'GFLOP':>8} {'GB acc':>7} {'args MB':>8} {'temp MB':>8} "
            f"{'out MB':>7} {'total MB':>8} {'compile s':>9} {'median ms':>9}"]
    for k in TRAIN + INFER:
        r = res[k]
        rows.append(f"{k:16} {r['flops'] / 1e9:8.2f} {r['bytes_accessed'] / 1e9:7.2f} "
                    f"{r['arg_bytes'] / 1e6:8.1f} {r['temp_bytes'] / 1e6:8.1f} "
                    f"{r['out_bytes'] / 1e6:7.1f} {r['total_bytes'] / 1e6:8.1f} "
                    f"{r['compile_s']:9.2f} {r['median_s'] * 1e3:9.1f}")
    fl = res["floors"]
    rows.append(f"hand-counted matmul FLOPs: full {fl['full'] / 1e9:.2f} G, LoRA floor "
                f"{fl['lora'] / 1e9:.2f} G (ratio {fl['lora'] / fl['full']:.4f}); "
                f"inference {fl['fwd'] / 1e9:.2f} G, unmerged {fl['lora_fwd'] / 1e9:.2f} G")
    for k, v in res["ratios"].items():
        rows.append(f"  {k:44} {v:.4f}")
    rows.append(f"  explain fallbacks: {res['explain_fallbacks']}")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", choices=("plain", "scan"), default=None)
    ap.add_argument("--out", default=os.path.join(_common.OUT_DIR, "bench_apply.json"))
    args = ap.parse_args()
    result = _common.metadata()
    result["settings"] = dict(batch=BATCH, seq=SEQ, rank=RANK, alpha=ALPHA,
                              rounds=args.rounds, reps=args.reps)
    variants = {"plain": gpt.REFERENCE, "scan_remat": gpt.GPTConfig(scan=True, remat=True)}
    if args.only:
        variants = {k: v for k, v in variants.items() if k.startswith(args.only)}
    for label, c in variants.items():
        result[label] = bench(c, label, args.rounds, args.reps)
        print(table(label, result[label]), flush=True)
    _common.write_json(args.out, result)


if __name__ == "__main__":
    main()
