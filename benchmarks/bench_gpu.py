"""Throughput and MFU of full fine-tuning, LoRA and NF4 QLoRA on a Llama-shaped decoder.

The model is examples/llama.py's Llama (its RMSNorm, RoPE, grouped-query
attention and SwiGLU, and Hugging Face's projection names) with its layers stacked by
``nn.scan`` (one compiled layer), ``nn.remat`` around each layer (policy
``--remat``) and attention through ``jax.nn.dot_product_attention`` (cuDNN
flash attention on a GPU where supported, XLA otherwise). ``--config 1b``
is TinyLlama-1.1B's shape: 22 layers, d_model 2048, 32 heads / 4 KV heads,
MLP 5632, vocab 32000, sequence 2048, in bfloat16.

Variants (Adam, lr 1e-4; every one computes in bfloat16):

  full    full fine-tuning: float32 master weights cast to bfloat16 in the step
  lora    `lj.apply`, rank 16 on every projection (q, k, v, o, gate, up,
          down); frozen base stored in bfloat16, float32 A and B cast to
          bfloat16 in the step (the same mixed precision as ``full``)
  qlora   as ``lora`` with the base's projections stored in NF4
          (`lj.quantize`); skipped, saying so, where lora_jax has no quantize

Reports per variant: step time (median over interleaved rounds of
``--steps`` back-to-back steps), tokens/s, and model FLOPs utilization
``MFU = tokens/s * F / peak``, counting F = 6N FLOPs per token for full
fine-tuning and F = 4N for LoRA and QLoRA (forward 2N, activation gradients
2N, no weight gradients), N = the parameters of every matmul weight (the
projections and the output head; not the embedding lookup). Attention's
FLOPs and remat's recompute are not counted (the usual convention). The
peak is the card's dense bf16 rate (H100 SXM / H200 989 TFLOP/s, H100 PCIe
756; ``--peak-tflops`` overrides); none on a CPU, so no MFU there. Also
XLA's memory analysis, the device's peak memory where it reports one, and
XLA's cost analysis -- which counts the scanned layer's body once, not once
per layer (and custom calls such as cuDNN attention as zero), so it is
recorded for comparing variants, not for utilization. Target on a GPU:
LoRA MFU >= 0.9 x full fine-tuning's.

Writes ``benchmarks/out/bench_gpu_<platform>_<config>.json``.

Usage:
  python benchmarks/bench_gpu.py                 # 1b on a GPU; tiny on a CPU
  python benchmarks/bench_gpu.py --config tiny   # the smallest (the test suite runs it)
  python benchmarks/bench_gpu.py --config 1b --batch 4 --steps 5 --rounds 4
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lora_jax as lj  # noqa: E402
from examples import llama  # noqa: E402

CONFIGS = {
    # name: (LlamaConfig fields, seq, batch)
    "tiny": (dict(vocab=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=128), 64, 2),
    "small": (dict(vocab=8192, d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, d_mlp=1408),
              512, 4),
    "1b": (dict(vocab=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_mlp=5632),
           2048, 4),
}
TARGETS = r"params/model/layers/(q|k|v|o|gate|up|down)_proj/kernel"
LAYOUTS = {r"params/model/layers/.*": lj.Layout(1, 1, 1)}   # scan: leading layer axis
REMAT = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
         "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
# Dense bf16 peak FLOP/s by device kind substring (first match wins).
PEAKS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
         ("H800", 989e12), ("A100", 312e12), ("L40S", 362e12), ("GH200", 989e12))


# ----------------------------------------------------------------------------- model


class Layer(nn.Module):
    """examples/llama.py's DecoderLayer with fused-kernel attention (scan-shaped)."""

    c: llama.LlamaConfig
    attention: str | None = None

    @nn.compact
    def __call__(self, x, _):
        c = self.c
        b, t, _ = x.shape
        dense = functools.partial(llama._dense, dtype=c.dtype)
        h = llama.RMSNorm(c.rms_eps, c.dtype, name="input_layernorm")(x)
        q = dense(c.n_heads * c.hd, "q_proj")(h).reshape(b, t, c.n_heads, c.hd)
        k = dense(c.kv_dim, "k_proj")(h).reshape(b, t, c.n_kv_heads, c.hd)
        v = dense(c.kv_dim, "v_proj")(h).reshape(b, t, c.n_kv_heads, c.hd)
        pos = jnp.arange(t)
        q, k = llama._rope(q, pos, c.rope_theta), llama._rope(k, pos, c.rope_theta)
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                         implementation=self.attention)
        x = x + dense(c.d_model, "o_proj")(a.reshape(b, t, c.n_heads * c.hd))
        h = llama.RMSNorm(c.rms_eps, c.dtype, name="post_attention_layernorm")(x)
        gate, up = dense(c.d_mlp, "gate_proj")(h), dense(c.d_mlp, "up_proj")(h)
        return x + dense(c.d_model, "down_proj")(jax.nn.silu(gate) * up), None


