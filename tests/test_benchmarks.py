"""The benchmark scripts run their smallest configurations and emit sane JSON.

No timing assertions (the suite runs on shared machines); what is checked
is that each script runs end to end, names its machine and versions, and
that its numbers are consistent: the three frameworks compute the same loss
from the same weights, LoRA steps execute fewer FLOPs than full fine-tuning,
and run_all.py rewrites only its marked regions of a results file.

The four scripts run concurrently as subprocesses, once per module, with
XLA's backend optimizations turned down (compiling dominates their run time
at these sizes, and no timing is asserted).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

import lora_jax as lj

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.torch]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")

SCRIPTS = {
    "compare": ["bench_compare.py", "--tiny", "--shared-workers", "--rounds", "1", "--only",
                "linen_full,linen_lora,nnx_lora,nnx_flax_lora,torch_full,torch_peft,"
                "linen_infer,torch_infer"],
    "scaling": ["bench_scaling.py", "--tiny"],
    "compile": ["bench_compile.py", "--tiny", "--forms", "linen"],
    "gpu": ["bench_gpu.py", "--config", "tiny", "--rounds", "1", "--steps", "1"],
}


FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``{name: (returncode, output, json or None)}`` for every script."""
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " "
                                       + FAST_COMPILE).strip())
    procs = {}
    for name, (script, *args) in SCRIPTS.items():
        path = str(out / f"{name}.json")
        procs[name] = (subprocess.Popen([sys.executable, os.path.join(BENCH, script), *args,
                                         "--out", path], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True), path)
    got = {}
    for name, (proc, path) in procs.items():
        output, _ = proc.communicate(timeout=900)
        data = None
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
        got[name] = (proc.returncode, output, data)
    return got


def _ok(results, name) -> dict:
    rc, output, data = results[name]
    assert rc == 0, f"{name} exited {rc}:\n{output[-4000:]}"
    assert data is not None, f"{name} wrote no JSON:\n{output[-2000:]}"
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["device"]
    assert data["versions"]["jax"] and data["versions"]["lora_jax"]
    assert len(data["load_average_start"]) == 3 and data["command"].startswith("python")
    return data


def _positive_times(entry):
    assert entry["median_s"] > 0 and entry["n"] >= 1 and len(entry["times_s"]) == entry["n"]


def test_compare_frameworks_agree(results):
    data = _ok(results, "compare")
    train = data["train"]
    assert set(train) == {"linen_full", "linen_lora", "nnx_lora", "nnx_flax_lora",
                          "torch_full", "torch_peft"}
    assert data["versions"]["torch"] and data["versions"]["peft"]
    for entry in train.values():
        _positive_times(entry)
        assert entry["peak_rss"] >= entry["rss_after_imports"] > 0
        assert entry["rss_shared_with_other_variants"]  # --shared-workers
    for name in ("linen_full", "linen_lora", "nnx_lora", "nnx_flax_lora"):
        assert train[name]["flops"] > 0 and train[name]["total_bytes"] > 0
    # Same weights, same batch: the loss at step 0 agrees across the frameworks,
    # and after one Adam step lora_jax agrees with PEFT (and full FT across frameworks).
    cc = data["cross_check"]
    assert cc["lora_step0_rel_spread"] < 1e-5, cc
    assert cc["full_step0_rel_spread"] < 1e-5, cc
    assert cc["lora_jax_vs_peft_step1_rel_spread"] < 1e-5, cc
    assert cc["full_step1_rel_spread"] < 1e-5, cc
    # The adapters change the model (B is non-zero), so LoRA and base losses differ.
    assert abs(train["linen_lora"]["loss_step0"] - train["linen_full"]["loss_step0"]) > 1e-4
    assert train["linen_lora"]["flops"] < train["linen_full"]["flops"]
    assert train["torch_peft"]["trainable_params"] < train["torch_full"]["trainable_params"]
    assert {"linen_lora/torch_peft", "nnx_lora/nnx_flax_lora",
            "torch_peft/torch_full"} <= set(data["ratios"])
    assert all(isinstance(t["met"], bool) for t in data["targets"].values())
    inf = data["inference"]
    for key in ("linen/base", "linen/merged", "linen/unmerged", "torch/base",
                "torch/peft_merged", "torch/peft_unmerged"):
        _positive_times(inf[key])
    assert inf["linen/_process"]["explain_fallbacks"] == 0


