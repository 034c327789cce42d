"""Runs the benchmarks and regenerates their tables in benchmarks/RESULTS.md.

Each benchmark runs as its own subprocess (its own flags, its JSON in
``benchmarks/out/``); then the tables are rendered from those JSON files
into RESULTS.md, replacing only the text between a section's markers::

    <!-- BEGIN bench_compare -->
    ...generated...
    <!-- END bench_compare -->

Everything outside the markers (prose, other people's sections) is left as
it is. A section whose markers are missing is appended at the end.

The GPU benchmark runs only where JAX sees a GPU; elsewhere its section
shows the last GPU result in ``benchmarks/out/`` or says it was not run.

Usage:
  python benchmarks/run_all.py --quick         # fewer rounds, reference model
  python benchmarks/run_all.py                 # the full runs (tens of minutes on 2 cores)
  python benchmarks/run_all.py --render-only   # re-render RESULTS.md from existing JSON
  python benchmarks/run_all.py --only compare,compile
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "RESULTS.md")
OUT_DIR = os.path.join(HERE, "out")
NOISY_LOAD = 2.5  # 1-minute load average above which timings are flagged as noisy


# ----------------------------------------------------------------------------- formatting


def ms(s):
    return "—" if s is None or s != s else f"{s * 1e3:.1f}"


def num(x, fmt=".2f"):
    return "—" if x is None or x != x else format(x, fmt)


def mib(n):
    return "—" if n is None else f"{n / 2**20:,.0f}"


def verdict(t: dict) -> str:
    return "**met**" if t.get("met") else "**missed**"


def header(res: dict, extra: str = "") -> str:
    """The machine / versions / load / command paragraph of a section."""
    m, v = res["machine"], res["versions"]
    vers = ", ".join(f"{k} {v[k]}" for k in ("jax", "jaxlib", "flax", "optax", "torch", "peft",
                                             "lora_jax") if k in v)
    load = res.get("load_average_start", [])
    end = res.get("load_average_end", [])
    loud = max([x[0] for x in (load, end) if x] or [0.0])
    lines = [f"Command: `{res['command']}` ({res.get('time', '')}; JSON in "
             f"`benchmarks/out/`). Machine: {m['cpu']}, {m['cpu_count']} cores, device "
             f"`{m['device']}` ({m.get('device_kind', '')}); Python {m['python']}; {vers}"
             f"{'; git ' + res['git'] if res.get('git') else ''}.",
             f"Load average (1/5/15 min) at start {load}, at end {end}." + extra]
    if loud > NOISY_LOAD:
        lines.append(f"**Noisy:** the machine was shared (1-minute load up to {loud:.1f} on "
                     f"{m['cpu_count']} cores), so wall times and their ratios are "
                     f"unreliable; rerun `python benchmarks/run_all.py` on a quiet machine.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- renderers


TRAIN_LABELS = {
    "linen_full": ("Flax Linen", "full fine-tuning"),
    "linen_lora": ("Flax Linen", "**lora_jax** LoRA"),
    "nnx_full": ("Flax NNX", "full fine-tuning"),
    "nnx_lora": ("Flax NNX", "**lora_jax** LoRA"),
    "nnx_flax_lora": ("Flax NNX", "flax.nnx.LoRA"),
    "torch_full": ("PyTorch", "full fine-tuning"),
    "torch_peft": ("PyTorch", "PEFT LoRA"),
}
OWN_FULL = {"linen_lora": "linen_full", "nnx_lora": "nnx_full", "nnx_flax_lora": "nnx_full",
            "torch_peft": "torch_full"}


def render_compare(res: dict) -> str:
    s = res["settings"]
    out = [header(res, f" {s['rounds']} interleaved rounds × {s['reps']} steps per variant; "
                       f"each variant in its own process; torch threads: {s['threads']}."), ""]
    out.append(f"**Training step** (batch {s['batch']} × seq {s['seq']}, rank {s['rank']}, "
               f"alpha {s['alpha']:g} on q, k, v, o, fc1, fc2; Adam). GFLOP: XLA cost analysis "
               f"(all ops) for JAX; `torch.utils.flop_counter` (matmuls only, forward + "
               f"backward) for torch. XLA memory: arguments + temporaries + outputs. Peak RSS: "
               f"the variant's process (imports and weights included); in brackets, the RSS "
               f"after importing the framework.")
    out.append("")
    out.append("| framework | variant | median ms [q1–q3] | vs own full FT | GFLOP | "
               "XLA memory MiB | peak RSS MiB | loss at step 0 / 1 |")
    out.append("|---|---|---|---|---|---|---|---|")
    train = res["train"]
    for k, v in train.items():
        fw, name = TRAIN_LABELS.get(k, (k, k))
        own = OWN_FULL.get(k)
        rel = num(v["median_s"] / train[own]["median_s"]) if own in train else "1.00" \
            if k.endswith("_full") else "—"
        fl = v.get("flops") or v.get("torch_flops")
        gf = "—" if not fl else f"{fl / 1e9:.1f}" + ("" if v.get("flops") else " (torch)")
        out.append(f"| {fw} | {name} | {ms(v['median_s'])} [{ms(v['q1_s'])}–{ms(v['q3_s'])}] "
                   f"| {rel} | {gf} | {mib(v.get('total_bytes'))} | {mib(v.get('peak_rss'))} "
                   f"({mib(v.get('rss_after_imports'))}) | "
                   f"{num(v.get('loss_step0'), '.6f')} / {num(v.get('loss_step1'), '.6f')} |")
    out.append("")
    out.append("| ratio of median step times | value | target | |")
    out.append("|---|---|---|---|")
    targets = res.get("targets", {})
    for k, v in res["ratios"].items():
        if k.startswith("flops"):
            continue
        t = targets.get(k)
        out.append(f"| {k} | {v:.3f} | {t['target'] if t else ''} | "
                   f"{verdict(t) if t else ''} |")
    fl = {k: v for k, v in res["ratios"].items() if k.startswith("flops")}
    if fl:
        out.append("")
        out.append("XLA FLOP ratios: " + "; ".join(f"{k[6:]} {v:.3f}" for k, v in fl.items())
                   + ".")
    cc = res["cross_check"]
    out.append("")
    out.append(f"Cross-check (same weights, same batch): relative spread of the step-0 loss "
               f"across Linen, NNX, nnx.LoRA and PEFT LoRA {num(cc['lora_step0_rel_spread'], '.1e')}"
               f", across the full fine-tuning variants {num(cc['full_step0_rel_spread'], '.1e')}; "
               f"after one Adam step, lora_jax (Linen, NNX) vs PEFT "
               f"{num(cc['lora_jax_vs_peft_step1_rel_spread'], '.1e')}, full fine-tuning "
               f"{num(cc['full_step1_rel_spread'], '.1e')} (nnx.LoRA's step 1 differs by "
               f"design: with alpha/rank folded into B, Adam moves B's product by alpha/rank "
               f"times more).")
    inf = res.get("inference") or {}
    if inf:
        out.append("")
        out.append(f"**Inference** (forward to logits, batch {s['batch']} × seq {s['seq']}; "
                   f"median ms [q1–q3]; merged = adapter folded into the weights, unmerged = "
                   f"applied on the fly):")
        out.append("")
        out.append("| library | base | merged | unmerged | unmerged / base |")
        out.append("|---|---|---|---|---|")
        rows = (("lora_jax (Linen)", "linen/base", "linen/merged", "linen/unmerged"),
                ("lora_jax (NNX)", "nnx/base", "nnx/lora_jax_merged", "nnx/lora_jax_unmerged"),
                ("flax.nnx.LoRA", "nnx/base", "nnx/flax_lora_merged", "nnx/flax_lora_unmerged"),
                ("PEFT (PyTorch eager)", "torch/base", "torch/peft_merged",
                 "torch/peft_unmerged"))
        for label, b, m, u in rows:
            if u not in inf:
                continue
            cell = lambda k: f"{ms(inf[k]['median_s'])} [{ms(inf[k]['q1_s'])}–{ms(inf[k]['q3_s'])}]"  # noqa: E731,E501
            out.append(f"| {label} | {cell(b)} | {cell(m)} | {cell(u)} | "
                       f"{inf[u]['median_s'] / inf[b]['median_s']:.2f} |")
    return "\n".join(out)


def render_scaling(res: dict) -> str:
    s = res["settings"]
    out = [header(res, f" {s['rounds']} interleaved rounds × {s['reps']} steps per variant "
                       f"within each sequence length; alpha = {s['alpha_per_rank']:g} × rank."),
           ""]
    out.append("| seq × batch | variant | GFLOP | median ms [q1–q3] | adapter overhead: time "
               "| FLOPs | LoRA / full FT: time | FLOPs |")
    out.append("|---|---|---|---|---|---|---|---|")
    for p in res["points"]:
        for k, v in p["variants"].items():
            ot = f"{v['overhead_time'] * 100:+.1f}%" if "overhead_time" in v else ""
            of = f"{v['overhead_flops'] * 100:+.1f}%" if "overhead_flops" in v else ""
            ft = num(v.get("over_full_time"), ".3f") if "over_full_time" in v else ""
            ff = num(v.get("over_full_flops"), ".3f") if "over_full_flops" in v else ""
            name = {"full": "full FT", "frozen": "frozen fwd+bwd"}.get(k, k.replace(
                "lora_r", "LoRA r="))
            out.append(f"| {p['seq']} × {p['batch']} | {name} | {v['flops'] / 1e9:.2f} | "
                       f"{ms(v['median_s'])} [{ms(v['q1_s'])}–{ms(v['q3_s'])}] | {ot} | {of} "
                       f"| {ft} | {ff} |")
    for k, t in res.get("targets", {}).items():
        out.append("")
        out.append(f"Target: {k} {t['target']}: measured "
                   f"{num(t['measured'] * 100 if t['measured'] is not None else None, '+.1f')}%"
                   f" — {verdict(t)}.")
    return "\n".join(out)


def render_compile(res: dict) -> str:
    s = res["settings"]
    out = [header(res, f" Median of {s['n']} fresh compiles per variant (alternating), "
                       f"batch {s['batch']} × seq {s['seq']}, rank {s['rank']}."), ""]
    out.append("| model form | plain step: trace+lower s | compile s | LoRA step: trace+lower s "
               "| compile s | LoRA / plain (total) |")
    out.append("|---|---|---|---|---|---|")
    names = {"linen": "Linen", "scan": "Linen, nn.scan + nn.remat", "nnx": "NNX"}
    for k, f in res["forms"].items():
        p, lo = f["plain"], f["lora"]
        out.append(f"| {names.get(k, k)} | {p['lower_s']:.2f} | {p['compile_s']:.2f} | "
                   f"{lo['lower_s']:.2f} | {lo['compile_s']:.2f} | {f['ratio_total']:.3f} |")
    for k, t in res.get("targets", {}).items():
        out.append("")
        out.append(f"Target: {k} {t['target']}: measured {t['measured']:.3f} — {verdict(t)}.")
    return "\n".join(out)


def render_gpu(res: dict | None) -> str:
    if res is None or res["machine"].get("backend") != "gpu":
        return ("**Not run:** no NVIDIA GPU was available to this project when these tables "
                "were generated, so there are no GPU figures. `python benchmarks/bench_gpu.py` "
                "picks the 1B configuration when JAX sees a GPU, but it has not been run on "
                "one yet; only its tiny configuration has run, on the CPU, in the test suite "
                "(`tests/test_benchmarks.py`), which checks that it works, not how fast.")
    s = res["settings"]
    m = s["model"]
    out = [header(res, f" {s['rounds']} interleaved rounds × {s['steps']} steps; peak "
                       f"{num((res.get('peak_flops') or 0) / 1e12, '.0f')} TFLOP/s dense bf16."),
           "",
           f"Model: {s['config']} — {m['n_layers']} layers, d_model {m['d_model']}, "
           f"{m['n_heads']} heads / {m['n_kv_heads']} KV heads, MLP {m['d_mlp']}, vocab "
           f"{m['vocab']}; {s['n_params'] / 1e9:.2f}B parameters (N = {s['n_matmul_params'] / 1e9:.2f}B "
           f"in matmuls); batch {s['batch']} × seq {s['seq']}, {m['dtype']}, rank {s['rank']}, "
           f"remat `{s['remat']}`, attention `{s['attention']}`.", "",
           "| variant | ms/step | tokens/s | FLOPs/token counted | MFU | XLA TFLOP/step (one "
           "layer body) | XLA memory GiB |", "|---|---|---|---|---|---|---|"]
    for k, v in res["variants"].items():
        if not isinstance(v, dict):
            continue
        mult = v["model_flops_per_token"] / s["n_matmul_params"]
        out.append(f"| {k} | {ms(v['median_s'])} | {v['tokens_per_s']:,.0f} | {mult:.0f}N | "
                   f"{num(v.get('mfu'), '.3f')} | {num((v.get('flops') or 0) / 1e12, '.2f')} | "
                   f"{num((v.get('total_bytes') or 0) / 2**30, '.1f')} |")
    for k, msg in res.get("skipped", {}).items():
        out.append(f"\n{k}: skipped — {msg}.")
    for k, t in res.get("targets", {}).items():
        out.append("")
        out.append(f"Target: {k} {t['target']}: measured {t['measured']:.3f} — {verdict(t)}.")
    return "\n".join(out)


def latest_gpu_json(out_dir: str) -> str | None:
    found = sorted(glob.glob(os.path.join(out_dir, "bench_gpu_gpu_*.json")),
                   key=os.path.getmtime)
    return found[-1] if found else None


# name: (title, script, quick args, full args, json name, renderer)
SECTIONS = {
    "compare": ("Comparison", "bench_compare.py", ["--quick"], [], "bench_compare.json",
                render_compare),
    "scaling": ("Scaling", "bench_scaling.py", ["--quick"], [], "bench_scaling.json",
                render_scaling),
    "compile": ("Compile time", "bench_compile.py", ["--quick"], [], "bench_compile.json",
                render_compile),
    "gpu": ("GPU", "bench_gpu.py", ["--quick"], [], None, render_gpu),
}


# ----------------------------------------------------------------------------- RESULTS.md


def replace_region(text: str, name: str, title: str, body: str) -> str:
    """``text`` with the region between ``name``'s markers replaced by ``body``.

    A missing region is appended as a new ``## title`` section.
    """
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"


def has_gpu() -> bool:
    code = "import jax; print(jax.devices()[0].platform)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() == "gpu"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="each script's --quick")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--render-only", action="store_true", help="don't run, just render")
    ap.add_argument("--results", default=RESULTS, help="the markdown file to update")
    ap.add_argument("--out-dir", default=OUT_DIR, help="where the JSON results are")
    args = ap.parse_args(argv)
    names = args.only.split(",")
    unknown = set(names) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {sorted(SECTIONS)}")
    failed = []
    if not args.render_only:
        gpu = "gpu" in names and has_gpu()
        for name in names:
            title, script, quick, full, json_name, _ = SECTIONS[name]
            if name == "gpu" and not gpu:
                print("gpu: no GPU visible to JAX; not running bench_gpu.py", flush=True)
                continue
            out = os.path.join(args.out_dir, json_name) if json_name else None
            cmd = [sys.executable, os.path.join(HERE, script)] + (quick if args.quick else full)
            if out:
                cmd += ["--out", out]
            print(f"== {name}: {' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)}",
                  flush=True)
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, cwd=ROOT).returncode
            print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f}s", flush=True)
            if rc:
                failed.append(name)
    with open(args.results) as f:
        text = f.read()
    for name in names:
        title, _, _, _, json_name, render = SECTIONS[name]
        path = os.path.join(args.out_dir, json_name) if json_name else latest_gpu_json(
            args.out_dir)
        if path is None or not os.path.exists(path):
            if name != "gpu":
                print(f"{name}: no {path}; section left as it is", flush=True)
                continue
            res = None
        else:
            with open(path) as f:
                res = json.load(f)
        text = replace_region(text, f"bench_{name}", title, render(res))
    with open(args.results, "w") as f:
        f.write(text)
    print(f"updated {os.path.relpath(args.results, ROOT) if args.results.startswith(ROOT) else args.results}"
          f" ({', '.join(names)})", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