class Model(nn.Module):
    c: llama.LlamaConfig
    remat: str = "dots"
    attention: str | None = None

    @nn.compact
    def __call__(self, tokens):
        c = self.c
        embed = nn.Embed(c.vocab, c.d_model, name="embed_tokens",
                         embedding_init=nn.initializers.normal(0.02))
        x = embed(tokens).astype(c.dtype)
        layer = Layer if REMAT[self.remat] is None else nn.remat(
            Layer, policy=REMAT[self.remat], prevent_cse=False)
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=c.n_layers)
        x, _ = stack(c, self.attention, name="layers")(x, None)
        return llama.RMSNorm(c.rms_eps, c.dtype, name="norm")(x)


class Llama(nn.Module):
    c: llama.LlamaConfig
    remat: str = "dots"
    attention: str | None = None

    @nn.compact
    def __call__(self, tokens):
        h = Model(self.c, self.remat, self.attention, name="model")(tokens)
        return llama._dense(self.c.vocab, "lm_head", self.c.dtype)(h)


# ----------------------------------------------------------------------------- variants


def loss_of(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]).mean()


def cast(tree, dtype):
    """Floating leaves of ``tree`` (LoRA factors included) cast to ``dtype``."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree)


def matmul_params(params) -> int:
    """N: parameters of every matmul weight (kernels), not the embedding table."""
    return sum(x.size for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if lj.path_str(kp).endswith("/kernel"))


def build(model, params, tokens, *, rank: int, variants: list[str]):
    """``{name: (jitted step, state, advance)}`` and skip messages."""
    tx = optax.adam(1e-4)
    compute = model.c.dtype
    out, skipped = {}, {}

    if "full" in variants:
        def full_step(p, opt_state, toks):
            loss, g = jax.value_and_grad(
                lambda q: loss_of(model.apply(cast(q, compute), toks[:, :-1]), toks))(p)
            updates, opt_state = tx.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss
        own = jax.tree.map(jnp.copy, params)  # donated: not shared with the LoRA bases
        out["full"] = (jax.jit(full_step, donate_argnums=(0, 1)),
                       [own, tx.init(own), tokens], lambda s, o: [o[0], o[1], s[2]])

    config = lj.LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS, layouts=LAYOUTS)
    base16 = cast(params, compute) if {"lora", "qlora"} & set(variants) else None
    fwd = lj.apply(model.apply, config)

    def lora_loss(base, ad, toks):  # float32 A, B; bfloat16 compute
        return loss_of(fwd(base, cast(ad, compute), toks[:, :-1]), toks)

    ltx = lj.optimizer(tx)
    for name in ("lora", "qlora"):
        if name not in variants:
            continue
        base = base16
        if name == "qlora":
            base = lj.quantize(base16, targets=TARGETS, method="nf4", config=config)
        adapters = lj.init(base, config, key=jax.random.key(1))
        out[name] = (lj.make_train_step(lora_loss, ltx),
                     [base, adapters, ltx.init(adapters), tokens],
                     lambda s, o: [s[0], o[0], o[1], s[3]])
    return out, skipped, config


def peak_flops(device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.platform != "gpu":
        return None
    kind = getattr(device, "device_kind", "")
    for key, value in PEAKS:
        if key in kind:
            return value
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=("auto",) + tuple(CONFIGS), default="auto",
                    help="auto: 1b on a GPU, tiny elsewhere")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--remat", choices=tuple(REMAT), default="dots",
                    help="remat policy per layer (dots: keep weight-matmul outputs, "
                         "recompute the rest; full: recompute everything; none)")
    ap.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto")
    ap.add_argument("--variants", default="full,lora,qlora")
    ap.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 3 steps")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak FLOP/s in TFLOP/s (default: known GPUs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = jax.devices()[0]
    if args.config == "auto":
        args.config = "1b" if device.platform == "gpu" else "tiny"
        if device.platform != "gpu":
            print("no GPU: running the tiny configuration (--config 1b forces the 1B model)",
                  flush=True)
    if args.quick:
        args.rounds, args.steps = 2, 3
    fields, seq, batch = CONFIGS[args.config]
    seq, batch = args.seq or seq, args.batch or batch
    c = llama.LlamaConfig(**fields, max_len=seq, dtype=jnp.dtype(args.dtype))
    attention = None if args.attention == "auto" else args.attention
    model = Llama(c, args.remat, attention)
    variants = args.variants.split(",")
    out_path = args.out or os.path.join(
        _common.OUT_DIR, f"bench_gpu_{device.platform}_{args.config}.json")

    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    tokens = jax.random.randint(jax.random.key(2), (batch, seq + 1), 0, c.vocab)
    n_matmul = matmul_params(params)
    n_total = sum(x.size for x in jax.tree.leaves(params))
    steps, skipped, config = build(model, params, tokens, rank=args.rank, variants=variants)
    del params
    result = _common.metadata()
    result["settings"] = dict(config=args.config, model=dataclasses.asdict(c) | {
        "dtype": str(c.dtype)}, seq=seq, batch=batch, rank=args.rank, remat=args.remat,
        attention=args.attention, steps=args.steps, rounds=args.rounds,
        n_params=int(n_total), n_matmul_params=int(n_matmul))
    peak = peak_flops(device, args.peak_tflops)
    result["peak_flops"] = peak
    flops_per_token = {"full": 6 * n_matmul, "lora": 4 * n_matmul, "qlora": 4 * n_matmul}

    compiled, res = {}, {}
    for name, (fn, state, advance) in steps.items():
        t0 = time.perf_counter()
        res[name], compiled[name] = _common.analyse(fn, state)
        print(f"{name}: compiled in {time.perf_counter() - t0:.1f}s, XLA "
              f"{(res[name].get('flops') or 0) / 1e12:.3f} TFLOP/step", flush=True)
    if "lora" in steps:
        res["lora_explain_fallbacks"] = lj.explain(
            model.apply, config, steps["lora"][1][0], steps["lora"][1][1],
            tokens[:, :-1]).n_fallbacks

    states = {k: v[1] for k, v in steps.items()}
    losses = {k: [] for k in steps}

    def run(name, n):
        fn, state = compiled[name], states[name]
        t0 = time.perf_counter()
        for _ in range(n):
            o = fn(*state)
            state = steps[name][2](state, o)
        jax.block_until_ready(o)
        states[name] = state
        losses[name].append(float(o[2]))
        return (time.perf_counter() - t0) / n

    for name in steps:  # warm-up
        run(name, 2)
    per_step = {k: [] for k in steps}
    for r in range(args.rounds):
        for name in steps:
            per_step[name].append(run(name, args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {v[-1] * 1e3:.1f} ms" for k, v in per_step.items()), flush=True)

    tokens_per_step = batch * seq
    for name in steps:
        s = statistics.median(per_step[name])
        tps = tokens_per_step / s
        entry = res[name]
        entry.update(_common.summarize(per_step[name]), tokens_per_s=tps,
                     model_flops_per_token=flops_per_token[name], losses=losses[name])
        entry["mfu"] = tps * flops_per_token[name] / peak if peak else None
    if device.platform == "gpu":
        stats = device.memory_stats() or {}
        result["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    result["variants"], result["skipped"] = res, skipped
    if "full" in steps and "lora" in steps and peak:
        ratio = res["lora"]["mfu"] / res["full"]["mfu"]
        result["targets"] = {"lora MFU / full MFU": dict(measured=ratio, target=">= 0.90",
                                                         met=ratio >= 0.9)}
    for name in steps:
        e = res[name]
        mfu = f"MFU {e['mfu']:.3f}" if e["mfu"] is not None else "MFU n/a (no peak for this device)"
        print(f"{name:6} {e['median_s'] * 1e3:9.1f} ms/step  {e['tokens_per_s']:10.0f} tokens/s  "
              f"{mfu}", flush=True)
    _common.write_json(out_path, result)


if __name__ == "__main__":
    main()
