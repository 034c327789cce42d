"""benchmarks/gpu_suite.py: its --tiny run writes every section, and it refuses a CPU.

No timing is asserted (shared machines): the checks are that every section ran and
recorded finite numbers that agree with each other, that the bf16 correctness checks
passed, and that without --tiny on a CPU the script stops with a clear message.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_suite.py")
# As tests/test_benchmarks.py: compiling dominates at these sizes, and no timing is asserted.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
ON_CPU = jax.devices()[0].platform == "cpu"
# Values that are None where the device has no peak FLOP/s or memory statistics (a CPU).
NONE_ON_CPU = ("/mfu", "/peak_flops", "/device_peak_bytes_in_use", "/device_bytes_in_use",
               "/device_bytes_limit")


def _run(*args, fast_compile=True, timeout=900):
    env = dict(os.environ)
    if fast_compile:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}/{i}")
    else:
        yield path, x


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "suite.json"
    proc = _run("--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f), proc.stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_tiny_run_records_every_section(tiny):
    data, stdout = tiny
    assert {"machine", "versions", "settings", "training", "correctness", "multi",
            "suite"} <= set(data)
    assert data["machine"]["device_kind"] and data["versions"]["jax"]
    suite = data["suite"]
    assert suite["mode"] == "tiny" and suite["skipped"] == {} and suite["gpu_figures"] is False
    assert set(suite["section_wall_s"]) == {"training", "correctness", "multi"}
    assert all(t > 0 for t in suite["section_wall_s"].values())
    assert isinstance(suite["within_budget"], bool)
    # Every number is finite; None only where a CPU has no peak or memory statistics.
    for path, value in _leaves(data):
        if isinstance(value, float):
            assert math.isfinite(value), path
        if value is None and path.startswith(("/training", "/correctness", "/multi")):
            assert ON_CPU and path.endswith(NONE_ON_CPU), path
    assert "GPU suite (tiny)" in stdout and "correctness: lora pass" in stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_tiny_training_figures_are_consistent(tiny):
    data, _ = tiny
    tr, settings = data["training"], data["settings"]
    n = settings["n_matmul_params"]
    assert tr["tokens_per_step"] == settings["batch"] * settings["seq"]
    assert tr["skipped"] == {} and tr["lora_explain_fallbacks"] == 0
    for name in ("full", "lora", "qlora"):
        v = tr["variants"][name]
        assert v["n"] == settings["sizes"]["rounds"] and v["median_s"] > 0
        assert v["tokens_per_s"] == pytest.approx(tr["tokens_per_step"] / v["median_s"])
        assert v["model_flops_per_token"] == (6 if name == "full" else 4) * n
        assert v["total_bytes"] > 0
        # one loss after the warm-up and one per round, all finite
        assert len(v["losses"]) == settings["sizes"]["rounds"] + 1
        if v["mfu"] is not None:
            assert v["mfu"] == pytest.approx(
                v["tokens_per_s"] * v["model_flops_per_token"] / tr["peak_flops"])
    assert tr["variants"]["lora"]["flops"] < tr["variants"]["full"]["flops"]
    target = tr["targets"]["lora MFU / full MFU"]
    assert target["measured"] == pytest.approx(
        tr["variants"]["lora"]["model_flops_per_s"] / tr["variants"]["full"]["model_flops_per_s"])
    assert target["met"] is (target["measured"] >= 0.9)
    assert set(tr["memory"]["xla_total_bytes"]) == {"full", "lora", "qlora"}
    assert tr["memory"]["host_peak_rss_bytes"] > 0


@pytest.mark.slow
@pytest.mark.subprocess
def test_tiny_correctness_checks_pass(tiny):
    data, _ = tiny
    c = data["correctness"]
    tol = c["tolerances"]
    assert c["passed"] is True
    for name in ("lora", "qlora"):
        entry = c[name]
        assert entry["passed"] is True and all(entry["checks"].values()), entry["checks"]
        for path in ("unmerged", "merged"):
            assert 0 < entry[path]["logits_rel"] <= tol["logits_rel"]
            assert abs(entry[path]["loss"] - entry["reference_loss"]) <= tol["loss_abs"]
        # the check is not vacuous: the adapter changes the model well beyond the errors
        assert entry["adapter_effect_rel"] >= tol["adapter_effect_over_error"] * max(
            entry["unmerged"]["logits_rel"], entry["merged"]["logits_rel"])


@pytest.mark.slow
@pytest.mark.subprocess
def test_tiny_multi_runs_every_part(tiny):
    data, _ = tiny
    m = data["multi"]
    parts = ("throughput", "decode", "padding", "swap", "train")
    assert set(m["part_wall_s"]) == set(parts) and all(m[p] for p in parts)
    assert m["setup"]["model"] == "smoke"
    assert m["swap"]["compiles_during_swaps"] == 0 and m["swap"]["swaps"] == 5
    assert m["throughput"]["loop_vs_mixed_max_rel"] < 1e-4
    for k in ("mixed", "single", "loop", "merge", "base"):
        assert m["throughput"][k]["median_s"] > 0


@pytest.mark.subprocess
@pytest.mark.skipif(not ON_CPU, reason="the refusal is for a CPU; this machine has an accelerator")
def test_refuses_a_cpu_without_tiny(tmp_path):
    out = tmp_path / "suite.json"
    proc = _run("--out", str(out), fast_compile=False, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu_suite.py needs an NVIDIA GPU (found cpu" in proc.stderr
    assert "`--tiny` runs the tiny configuration anywhere" in proc.stderr
    assert not out.exists()
