"""How a lora_jax training step's cost grows with rank and sequence length.

On the reference decoder (examples/gpt.py, Linen), for each point
(sequence length, batch, rank) this measures one Adam training step of

  full        full fine-tuning (every weight gets a gradient and an update)
  frozen      the frozen forward+backward: gradients only with respect to the
              biases of the targeted projections (q, k, v, o, fc1, fc2)
  lora_r{r}   LoRA through `lj.apply` on the same projections, rank r

and reports XLA FLOPs (cost analysis), medians of interleaved step times,
and the **adapter overhead** = lora / frozen - 1.

Why ``frozen`` is the baseline: a LoRA step must run the forward pass and
back-propagate the activation gradient ``dy`` to every targeted projection
(down to the lowest one), but needs no weight gradient ``dW = x^T dy``. A
bias gradient is ``sum(dy)``: taking gradients with respect to exactly
those biases makes XLA run that same backward pass -- all activation
gradients down to the lowest targeted layer, no dW, and (like LoRA) no
input gradient below it -- plus negligible reductions and an Adam update of
a few thousand numbers. What LoRA adds on top of it is its own work: the
rank-r matmuls (forward ``x@A``, ``(xA)@B``; backward ``dB``, ``dA`` and the
adapter's share of ``dx``), their memory traffic, and Adam on A and B.

Sequence sweep keeps the tokens per step constant (``--tokens``, default
1024 = the reference batch 8 x 128), so longer sequences show attention's
growing share, not a bigger batch. Writes
``benchmarks/out/bench_scaling.json`` and prints a table.

Usage:
  python benchmarks/bench_scaling.py [--ranks 4,8,16,32,64] [--seqs 128,256,512,1024]
      [--seq-ranks 8,16] [--rounds 8] [--reps 2] [--quick] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lora_jax as lj  # noqa: E402
from examples import gpt  # noqa: E402

ALPHA_PER_RANK = 2.0  # alpha = 2 * rank (the reference's 16 at rank 8)
BIASES = re.compile(r".*/(q|k|v|o|fc1|fc2)/bias")


def steps_for(cfg: gpt.GPTConfig, batch: int, seq: int, ranks: list[int]):
    """``{name: (jitted step, make_state, advance)}`` for one (seq, batch) point."""
    model, variables = gpt.init_linen(cfg, seed=0)
    tokens = gpt.random_tokens(cfg, batch, seed=0, length=seq)
    tx = optax.adam(1e-4)

    def logits_loss(logits, toks):
        return gpt.causal_lm_loss(logits, toks[:, 1:])

    def full_step(params, opt_state, toks):
        loss, g = jax.value_and_grad(
            lambda p: logits_loss(model.apply(p, toks[:, :-1]), toks))(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    flat = {lj.path_str(kp): leaf for kp, leaf in
            jax.tree_util.tree_flatten_with_path(variables)[0]}
    biases = {p: leaf for p, leaf in flat.items() if BIASES.fullmatch(p)}

    def with_biases(params, b):
        return jax.tree_util.tree_map_with_path(lambda kp, x: b.get(lj.path_str(kp), x), params)

    def frozen_step(b, opt_state, params, toks):
        loss, g = jax.value_and_grad(
            lambda bb: logits_loss(model.apply(with_biases(params, bb), toks[:, :-1]), toks))(b)
        updates, opt_state = tx.update(g, opt_state, b)
        return optax.apply_updates(b, updates), opt_state, loss

    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (donated buffers)
    out = {
        "full": (jax.jit(full_step, donate_argnums=(0, 1)),
                 lambda: [copy(variables), tx.init(variables), tokens],
                 lambda s, o: [o[0], o[1], s[2]]),
        "frozen": (jax.jit(frozen_step, donate_argnums=(0, 1)),
                   lambda: [copy(biases), tx.init(biases), variables, tokens],
                   lambda s, o: [o[0], o[1], s[2], s[3]]),
    }
    for r in ranks:
        config = lj.LoraConfig(rank=r, alpha=ALPHA_PER_RANK * r, targets=gpt.TARGETS)
        adapters = lj.init(variables, config, key=jax.random.key(1))
        fwd = lj.apply(model.apply, config)

        def loss(params, ad, toks, fwd=fwd):
            return logits_loss(fwd(params, ad, toks[:, :-1]), toks)

        ltx = lj.optimizer(tx)
        out[f"lora_r{r}"] = (lj.make_train_step(loss, ltx),
                             lambda ad=adapters, ltx=ltx: [variables, copy(ad), ltx.init(ad),
                                                           tokens],
                             lambda s, o: [s[0], o[0], o[1], s[3]])
    return out


def lora_flops(cfg: gpt.GPTConfig, tokens: int, rank: int) -> float:
    """Hand count of the adapters' matmul FLOPs in one step: 3 passes (forward,
    and the backward's dB, dA and dx shares) of 2 * tokens * r * (in + out),
    minus the dx of layer 0's q, k, v (its input needs no gradient)."""
    d, m = cfg.d_model, cfg.d_mlp
    per_layer = 4 * (d + d) + (d + m) + (m + d)
    total = 3 * 2 * tokens * rank * per_layer * cfg.n_layers
    return total - 3 * 2 * tokens * rank * d


