"""Measurement helpers shared by the benchmark scripts.

What every benchmark here does the same way (STYLE.md rule 11): compile
apart from timing (`analyse` reports XLA's cost and memory analyses and the
compile time), warm up, time with ``block_until_ready``, interleave the
variants round-robin so each sees the same machine load (`interleaved`),
report medians, and write JSON that names the machine, the load and the
versions (`metadata`, `write_json`).

Not a module of the library: the scripts import it as ``_common`` (the
``benchmarks`` directory is on ``sys.path`` when a script runs).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "benchmarks", "out")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ----------------------------------------------------------------------------- metadata


def _version(module: str) -> str | None:
    mod = sys.modules.get(module)
    return getattr(mod, "__version__", None) if mod is not None else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "lora_jax"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}{'+dirty lora_jax/' if dirty else ''}" if rev else None


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (``[]`` where unavailable)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def versions() -> dict:
    """Versions of the relevant modules this process has imported (imports nothing)."""
    found = {m: _version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy", "lora_jax",
                                      "torch", "peft", "transformers")}
    return {k: v for k, v in found.items() if v is not None}


def metadata(argv: list[str] | None = None) -> dict:
    """Machine, device, load, versions and command line, for a result's JSON.

    Versions are read from the modules already imported (so a JAX-only
    process does not import torch to report it).
    """
    import jax

    dev = jax.devices()[0]
    return {
        "machine": dict(platform=platform.platform(), cpu=_cpu_model(), cpu_count=os.cpu_count(),
                        python=platform.python_version(), device=str(dev),
                        device_kind=getattr(dev, "device_kind", dev.platform),
                        backend=dev.platform, n_devices=jax.device_count()),
        "load_average_start": load_average(),
        "versions": versions(),
        "git": _git_revision(),
        "command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT)]
                            + [_relative(a) for a in (sys.argv[1:] if argv is None else argv)]),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _relative(arg: str) -> str:
    """A command-line argument, with a path inside the repository made relative to it."""
    if os.path.isabs(arg) and arg.startswith(ROOT + os.sep):
        return os.path.relpath(arg, ROOT)
    return arg


def write_json(path: str, result: dict) -> str:
    """Writes ``result`` (adding the end-of-run load average) and returns the path."""
    result = dict(result, load_average_end=load_average())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {os.path.relpath(path, ROOT)}", flush=True)
    return path


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """This process's current resident set size."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


# ----------------------------------------------------------------------------- XLA analyses


def analyse(fn, args) -> tuple[dict, object]:
    """Lowers and compiles ``fn(*args)``; returns (XLA figures, compiled).

    The figures are the compiled executable's cost analysis (``flops``,
    ``bytes_accessed``), its memory analysis (argument, temporary, output
    and aliased bytes; ``total_bytes`` = arguments + temporaries +
    outputs) and the lower and compile wall times.
    """
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    res = dict(lower_s=t1 - t0, compile_s=t2 - t1)
    res.update(xla_figures(compiled))
    return res, compiled


def xla_figures(compiled) -> dict:
    """``flops``, ``bytes_accessed`` and memory-analysis bytes of a compiled function."""
    res = {}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        res.update(flops=float(cost.get("flops", float("nan"))),
                   bytes_accessed=float(cost.get("bytes accessed", float("nan"))))
    except Exception as e:  # some backends have no cost analysis
        res.update(flops=None, cost_analysis_error=repr(e))
    try:
        mem = compiled.memory_analysis()
        res.update(arg_bytes=int(mem.argument_size_in_bytes),
                   temp_bytes=int(mem.temp_size_in_bytes),
                   out_bytes=int(mem.output_size_in_bytes),
                   alias_bytes=int(mem.alias_size_in_bytes))
        res["total_bytes"] = res["arg_bytes"] + res["temp_bytes"] + res["out_bytes"]
    except Exception as e:
        res.update(memory_analysis_error=repr(e))
    return res


# ----------------------------------------------------------------------------- timing


def summarize(times: list[float], cpu: list[float] | None = None) -> dict:
    """Median, min, quartiles and count of a list of durations (seconds)."""
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [float("nan")] * 3
    out = dict(median_s=statistics.median(times), min_s=min(times), q1_s=q[0], q3_s=q[2],
               n=len(times), times_s=list(times))
    if cpu:
        out["cpu_median_s"] = statistics.median(cpu)
    return out


def interleaved(runners: dict[str, Callable[[], None]], rounds: int, reps: int, *,
                warmup: int = 1) -> dict:
    """Round-robin timing: every round runs each runner ``reps`` times in turn.

    Each runner is ``() -> None`` and must block until its work is done
    (``jax.block_until_ready``). ``warmup`` untimed calls of each runner
    come first. Returns `summarize`'s dict per runner (wall and CPU time).
    """
    times = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    for run in runners.values():
        for _ in range(warmup):
            run()
    for _ in range(rounds):
        for k, run in runners.items():
            for _ in range(reps):
                t0, c0 = time.perf_counter(), time.process_time()
                run()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return {k: summarize(times[k], cpu[k]) for k in runners}


def runner(compiled, make_state: Callable[[], list], advance=None) -> Callable[[], None]:
    """A blocking ``() -> None`` that calls ``compiled(*state)``.

    ``advance(state, out)`` returns the next call's state (a training step
    feeds its updated, donated buffers back); ``None`` reuses the state.
    """
    import jax

    state = make_state()

    def run():
        nonlocal state
        out = compiled(*state)
        jax.block_until_ready(out)
        if advance is not None:
            state = advance(state, out)
    return run


def fmt_ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.1f}"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def fmt_mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:.0f}"
