"""Sharded LoRA training on 8 (host-platform) CPU devices, and over 2 processes.

Parts (each can be skipped):

* ``layouts``: the reference decoder's LoRA train step (r=8 on q,k,v,o,fc1,
  fc2) compiled for one device and for three layouts of the base weights
  on 8 devices -- FSDP (8 x 'data'), tensor parallel (8 x 'model'), and
  2 x 4 (FSDP x TP) -- through ``lj.merge`` and through ``lj.apply``:
  per-device XLA FLOPs (``compile().cost_analysis()``), collective ops in
  the compiled HLO text (count, and the bytes of their results), compile
  time. Then ``--steps`` steps of the ``lj.apply`` step per layout: compile
  count (jax.monitoring), median step time, losses against one device.
* ``unpinned``: the ``lj.apply`` step of a small decoder through plain
  ``lj.make_train_step`` (jit without shardings) against
  `lj.make_sharded_train_step`: compiles per step, adapter leaves resharded.
* ``seeds``: ``tests/_shard_worker.py`` (the test's 8-device checks, a
  1-block decoder) over several seeds: loss / gradient agreement with one
  device, next to one device's own reduction-order noise.
* ``multihost``: ``examples/multihost_train.py`` as 2 processes x 4 CPU
  devices (gloo) and as 1 process x 8 devices, same mesh, same data:
  losses side by side, and the Orbax save/restore across processes.

Writes ``benchmarks/out/bench_shard.json`` and prints a summary.

Usage:
  python benchmarks/bench_shard.py [--model reference|small] [--steps 20]
      [--seeds 3] [--only layouts,unpinned,seeds,multihost] [--mh-model reference]
      [--mh-steps 5]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P, SingleDeviceSharding  # noqa: E402

import _common  # noqa: E402
import lora_jax as lj  # noqa: E402
from examples import gpt  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4, "s8": 1,
         "u8": 1, "pred": 1, "s16": 2, "u16": 2}
COL, ROW = r".*/(q|k|v|fc1)", r".*/(o|fc2)"


def layouts(cfg: gpt.GPTConfig) -> dict:
    """name -> (mesh shape, axis names, batch spec, param rules)."""
    head_tp = cfg.vocab % 8 == 0
    return {
        "fsdp": ((8,), ("data",), P("data"), {
            r".*/kernel": P("data", None),
            r"params/(wte/embedding|wpe)": P(None, "data")}),
        "tp": ((8,), ("model",), P(), {
            COL + "/kernel": P(None, "model"), COL + "/bias": P("model"),
            ROW + "/kernel": P("model", None),
            **({r"params/lm_head/kernel": P(None, "model")} if head_tp else {})}),
        "2x4": ((2, 4), ("data", "model"), P("data"), {
            COL + "/kernel": P("data", "model"), COL + "/bias": P("model"),
            ROW + "/kernel": P("model", "data"),
            **({r"params/lm_head/kernel": P("data", "model")} if head_tp else {}),
            r"params/(wte/embedding|wpe)": P(None, "data")}),
    }


def collectives(hlo: str) -> dict:
    """Per collective kind: ops in the compiled HLO, the bytes of their results,
    and how many XLA attributes to a ``concatenate`` (op_name metadata)."""
    out = {}
    for op in COLLECTIVES:
        n, nbytes, concat = 0, 0, 0
        for m in re.finditer(rf"= (.*?) {op}(?:-start)?\((.*)", hlo):
            n += 1
            concat += bool(re.search(r'op_name="[^"]*/concatenate"', m.group(2)))
            for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
                size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
                nbytes += size * BYTES.get(dt, 4)
        out[op] = {"ops": n, "bytes": nbytes, "from_concatenate": concat}
    return out


def keep_grads() -> optax.GradientTransformation:
    """Passes updates through, keeping the last (the raw gradients) in its state."""
    return optax.GradientTransformation(
        lambda params: (jax.tree.map(jnp.zeros_like, params),),
        lambda updates, state, params=None: (updates, (updates,)))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / d) if d > 0 else float(np.max(np.abs(a - b)))


def run_layouts(args) -> dict:
    cfg = gpt.REFERENCE if args.model == "reference" else gpt.GPTConfig(
        vocab=128, d_model=64, n_heads=4, n_layers=2, d_mlp=128, max_len=16)
    batch = 8
    model, variables = gpt.init_linen(cfg, seed=0)
    config = lj.LoraConfig(targets=gpt.TARGETS, rank=8, alpha=16)
    adapters = lj.init(variables, config, key=jax.random.key(1))
    # non-zero B (as after some training), so every gradient is non-trivial
    adapters = jax.tree.map(
        lambda n: n._replace(b=0.01 * jax.random.normal(jax.random.key(2), n.b.shape))
        if lj.is_lora(n) else n, adapters, is_leaf=lj.is_lora)
    tokens = np.asarray(gpt.random_tokens(cfg, batch, seed=3))
    tx = lj.optimizer(optax.chain(keep_grads(), optax.adam(1e-3)))
    fwds = {"merge": lambda v, a, x: model.apply(lj.merge(v, a, config), x),
            "apply": lj.apply(model.apply, config)}

    def loss_of(fwd):
        return lambda v, a, t: gpt.causal_lm_loss(fwd(v, a, t[:, :-1]), t[:, 1:])

    h_vars = jax.tree.map(np.asarray, variables)
    h_ad = jax.tree.map(np.asarray, adapters)
    h_opt = jax.tree.map(np.asarray, jax.jit(tx.init)(adapters))
    dev0 = SingleDeviceSharding(jax.devices()[0])
    grads_of = lambda opt: jax.tree.map(np.asarray, opt.inner_states["train"].inner_state[0][0])  # noqa

    def setup(name):
        if name == "single":
            params = jax.device_put(h_vars, dev0)
            ad, opt = jax.device_put(h_ad, dev0), jax.device_put(h_opt, dev0)
            return params, ad, opt, jax.device_put(tokens, dev0), None
        shape, names, bspec, rules = layouts(cfg)[name]
        mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
        params = jax.device_put(h_vars, lj.param_shardings(h_vars, mesh, rules=rules))
        sh = lj.train_shardings(params, config, tx, batch=bspec)
        ad, opt = lj.shard_train_state(h_ad, h_opt, sh)
        return params, ad, opt, jax.device_put(tokens, sh.batch[0]), sh

    def build(name, fwd, sh):
        if sh is None:
            return jax.jit(lj.make_train_step(loss_of(fwd), tx, jit=False), donate_argnums=(1, 2))
        return lj.make_sharded_train_step(loss_of(fwd), tx, sh)

    from tests._asserts import CompileCounter
    out = {"model": {k: (str(v) if k == "dtype" else v)
                     for k, v in cfg.__dict__.items()}, "batch": batch, "rank": 8,
           "steps": args.steps, "layouts": {}}
    ref = None
    for name in ("single", "fsdp", "tp", "2x4"):
        entry = {"rules": {k: str(v) for k, v in layouts(cfg)[name][3].items()}
                 if name != "single" else {}}
        for fname, fwd in fwds.items():
            params, ad, opt, toks, sh = setup(name)
            step = build(name, fwd, sh)
            t = time.perf_counter()
            compiled = step.lower(params, ad, opt, toks).compile()
            entry[fname] = {"compile_s": round(time.perf_counter() - t, 2),
                            "flops_per_device": float(compiled.cost_analysis()["flops"]),
                            "collectives": collectives(compiled.as_text())}
            print(f"{name:6s} {fname:5s} flops/device {entry[fname]['flops_per_device']:.4g} "
                  f"collectives {({k: v['ops'] for k, v in entry[fname]['collectives'].items()})}",
                  flush=True)
            if fname != "apply" or args.steps <= 0:
                continue
            # the training run: jit reuses the executable compiled above
            losses, times, grads = [], [], None
            with CompileCounter() as cc:
                for i in range(args.steps):
                    t = time.perf_counter()
                    ad, opt, loss = step(params, ad, opt, toks)
                    loss = float(loss)
                    times.append(time.perf_counter() - t)
                    losses.append(loss)
                    if i == 0:
                        grads = grads_of(opt)
            run = {"compiles_during_steps": cc.count, "losses": losses,
                   "step_s_median": round(statistics.median(times[1:] or times), 4)}
            if ref is None:
                ref = (losses, grads)
            else:
                run["loss_rel_step1"] = abs(losses[0] - ref[0][0]) / abs(ref[0][0])
                run["loss_rel_max"] = max(abs(a - b) / abs(b) for a, b in zip(losses, ref[0]))
                run["grad_rel_step1"] = max(rel(a, b) for a, b in zip(
                    jax.tree.leaves(grads), jax.tree.leaves(ref[1])))
            entry[fname]["run"] = run
            print(f"       {args.steps} steps: compiles {cc.count}, median step "
                  f"{run['step_s_median']} s, losses {losses[0]:.6f} .. {losses[-1]:.6f}",
                  flush=True)
        out["layouts"][name] = entry
    return out


def run_unpinned(args) -> dict:
    """The same steps through plain ``lj.make_train_step`` (jit without shardings),
    adapters placed by the rules but the optimizer state left as ``tx.init`` makes
    it: what happens without the sharded builder."""
    from tests._asserts import CompileCounter
    cfg = gpt.GPTConfig(vocab=128, d_model=64, n_heads=4, n_layers=2, d_mlp=128, max_len=16)
    model, variables = gpt.init_linen(cfg, seed=0)
    config = lj.LoraConfig(targets=gpt.TARGETS, rank=8, alpha=16)
    tx = lj.optimizer(optax.adam(1e-3))
    fwd = lj.apply(model.apply, config)

    def loss(v, a, t):
        return gpt.causal_lm_loss(fwd(v, a, t[:, :-1]), t[:, 1:])

    tokens = np.asarray(gpt.random_tokens(cfg, 8, seed=3))
    out = {}
    for name, (shape, names, bspec, rules) in layouts(cfg).items():
        mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
        params = jax.device_put(variables, lj.param_shardings(variables, mesh, rules=rules))
        sh = lj.train_shardings(params, config, tx, batch=bspec)
        toks = jax.device_put(tokens, sh.batch[0])
        row = {}
        for variant in ("plain jit", "make_sharded_train_step"):
            ad = jax.device_put(lj.init(variables, config, key=jax.random.key(1)), sh.adapters)
            opt = tx.init(ad)
            if variant == "plain jit":
                step = lj.make_train_step(loss, tx)
            else:
                ad, opt = lj.shard_train_state(ad, opt, sh)
                step = lj.make_sharded_train_step(loss, tx, sh)
            before = jax.tree_util.tree_flatten_with_path(ad)[0]
            counts = []
            with CompileCounter() as cc:
                for _ in range(args.steps):
                    ad, opt, _ = step(params, ad, opt, toks)
                    counts.append(cc.count)
            moved = [lj.path_str(p) for (p, x), y in zip(before, jax.tree.leaves(ad))
                     if not x.sharding.is_equivalent_to(y.sharding, x.ndim)]
            row[variant] = {"compiles_after_each_step": counts, "adapter_leaves_resharded":
                            len(moved), "of": len(before), "examples": moved[:3]}
            print(f"{name:5s} {variant:24s} compiles {counts} resharded {len(moved)}/"
                  f"{len(before)} {moved[:2]}", flush=True)
        out[name] = row
    return out


def run_seeds(n: int) -> list:
    out = []
    for seed in range(n):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "r.json")
            env = dict(os.environ, LORA_JAX_TEST_SEED=str(seed),
                       XLA_FLAGS="--xla_force_host_platform_device_count=8")
            subprocess.run([sys.executable, "-m", "tests._shard_worker", path], cwd=ROOT,
                           env=env, check=True, capture_output=True)
            with open(path) as f:
                r = json.load(f)
        row = {"seed": seed, "noise": r["single"]["reduction_order_noise"]}
        for name, e in r["layouts"].items():
            row[name] = {k: e[k] for k in ("loss_rel", "grad_rel", "loss_rel_max_over_20",
                                           "adapters_rel_after_20", "compiles_with_20_steps",
                                           "compiles_during_20_steps")}
        row["checkpoint_hops_bit_exact"] = all(
            v["bit_exact"] for k, v in r["checkpoint"].items() if isinstance(v, dict))
        print(f"seed {seed}: noise {row['noise']}, grad_rel "
              f"{ {k: row[k]['grad_rel'] for k in r['layouts']} }", flush=True)
        out.append(row)
    return out


def run_multihost(model: str, steps: int) -> dict:
    from examples.launch_multihost import launch
    out = {}
    with tempfile.TemporaryDirectory() as d:
        common = ["--model", model, "--steps", str(steps), "--mesh", "2x4"]
        for label, nproc, ndev in (("2 processes x 4 devices", 2, 4),
                                   ("1 process x 8 devices", 1, 8)):
            res = os.path.join(d, f"{nproc}.json")
            ck = os.path.join(d, f"ckpt{nproc}")
            t = time.perf_counter()
            status = launch([*common, "--ckpt", ck, "--out", res], num_processes=nproc,
                            local_devices=ndev, sink=open(os.devnull, "w"))
            wall = time.perf_counter() - t
            if status:
                out[label] = {"status": status}
                continue
            with open(res) as f:
                out[label] = json.load(f) | {"wall_s": round(wall, 1)}
            print(f"{label}: losses {out[label]['losses']}, restored bit-exact "
                  f"{out[label].get('restored_equal')}, {wall:.0f} s", flush=True)
    a = out.get("2 processes x 4 devices", {}).get("losses")
    b = out.get("1 process x 8 devices", {}).get("losses")
    if a and b:
        out["loss_rel_max"] = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("reference", "small"), default="reference")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", default="layouts,unpinned,seeds,multihost")
    p.add_argument("--mh-model", choices=("reference", "small"), default="reference")
    p.add_argument("--mh-steps", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "bench_shard.json"))
    args = p.parse_args()
    parts = set(args.only.split(","))
    result = _common.metadata()
    if "layouts" in parts:
        result["layouts"] = run_layouts(args)
    if "unpinned" in parts:
        result["unpinned"] = run_unpinned(args)
    if "seeds" in parts and args.seeds > 0:
        result["seeds"] = run_seeds(args.seeds)
    if "multihost" in parts:
        result["multihost"] = run_multihost(args.mh_model, args.mh_steps)
    _common.write_json(args.out, result)


if __name__ == "__main__":
    main()
