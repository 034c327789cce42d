"""QLoRA: frozen-weight bytes, XLA memory of a LoRA step, and MiniLM accuracy.

Part 1 (``decoder``), the reference decoder (examples/gpt.py REFERENCE, batch
8 x 128, LoRA r=8 on q, k, v, o, fc1, fc2) with its kernels stored as float32,
bfloat16, NF4 and int8 (`lj.quantize`):

* bytes of the quantized kernels vs the same kernels in bfloat16 (targets:
  NF4 <= 0.27x, int8 <= 0.52x);
* XLA's memory analysis of one jitted LoRA training step through
  ``lj.apply``: argument and temporary bytes, compared with the bytes of
  every kernel dequantized to its compute dtype (a step that dequantized
  the whole model up front would need at least that much temporary memory).
  At batch 8 x 128 the temporaries are mostly activations, so the same
  step is also analysed at batch 1 x 8, where they are mostly weights;
* step times, interleaved round-robin, medians.

Part 2 (``minilm``), examples/minilm_wordnet.py's LoRA run (MiniLM-L6, r=8 on
query/value, head trained, same batches and steps) on the float32 encoder
and on an NF4 encoder (every encoder kernel quantized): test accuracy of
both (target: NF4 within 1 point of float32).

Writes ``benchmarks/out/bench_qlora.json``.

Usage:
  python benchmarks/bench_qlora.py [--parts decoder,minilm] [--rounds 5] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lora_jax as lj  # noqa: E402
from examples import gpt  # noqa: E402

BATCH, SEQ, RANK, ALPHA = 8, 128, 8, 16.0
KERNELS = r".*/kernel"


def _kernel_bytes(params, itemsize=None) -> int:
    return sum((x.size * (itemsize or np.dtype(x.dtype).itemsize))
               for p, x in lj._paths.leaves_with_paths(params)
               if p.endswith("/kernel") and not lj.is_quantized(x))


def decoder(rounds: int, reps: int) -> dict:
    c = gpt.REFERENCE
    model, variables = gpt.init_linen(c, seed=0)
    config = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=gpt.TARGETS)
    tokens = gpt.random_tokens(c, BATCH, seed=0, length=SEQ)
    tx = lj.optimizer(optax.adam(1e-4))
    kernels_f32 = _kernel_bytes(variables)
    n_kernel = kernels_f32 // 4
    largest = max(x.size for p, x in lj._paths.leaves_with_paths(variables)
                  if p.endswith("/kernel"))
    bases = {"float32": variables,
             "bfloat16": jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables),
             "nf4": lj.quantize(variables, targets=KERNELS, config=config),
             "int8": lj.quantize(variables, targets=KERNELS, method="int8", config=config)}
    out = {"n_kernel_params": n_kernel, "kernel_bytes_float32": kernels_f32,
           "kernel_bytes_bfloat16": 2 * n_kernel, "largest_kernel_params": largest, "bases": {}}
    runners = {}
    for name, base in bases.items():
        q_bytes = sum(x.nbytes for _, x in lj._paths.leaves_with_paths(base)
                      if lj.is_quantized(x))
        stored = q_bytes + _kernel_bytes(base)
        # every kernel dense in its compute dtype (what dequantizing all at once costs)
        dense = n_kernel * (2 if name == "bfloat16" else 4)
        ad = lj.init(base, config, key=jax.random.key(1))
        fwd = lj.apply(model.apply, config)
        loss = lambda p, ad, tok: gpt.loss_fn(lambda v, t: fwd(p, ad, t))(None, tok)  # noqa
        step = lj.make_train_step(loss, tx)
        make = (lambda base, ad: lambda: [base, jax.tree.map(jnp.copy, ad), tx.init(ad),
                                          tokens])(base, ad)
        res, compiled = _common.analyse(step, make())
        runners[name] = _common.runner(compiled, make,
                                       lambda s, o: [s[0], o[0], o[1], s[3]])
        small = step.lower(base, ad, tx.init(ad), tokens[:1, :8]).compile().memory_analysis()
        res["temp_bytes_batch_1x8"] = int(small.temp_size_in_bytes)
        res.update(kernel_bytes_stored=stored, kernel_bytes_over_bf16=stored / (2 * n_kernel),
                   all_kernels_dense_bytes=dense,
                   temp_over_all_kernels_dense=res["temp_bytes"] / dense)
        out["bases"][name] = res
        print(f"[decoder] {name:9} kernels {stored / 2**20:7.1f} MiB "
              f"({stored / (2 * n_kernel):.3f}x bf16), step args "
              f"{res['arg_bytes'] / 2**20:7.1f} MiB, temp {res['temp_bytes'] / 2**20:7.1f} MiB "
              f"(all kernels dense: {dense / 2**20:.1f} MiB); at batch 1x8 temp "
              f"{res['temp_bytes_batch_1x8'] / 2**20:.1f} MiB (largest kernel dense: "
              f"{largest * dense / n_kernel / 2**20:.1f} MiB), compile {res['compile_s']:.0f} s",
              flush=True)
    timed = _common.interleaved(runners, rounds, reps)
    for name, t in timed.items():
        out["bases"][name].update(t)
        print(f"[decoder] {name:9} step median {t['median_s'] * 1e3:.0f} ms", flush=True)
    return out


def minilm(seeds, steps: int | None) -> dict:
    import logging

    from examples import bert
    from examples import minilm_wordnet as mw
    from examples.make_wordnet_data import read_extract

    logging.getLogger("absl").setLevel(logging.ERROR)
    s = mw.Settings(progress=False, plots=False, **({"steps": steps} if steps else {}))
    classes, splits = read_extract()
    model, encoder_vars, tokenizer = bert.load_minilm()
    train_data = mw.Encoded(tokenizer, splits["train"].texts, splits["train"].labels, s.max_len)
    test_data = mw.Encoded(tokenizer, splits["test"].texts, splits["test"].labels, s.max_len)
    clf = bert.BertClassifier(model.config, num_labels=len(classes))
    out = {"settings": {"steps": s.steps, "batch": s.batch, "rank": s.rank, "alpha": s.alpha,
                        "targets": bert.QUERY_VALUE, "lr": s.lr_lora}, "runs": []}
    for seed in seeds:
        s_seed = mw.Settings(**{**s.__dict__, "seed": seed})
        variables = bert.classifier_variables(encoder_vars, len(classes),
                                              key=jax.random.key(seed))
        config = lj.LoraConfig(rank=s.rank, alpha=s.alpha, targets=bert.QUERY_VALUE,
                               train=mw.HEAD)
        batches = mw.train_batches(train_data, s.batch, s.steps, seed)
        for base_name in ("float32", "nf4"):
            base = variables if base_name == "float32" else \
                lj.quantize(variables, targets=r"params/encoder/.*/kernel", config=config)
            adapters = lj.init(base, config, key=jax.random.key(seed + 1))
            logits_fn = lj.apply(clf.apply, config)

            def loss(v, ad, ids, mask, labels, f=logits_fn):
                return mw.cross_entropy(f(v, ad, ids, mask), labels)

            tx = lj.optimizer(optax.adamw(mw._schedule(s.lr_lora, s_seed), weight_decay=0.0))
            adapters, run = mw.train(f"{base_name}", loss, base, adapters, tx, batches,
                                     train_data.take, s_seed)
            fwd = jax.jit(logits_fn)
            logits = mw.predict(lambda i, m: fwd(base, adapters, i, m), test_data,
                                min(s.eval_batch, len(test_data)))
            acc = float(np.mean(logits.argmax(-1) == test_data.labels))
            summ = lj.summary(base, adapters)
            rec = {"seed": seed, "base": base_name, "accuracy": acc,
                   "final_loss": float(np.mean(run.losses[-20:])),
                   "median_step_s": float(np.median(run.step_times)),
                   "step_memory_bytes": run.step_memory,
                   "frozen_bytes": summ.frozen_bytes}
            out["runs"].append(rec)
            print(f"[minilm] seed {seed} {base_name:8} accuracy {100 * acc:.2f}% "
                  f"(final loss {rec['final_loss']:.3f}, step {rec['median_step_s'] * 1e3:.0f} ms,"
                  f" frozen {summ.frozen_bytes})", flush=True)
    acc = {b: [r["accuracy"] for r in out["runs"] if r["base"] == b] for b in ("float32", "nf4")}
    out["mean_accuracy"] = {b: float(np.mean(v)) for b, v in acc.items()}
    out["nf4_minus_float32_points"] = 100 * (out["mean_accuracy"]["nf4"]
                                             - out["mean_accuracy"]["float32"])
    print(f"[minilm] NF4 - float32: {out['nf4_minus_float32_points']:+.2f} points", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="decoder,minilm")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--seeds", default="0", help="comma-separated MiniLM seeds")
    ap.add_argument("--steps", type=int, default=None, help="MiniLM steps (default: the example's)")
    ap.add_argument("--out", default=os.path.join(_common.OUT_DIR, "bench_qlora.json"))
    args = ap.parse_args()
    parts = args.parts.split(",")
    result = {"meta": _common.metadata()}
    if os.path.exists(args.out):   # keep the other part's figures when running one part
        with open(args.out) as f:
            old = json.load(f)
        result.update({k: v for k, v in old.items() if k in ("decoder", "minilm")})
    if "decoder" in parts:
        result["decoder"] = decoder(args.rounds, args.reps)
    if "minilm" in parts:
        result["minilm"] = minilm([int(x) for x in args.seeds.split(",")], args.steps)
    _common.write_json(args.out, result)


if __name__ == "__main__":
    main()