def measure_point(cfg, batch, seq, ranks, rounds, reps) -> dict:
    steps = steps_for(cfg, batch, seq, ranks)
    res, runners = {}, {}
    for name, (fn, make_state, advance) in steps.items():
        res[name], compiled = _common.analyse(fn, make_state())
        runners[name] = _common.runner(compiled, make_state, advance)
        print(f"  seq {seq} batch {batch} {name}: {res[name]['flops'] / 1e9:.2f} GFLOP, "
              f"compile {res[name]['compile_s']:.1f}s", flush=True)
    timing = _common.interleaved(runners, rounds, reps)
    for name in res:
        res[name].update(timing[name])
    fz = res["frozen"]
    for r in ranks:
        lo = res[f"lora_r{r}"]
        lo.update(overhead_time=lo["median_s"] / fz["median_s"] - 1,
                  overhead_flops=lo["flops"] / fz["flops"] - 1,
                  lora_flops_hand=lora_flops(cfg, batch * seq, r),
                  over_full_time=lo["median_s"] / res["full"]["median_s"],
                  over_full_flops=lo["flops"] / res["full"]["flops"])
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="4,8,16,32,64", help="rank sweep (at the shortest seq)")
    ap.add_argument("--seqs", default="128,256,512,1024", help="sequence sweep")
    ap.add_argument("--seq-ranks", default="8,16", help="ranks measured at every seq")
    ap.add_argument("--tokens", type=int, default=1024, help="batch * seq, held constant")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 1 rep")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (for tests)")
    ap.add_argument("--out", default=os.path.join(_common.OUT_DIR, "bench_scaling.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.reps = 3, 1
    base = gpt.REFERENCE
    if args.tiny:
        base = gpt.GPTConfig(vocab=97, d_model=64, n_heads=4, n_layers=2, d_mlp=128)
        args.ranks, args.seqs, args.seq_ranks, args.tokens = "4", "16", "4", 32
        args.rounds, args.reps = 1, 1
    ranks = [int(x) for x in args.ranks.split(",")]
    seqs = [int(x) for x in args.seqs.split(",")]
    seq_ranks = [int(x) for x in args.seq_ranks.split(",")]
    result = _common.metadata()
    result["settings"] = dict(model={k: getattr(base, k) for k in
                                     ("vocab", "d_model", "n_heads", "n_layers", "d_mlp")},
                              ranks=ranks, seqs=seqs, seq_ranks=seq_ranks, tokens=args.tokens,
                              alpha_per_rank=ALPHA_PER_RANK, rounds=args.rounds, reps=args.reps)
    points = []
    for i, seq in enumerate(seqs):
        batch = max(1, args.tokens // seq)
        cfg = gpt.GPTConfig(**{**base.__dict__, "max_len": seq})
        rs = sorted(set(seq_ranks) | (set(ranks) if i == 0 else set()))
        res = measure_point(cfg, batch, seq, rs, args.rounds, args.reps)
        points.append(dict(seq=seq, batch=batch, ranks=rs, variants=res))
        print(table_point(points[-1]), flush=True)
    result["points"] = points
    worst = [v["overhead_time"] for p in points for k, v in p["variants"].items()
             if k.startswith("lora_r") and int(k[6:]) <= 16]
    result["targets"] = {"adapter overhead at r <= 16 (max over points)": dict(
        measured=max(worst) if worst else None, target="< 0.05",
        met=bool(worst) and max(worst) < 0.05)}
    _common.write_json(args.out, result)


def table_point(p: dict) -> str:
    rows = [f"seq {p['seq']} x batch {p['batch']}",
            f"  {'variant':10} {'GFLOP':>8} {'median ms':>10} {'overhead t':>11} "
            f"{'overhead F':>11} {'/full t':>8}"]
    for k, v in p["variants"].items():
        ot = f"{v['overhead_time']:+.3f}" if "overhead_time" in v else ""
        of = f"{v['overhead_flops']:+.3f}" if "overhead_flops" in v else ""
        fr = f"{v['over_full_time']:.3f}" if "over_full_time" in v else ""
        rows.append(f"  {k:10} {v['flops'] / 1e9:8.2f} {v['median_s'] * 1e3:10.1f} {ot:>11} "
                    f"{of:>11} {fr:>8}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