def test_scaling_overhead_fields(results):
    data = _ok(results, "scaling")
    (point,) = data["points"]
    v = point["variants"]
    assert set(v) == {"full", "frozen", "lora_r4"}
    for entry in v.values():
        _positive_times(entry)
    # Frozen fwd+bwd < LoRA < full fine-tuning, in XLA's FLOPs.
    assert v["frozen"]["flops"] < v["lora_r4"]["flops"] < v["full"]["flops"]
    lo = v["lora_r4"]
    assert lo["overhead_flops"] > 0 and lo["lora_flops_hand"] > 0
    assert lo["overhead_time"] == pytest.approx(lo["median_s"] / v["frozen"]["median_s"] - 1)


def test_compile_times(results):
    data = _ok(results, "compile")
    f = data["forms"]["linen"]
    for kind in ("plain", "lora"):
        assert f[kind]["lower_s"] > 0 and f[kind]["compile_s"] > 0
        assert len(f[kind]["runs"]) == data["settings"]["n"]
    assert f["ratio_total"] == pytest.approx(f["lora"]["total_s"] / f["plain"]["total_s"])


def test_gpu_script_smallest_config_on_cpu(results):
    data = _ok(results, "gpu")
    variants = data["variants"]
    # Every variant runs: the script skips QLoRA only where lora_jax has no lj.quantize,
    # and lora_jax has one, so no skip is expected on any machine.
    assert hasattr(lj, "quantize")
    assert data["skipped"] == {}, f"bench_gpu.py skipped variants: {data['skipped']}"
    assert set(variants) == {"full", "lora", "qlora", "lora_explain_fallbacks"}
    settings = data["settings"]
    n = settings["n_matmul_params"]
    for name in ("full", "lora", "qlora"):
        v = variants[name]
        _positive_times(v)
        assert v["n"] == settings["rounds"]
        assert v["tokens_per_s"] == pytest.approx(settings["batch"] * settings["seq"]
                                                  / v["median_s"])
        # one loss after the warm-up, one per round; finite, and Adam steps on the
        # one fixed batch lower it
        losses = v["losses"]
        assert len(losses) == settings["rounds"] + 1, losses
        assert all(math.isfinite(x) for x in losses), (name, losses)
        assert losses[-1] < losses[0], (name, losses)
        assert v["model_flops_per_token"] == (6 if name == "full" else 4) * n
        if data["machine"]["backend"] == "cpu":
            assert v["mfu"] is None  # no peak FLOP/s for a CPU
        else:
            assert v["mfu"] == pytest.approx(
                v["tokens_per_s"] * v["model_flops_per_token"] / data["peak_flops"])
    assert variants["lora_explain_fallbacks"] == 0
    assert variants["lora"]["flops"] < variants["full"]["flops"]


def test_run_all_rewrites_only_its_regions(results, tmp_path):
    for name in ("compare", "scaling", "compile"):
        _ok(results, name)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name in ("compare", "scaling", "compile"):
        (out_dir / f"bench_{name}.json").write_text(json.dumps(results[name][2]))
    # bench_gpu.py's own file name; run_all.py renders only a GPU run's (bench_gpu_gpu_*)
    gpu = _ok(results, "gpu")
    backend = gpu["machine"]["backend"]
    (out_dir / f"bench_gpu_{backend}_tiny.json").write_text(json.dumps(gpu))
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## Checkpoints\n\nhand-written, keep me\n\n## Scaling\n\n"
                  "prose above\n\n<!-- BEGIN bench_scaling -->\nold table\n"
                  "<!-- END bench_scaling -->\n\nprose below\n")
    cmd = [sys.executable, os.path.join(BENCH, "run_all.py"), "--render-only", "--results",
           str(md), "--out-dir", str(out_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = md.read_text()
    assert "hand-written, keep me" in text and "prose above" in text and "prose below" in text
    assert "old table" not in text
    for name in ("compare", "scaling", "compile", "gpu"):
        assert text.count(f"<!-- BEGIN bench_{name} -->") == 1
        assert text.count(f"<!-- END bench_{name} -->") == 1
    assert "| Flax Linen | **lora_jax** LoRA |" in text
    assert "LoRA r=4" in text
    gpu_region = text.split("<!-- BEGIN bench_gpu -->")[1].split("<!-- END bench_gpu -->")[0]
    if backend == "gpu":
        for name in ("full", "lora", "qlora"):
            assert f"\n| {name} | " in gpu_region
        assert "Not run" not in gpu_region and "skipped —" not in gpu_region
    else:  # no GPU run to render: the section says so, and why
        assert "**Not run:** no NVIDIA GPU was available to this project when these tables " \
            "were generated, so there are no GPU figures." in gpu_region
    # Rendering again is idempotent.
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    assert md.read_text() == text
