"""Compile time of a lora_jax training step vs the plain model's training step.

For each model form -- the reference decoder in Linen, the same with
``nn.scan`` + ``nn.remat`` over the blocks, and in NNX -- this measures the
wall time to trace + lower (``jax.jit(step).lower(...)``) and to compile
(``lowered.compile()``) of

  plain   the full fine-tuning step (value_and_grad wrt all params + Adam)
  lora    the LoRA step (`lj.apply` + `lj.make_train_step`, rank 8 on q, k,
          v, o, fc1, fc2), whose tracing includes lj.apply's jaxpr rewrite

Every measurement is a fresh compile: a new step function (new closure,
new ``jax.jit``) after ``jax.clear_caches()``, with the persistent
compilation cache off. Variants alternate (plain, lora, plain, lora, ...)
and the medians of ``--n`` compiles are reported, with the ratio
lora / plain (target <= 1.25). Writes ``benchmarks/out/bench_compile.json``.

Usage:
  python benchmarks/bench_compile.py [--n 5] [--quick] [--tiny] [--forms linen,scan,nnx]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import lora_jax as lj  # noqa: E402
from examples import gpt  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)

BATCH, RANK, ALPHA = 8, 8, 16.0


def form(name: str, cfg: gpt.GPTConfig):
    """``(forward, params, config, tokens)``: ``forward(params, tokens) -> logits``."""
    layouts = {}
    if name == "nnx":
        graphdef, state = gpt.init_nnx(cfg, seed=0)

        def forward(st, toks):
            return nnx.merge(graphdef, st)(toks)
        params = state
    else:
        if name == "scan":
            cfg = gpt.GPTConfig(**{**cfg.__dict__, "scan": True, "remat": True})
            layouts = {r"params/blocks/.*": lj.Layout(1, 1, 1)}
        model, params = gpt.init_linen(cfg, seed=0)
        forward = model.apply
    config = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=gpt.TARGETS, layouts=layouts)
    tokens = gpt.random_tokens(cfg, BATCH, seed=0)
    return forward, params, config, tokens


def fresh_step(kind: str, forward, params, config, tokens):
    """A brand-new jitted step and its arguments (nothing cached to reuse)."""
    tx = optax.adam(1e-4)
    if kind == "plain":
        def step(p, opt_state, toks):
            loss, g = jax.value_and_grad(
                lambda q: gpt.causal_lm_loss(forward(q, toks[:, :-1]), toks[:, 1:]))(p)
            updates, opt_state = tx.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss
        return jax.jit(step, donate_argnums=(0, 1)), (params, tx.init(params), tokens)
    fwd = lj.apply(forward, config)

    def loss(p, ad, toks):
        return gpt.causal_lm_loss(fwd(p, ad, toks[:, :-1]), toks[:, 1:])

    ltx = lj.optimizer(tx)
    adapters = lj.init(params, config, key=jax.random.key(1))
    return lj.make_train_step(loss, ltx), (params, adapters, ltx.init(adapters), tokens)


def time_compile(kind, forward, params, config, tokens) -> dict:
    jax.clear_caches()
    step, args = fresh_step(kind, forward, params, config, tokens)
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
                        if isinstance(x, jax.Array) else x, args)
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return dict(lower_s=t1 - t0, compile_s=t2 - t1, total_s=t2 - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5, help="fresh compiles per variant")
    ap.add_argument("--forms", default="linen,scan,nnx")
    ap.add_argument("--quick", action="store_true", help="3 compiles per variant")
    ap.add_argument("--tiny", action="store_true", help="a tiny model, 1 compile (for tests)")
    ap.add_argument("--out", default=os.path.join(_common.OUT_DIR, "bench_compile.json"))
    args = ap.parse_args(argv)
    cfg = gpt.REFERENCE
    if args.quick:
        args.n = 3
    if args.tiny:
        cfg = gpt.GPTConfig(vocab=97, d_model=64, n_heads=4, n_layers=2, d_mlp=128, max_len=16)
        args.n = 1
    result = _common.metadata()
    result["settings"] = dict(n=args.n, batch=BATCH, rank=RANK, seq=cfg.max_len,
                              model={k: getattr(cfg, k) for k in
                                     ("vocab", "d_model", "n_heads", "n_layers", "d_mlp")})
    forms = {}
    for name in args.forms.split(","):
        forward, params, config, tokens = form(name, cfg)
        runs = {"plain": [], "lora": []}
        if not args.tiny:  # warm Python-level imports and tracing caches of the libraries
            time_compile("lora", forward, params, config, tokens)
        for i in range(args.n):
            for kind in runs:
                runs[kind].append(time_compile(kind, forward, params, config, tokens))
        res = {}
        for kind, rs in runs.items():
            res[kind] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            res[kind]["runs"] = rs
        res["ratio_total"] = res["lora"]["total_s"] / res["plain"]["total_s"]
        res["ratio_lower"] = res["lora"]["lower_s"] / res["plain"]["lower_s"]
        res["ratio_compile"] = res["lora"]["compile_s"] / res["plain"]["compile_s"]
        forms[name] = res
        print(f"{name:6} plain {res['plain']['lower_s']:.2f}+{res['plain']['compile_s']:.2f}s  "
              f"lora {res['lora']['lower_s']:.2f}+{res['lora']['compile_s']:.2f}s  "
              f"ratio {res['ratio_total']:.3f} (trace+lower {res['ratio_lower']:.2f}, "
              f"compile {res['ratio_compile']:.2f})", flush=True)
    result["forms"] = forms
    worst = max(f["ratio_total"] for f in forms.values())
    result["targets"] = {"lora / plain compile time (max over forms)": dict(
        measured=worst, target="<= 1.25", met=worst <= 1.25)}
    _common.write_json(args.out, result)


if __name__ == "__main__":
    main()
