"""lora_jax side by side with flax.nnx.LoRA and PyTorch PEFT, on identical work.

The reference decoder (examples/gpt.py: 4 layers, d_model 512, 8 heads,
MLP 2048, vocab 8192; batch 8 x seq 128) is built in Flax Linen, Flax NNX
and PyTorch (benchmarks/torch_gpt.py) from the *same* weights, and the same
LoRA factors (rank 8, alpha 16, on q, k, v, o, fc1, fc2; B drawn non-zero
so the adapters change the model) are copied into each library:

training step (Adam, lr 1e-4; loss, gradients, update):

  linen_full      Linen, full fine-tuning (jax.jit, donated buffers)
  linen_lora      Linen + lora_jax (`lj.apply`, `lj.make_train_step`)
  nnx_full        NNX, full fine-tuning (split state, jax.jit)
  nnx_lora        NNX + lora_jax (`lj.apply` over ``nnx.merge`` in the step)
  nnx_flax_lora   NNX with every target wrapped in ``nnx.LoRA`` (grads wrt
                  ``nnx.LoRAParam`` only; nnx.LoRA has no alpha, so alpha/rank
                  is folded into B)
  torch_full      PyTorch eager, full fine-tuning (torch.optim.Adam)
  torch_peft      PyTorch eager + ``peft.get_peft_model``

inference (forward to logits, batch 8 x seq 128): ``base``, ``merged``
(the adapter folded into the weights) and ``unmerged`` (adapter applied on
the fly) for lora_jax (Linen, NNX), nnx.LoRA and PEFT.

Every variant runs in its own worker process (inference: one per library),
so its peak RSS is its own and idle frameworks hold no threads; the
coordinator asks the workers for steps round-robin, so all variants see the
same machine load. Workers compile and warm up before timing; JAX variants
report XLA's cost analysis (FLOPs) and memory analysis, torch variants the
FLOPs that ``torch.utils.flop_counter`` counts (matmuls only). Torch runs
with ``torch.set_num_threads(--threads)`` (default 2).

Cross-check: every training variant reports its loss at step 0 (same
weights, same batch: must agree across the three frameworks) and at step 1
(after one Adam update: agrees for full FT and for lora_jax vs PEFT; not
for nnx.LoRA, whose folded scale changes Adam's update of B).

Writes ``benchmarks/out/bench_compare.json`` and prints tables.

Usage:
  python benchmarks/bench_compare.py [--rounds 15] [--reps 2] [--quick] [--tiny]
      [--only linen_full,linen_lora,...] [--no-inference]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402

ROOT = _common.ROOT

TRAIN = ("linen_full", "linen_lora", "nnx_full", "nnx_lora", "nnx_flax_lora", "torch_full",
         "torch_peft")
INFER = ("linen_infer", "nnx_infer", "torch_infer")
TORCH_WORKERS = ("torch_full", "torch_peft", "torch_infer")
TARGET_NAMES = ("q", "k", "v", "o", "fc1", "fc2")

REFERENCE = dict(vocab=8192, d_model=512, n_heads=8, n_layers=4, d_mlp=2048, batch=8, seq=128)
TINY = dict(vocab=97, d_model=64, n_heads=4, n_layers=2, d_mlp=128, batch=2, seq=16)


# ----------------------------------------------------------------------------- shared weights


def make_weights(spec: dict, path: str) -> None:
    """Writes the reference weights, LoRA factors and token batch to ``path`` (.npz).

    Keys: ``p:<linen path>`` (params), ``a:<path>`` / ``b:<path>`` (LoRA
    factors of a targeted kernel, lora_jax layout ``a: (in, r)``,
    ``b: (r, out)``) and ``tokens`` ``(batch, seq + 1)``.
    """
    import jax
    import numpy as np

    import lora_jax as lj
    from examples import gpt

    cfg = gpt_config(spec)
    _, variables = gpt.init_linen(cfg, seed=0)
    config = lj.LoraConfig(rank=spec["rank"], alpha=spec["alpha"], targets=gpt.TARGETS)
    adapters = lj.init(variables, config, key=jax.random.key(1))
    arrays = {"tokens": np.asarray(gpt.random_tokens(cfg, spec["batch"], seed=0,
                                                     length=spec["seq"]))}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        arrays["p:" + lj.path_str(kp)] = np.asarray(leaf)
    flat_ad = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lj.is_lora)[0]
    for i, (kp, node) in enumerate(flat_ad):
        if lj.is_lora(node):
            key = jax.random.fold_in(jax.random.key(2), i)
            arrays["a:" + lj.path_str(kp)] = np.asarray(node.a)
            # A non-zero B (as after some training), so the adapters matter.
            arrays["b:" + lj.path_str(kp)] = np.asarray(
                0.01 * jax.random.normal(key, node.b.shape, node.b.dtype))
    np.savez(path, **arrays)


def load_weights(path: str):
    """``(params, a, b, tokens)``: flat dicts keyed by Linen path, and the batch."""
    import numpy as np

    data = np.load(path)
    params = {k[2:]: data[k] for k in data.files if k.startswith("p:")}
    a = {k[2:]: data[k] for k in data.files if k.startswith("a:")}
    b = {k[2:]: data[k] for k in data.files if k.startswith("b:")}
    return params, a, b, data["tokens"]


def gpt_config(spec: dict):
    from examples import gpt

    return gpt.GPTConfig(vocab=spec["vocab"], d_model=spec["d_model"], n_heads=spec["n_heads"],
                         n_layers=spec["n_layers"], d_mlp=spec["d_mlp"],
                         max_len=max(spec["seq"], 8))


def nnx_to_linen(path: str) -> str:
    """``blocks/2/attn/q/kernel`` -> ``params/block_2/attn/q/kernel``."""
    parts = path.split("/")
    if parts[0] == "blocks":
        parts = [f"block_{parts[1]}"] + parts[2:]
    return "/".join(["params"] + parts)


# ----------------------------------------------------------------------------- JAX workers


def _nested(flat: dict):
    """``{'a/b/c': x}`` -> ``{'a': {'b': {'c': x}}}``."""
    out = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _jax_common(spec, weights):
    import jax.numpy as jnp
    import optax

    import lora_jax as lj
    from examples import gpt

    params, a, b, tokens = load_weights(weights)
    cfg = gpt_config(spec)
    config = lj.LoraConfig(rank=spec["rank"], alpha=spec["alpha"], targets=gpt.TARGETS)
    tx = optax.adam(spec["lr"])
    return cfg, config, tx, params, a, b, jnp.asarray(tokens)


def _fill_adapters(tree, a, b, to_linen=lambda p: p):
    """Adapter tree ``tree`` (from `lj.init`) with a, b taken from the flat dicts."""
    import jax
    import jax.numpy as jnp

    import lora_jax as lj

    def fill(kp, node):
        if not lj.is_lora(node):
            return node
        p = to_linen(lj.path_str(kp))
        return node._replace(a=jnp.asarray(a[p]), b=jnp.asarray(b[p]))

    return jax.tree_util.tree_map_with_path(fill, tree, is_leaf=lj.is_lora)


def _lora_step(tx, fwd):
    import lora_jax as lj
    from examples import gpt

    def loss(params, adapters, tokens):
        return gpt.causal_lm_loss(fwd(params, adapters, tokens[:, :-1]), tokens[:, 1:])

    ltx = lj.optimizer(tx)
    return lj.make_train_step(loss, ltx), ltx


def _full_step(tx, fwd):
    import jax
    import optax
    from examples import gpt

    def step(params, opt_state, tokens):
        def loss(p):
            return gpt.causal_lm_loss(fwd(p, tokens[:, :-1]), tokens[:, 1:])
        value, g = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1))


def _train_variant(fn, state, advance, loss_index):
    """Compiles, records XLA figures and the losses of steps 0 and 1, warms up."""
    import jax

    res, compiled = _common.analyse(fn, state)
    losses = []
    for _ in range(2):
        out = compiled(*state)
        losses.append(float(jax.device_get(out[loss_index])))
        state = advance(state, out)
    res["loss_step0"], res["loss_step1"] = losses
    holder = {"state": state}

    def run():
        out = compiled(*holder["state"])
        jax.block_until_ready(out)
        holder["state"] = advance(holder["state"], out)

    return {"train": run}, res


def _infer_variant(fn, args):
    import jax

    res, compiled = _common.analyse(fn, args)

    def run():
        jax.block_until_ready(compiled(*args))

    return run, res


def _linen(spec, weights, name):
    import jax
    import jax.numpy as jnp

    import lora_jax as lj
    from examples import gpt

    cfg, config, tx, params, a, b, tokens = _jax_common(spec, weights)
    model = gpt.GPT(cfg)
    variables = jax.tree.map(jnp.asarray, _nested(params))
    adapters = _fill_adapters(lj.init(variables, config, key=jax.random.key(1)), a, b)
    lora_apply = lj.apply(model.apply, config)
    if name == "linen_full":
        step = _full_step(tx, model.apply)
        return _train_variant(step, [variables, tx.init(variables), tokens],
                              lambda s, o: [o[0], o[1], s[2]], 2)
    if name == "linen_lora":
        step, ltx = _lora_step(tx, lora_apply)
        return _train_variant(step, [variables, adapters, ltx.init(adapters), tokens],
                              lambda s, o: [s[0], o[0], o[1], s[3]], 2)
    x = tokens[:, :-1]
    merged = jax.jit(lambda v, ad: lj.merge(v, ad, config))(variables, adapters)
    runs, info = {}, {}
    for k, fn, args in (("base", jax.jit(model.apply), (variables, x)),
                        ("merged", jax.jit(model.apply), (merged, x)),
                        ("unmerged", jax.jit(lora_apply), (variables, adapters, x))):
        runs[k], info[k] = _infer_variant(fn, args)
    info["explain_fallbacks"] = lj.explain(model.apply, config, variables, adapters,
                                           x).n_fallbacks
    return runs, info


def _nnx_model(spec, params):
    """``(graphdef, state)`` of the NNX decoder holding the Linen weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import lora_jax as lj
    from examples import gpt

    cfg = gpt_config(spec)
    abstract = nnx.eval_shape(lambda: gpt.NNXGPT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = state.to_pure_dict()

    def fill(kp, leaf):
        p = nnx_to_linen(lj.path_str(kp))
        value = params[p]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(f"{p}: shape {value.shape} != NNX {leaf.shape}")
        return jnp.asarray(value)

    pure = jax.tree_util.tree_map_with_path(fill, pure)
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state


def _nnx(spec, weights, name):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import lora_jax as lj
    from examples import gpt

    cfg, config, tx, params, a, b, tokens = _jax_common(spec, weights)
    graphdef, state = _nnx_model(spec, params)

    def forward(st, toks):
        return nnx.merge(graphdef, st)(toks)

    adapters = _fill_adapters(lj.init(state, config, key=jax.random.key(1)), a, b, nnx_to_linen)
    lora_apply = lj.apply(forward, config)
    scale = spec["alpha"] / spec["rank"]
    if name == "nnx_full":
        step = _full_step(tx, forward)
        return _train_variant(step, [state, tx.init(state), tokens],
                              lambda s, o: [o[0], o[1], s[2]], 2)
    if name == "nnx_lora":
        step, ltx = _lora_step(tx, lora_apply)
        return _train_variant(step, [state, adapters, ltx.init(adapters), tokens],
                              lambda s, o: [s[0], o[0], o[1], s[3]], 2)

    # flax.nnx.LoRA: wrap every target Linear; fold alpha/rank into B.
    model = nnx.merge(graphdef, state)
    for i, blk in enumerate(model.blocks):
        for parent, names in ((blk.attn, ("q", "k", "v", "o")), (blk.mlp, ("fc1", "fc2"))):
            for n in names:
                lin = getattr(parent, n)
                lora = nnx.LoRA(lin.in_features, spec["rank"], lin.out_features,
                                base_module=lin, rngs=nnx.Rngs(0))
                p = f"params/block_{i}/{'attn' if n in 'qkvo' else 'mlp'}/{n}/kernel"
                lora.lora_a[...] = jnp.asarray(a[p])
                lora.lora_b[...] = jnp.asarray(scale * b[p])
                setattr(parent, n, lora)
    lgraph, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)

    def flax_forward(ls, rs, toks):
        return nnx.merge(lgraph, ls, rs)(toks)

    if name == "nnx_flax_lora":
        import optax

        def step(ls, opt_state, rs, toks):
            def loss(l):
                return gpt.causal_lm_loss(flax_forward(l, rs, toks[:, :-1]), toks[:, 1:])
            value, g = jax.value_and_grad(loss)(ls)
            updates, opt_state = tx.update(g, opt_state, ls)
            return optax.apply_updates(ls, updates), opt_state, value

        return _train_variant(jax.jit(step, donate_argnums=(0, 1)),
                              [lora_state, tx.init(lora_state), rest, tokens],
                              lambda s, o: [o[0], o[1], s[2], s[3]], 2)

    x = tokens[:, :-1]
    merged = jax.jit(lambda s, ad: lj.merge(s, ad, config))(state, adapters)

    def fold(kp, leaf):  # what a user of nnx.LoRA does by hand to merge
        p = nnx_to_linen(lj.path_str(kp))
        if p in a:
            return leaf + jnp.asarray(a[p]) @ jnp.asarray(scale * b[p])
        return leaf

    flax_merged = jax.tree_util.tree_map_with_path(fold, state)
    runs, info = {}, {}
    for k, fn, args in (("base", jax.jit(forward), (state, x)),
                        ("lora_jax_merged", jax.jit(forward), (merged, x)),
                        ("lora_jax_unmerged", jax.jit(lora_apply), (state, adapters, x)),
                        ("flax_lora_merged", jax.jit(forward), (flax_merged, x)),
                        ("flax_lora_unmerged", jax.jit(flax_forward), (lora_state, rest, x))):
        runs[k], info[k] = _infer_variant(fn, args)
    return runs, info


# ----------------------------------------------------------------------------- torch workers


def _torch(spec, weights, name):
    import numpy as np
    import torch

    import torch_gpt

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    params, a, b, tokens = load_weights(weights)
    tokens = torch.from_numpy(np.asarray(tokens, np.int64))
    base = torch_gpt.from_flat(params, n_heads=spec["n_heads"])

    def peft_model(model):
        import peft

        pconf = peft.LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"],
                                target_modules=list(TARGET_NAMES), lora_dropout=0.0,
                                bias="none")
        pm = peft.get_peft_model(model, pconf)
        filled = 0
        with torch.no_grad():
            for pname, prm in pm.named_parameters():
                if ".lora_A." not in pname and ".lora_B." not in pname:
                    continue
                module = pname.split("base_model.model.", 1)[1].split(".lora_")[0]
                path = "params/" + module.replace("blocks.", "block_", 1).replace(".", "/") \
                    + "/kernel"
                src = a[path] if ".lora_A." in pname else b[path]
                prm.copy_(torch.from_numpy(np.ascontiguousarray(src.T)))
                filled += 1
        if filled != 2 * len(a):
            raise ValueError(f"filled {filled} PEFT factors, expected {2 * len(a)}")
        return pm

    if name in ("torch_full", "torch_peft"):
        model = base if name == "torch_full" else peft_model(base)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(trainable, lr=spec["lr"])

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch_gpt.loss_fn(model, tokens)
            loss.backward()
            opt.step()
            return loss

        info = {"trainable_params": int(sum(p.numel() for p in trainable))}
        try:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                opt.zero_grad(set_to_none=True)
                torch_gpt.loss_fn(model, tokens).backward()
            info["torch_flops"] = float(counter.get_total_flops())
            opt.zero_grad(set_to_none=True)
        except Exception as e:  # the counter is best effort
            info["torch_flops_error"] = repr(e)
        info["loss_step0"] = float(step().item())
        info["loss_step1"] = float(step().item())
        step()  # warm-up
        return {"train": step}, info

    model_lora = peft_model(torch_gpt.from_flat(params, n_heads=spec["n_heads"]))
    merged = copy.deepcopy(model_lora).merge_and_unload()
    for m in (base, model_lora, merged):
        m.eval()
    x = tokens[:, :-1]

    def runner(m):
        def run():
            with torch.inference_mode():
                m(x)
        return run

    runs = {"base": runner(base), "peft_merged": runner(merged),
            "peft_unmerged": runner(model_lora)}
    for r in runs.values():
        r()
    return runs, {}


# ----------------------------------------------------------------------------- worker loop


def worker(groups: list[str], spec: dict, weights: str) -> None:
    """Serves variant groups: JSON commands on stdin, JSON replies on the saved stdout."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints from libraries go to stderr, not the protocol
    sys.stdout = sys.stderr

    def reply(obj):
        proto.write(json.dumps(obj, default=str) + "\n")
        proto.flush()

    runs, infos = {}, {}
    try:
        # Import the frameworks before the baseline RSS, so it counts them.
        if any(g.startswith("torch") for g in groups):
            import peft  # noqa: F401
            import torch  # noqa: F401
        if any(not g.startswith("torch") for g in groups):
            import flax  # noqa: F401
            import jax  # noqa: F401

            import lora_jax  # noqa: F401
        rss_base = _common.rss_bytes()
        for g in groups:
            build = _torch if g.startswith("torch") else _linen if g.startswith("linen") else _nnx
            t0 = time.perf_counter()
            group_runs, info = build(spec, weights, g)
            info["setup_s"] = time.perf_counter() - t0
            runs.update({f"{g}:{v}": fn for v, fn in group_runs.items()})
            infos[g] = info
        reply({"ready": sorted(runs)})
    except Exception as e:
        import traceback

        traceback.print_exc()
        reply({"error": f"{type(e).__name__}: {e}"})
        return
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "time":
            run, out = runs[cmd["variant"]], []
            for _ in range(cmd["reps"]):
                t0, c0 = time.perf_counter(), time.process_time()
                run()
                out.append((time.perf_counter() - t0, time.process_time() - c0))
            reply({"times": out})
        elif cmd["cmd"] == "info":
            reply({"info": infos, "process": dict(peak_rss=_common.peak_rss_bytes(),
                                                  rss_after_imports=rss_base,
                                                  groups=groups,
                                                  versions=_common.versions())})
        elif cmd["cmd"] == "quit":
            return


class Worker:
    """A worker subprocess and its line protocol."""

    def __init__(self, groups: list[str], spec: dict, weights: str):
        self.name = ",".join(groups)
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", self.name, "--spec",
             json.dumps(spec), "--weights", weights],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env, cwd=ROOT)
        self._stderr = []
        import threading

        def drain():  # keep stderr from filling its pipe; keep the tail for errors
            for line in self.proc.stderr:
                self._stderr.append(line)
                del self._stderr[:-40]

        threading.Thread(target=drain, daemon=True).start()

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died:\n{''.join(self._stderr)}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"worker {self.name}: {msg['error']}\n{''.join(self._stderr)}")
        return msg

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ----------------------------------------------------------------------------- coordinator


def _ratio(x, y):
    return None if x is None or y is None else x / y


def ratios(train: dict) -> dict:
    t = {k: v.get("median_s") for k, v in train.items()}
    f = {k: v.get("flops") for k, v in train.items()}
    out = {
        "linen_lora/linen_full": _ratio(t.get("linen_lora"), t.get("linen_full")),
        "nnx_lora/nnx_full": _ratio(t.get("nnx_lora"), t.get("nnx_full")),
        "nnx_flax_lora/nnx_full": _ratio(t.get("nnx_flax_lora"), t.get("nnx_full")),
        "torch_peft/torch_full": _ratio(t.get("torch_peft"), t.get("torch_full")),
        "linen_lora/torch_peft": _ratio(t.get("linen_lora"), t.get("torch_peft")),
        "nnx_lora/torch_peft": _ratio(t.get("nnx_lora"), t.get("torch_peft")),
        "linen_lora/nnx_flax_lora": _ratio(t.get("linen_lora"), t.get("nnx_flax_lora")),
        "nnx_lora/nnx_flax_lora": _ratio(t.get("nnx_lora"), t.get("nnx_flax_lora")),
        "flops linen_lora/linen_full": _ratio(f.get("linen_lora"), f.get("linen_full")),
        "flops nnx_lora/nnx_full": _ratio(f.get("nnx_lora"), f.get("nnx_full")),
        "flops nnx_flax_lora/nnx_full": _ratio(f.get("nnx_flax_lora"), f.get("nnx_full")),
        "flops linen_lora/nnx_flax_lora": _ratio(f.get("linen_lora"), f.get("nnx_flax_lora")),
    }
    return {k: v for k, v in out.items() if v is not None}


def targets(r: dict) -> dict:
    """The issue's targets on this machine, with the measured value and verdict."""
    out = {}
    for k, bound in (("linen_lora/torch_peft", 0.90), ("nnx_lora/torch_peft", 0.90),
                     ("linen_lora/nnx_flax_lora", 1.0), ("nnx_lora/nnx_flax_lora", 1.0)):
        if k in r:
            out[k] = dict(measured=r[k], target=f"<= {bound:.2f}", met=r[k] <= bound)
    return out


def cross_check(train: dict) -> dict:
    """Step-0 (and step-1) losses across frameworks: max relative spread."""
    def spread(names, key):
        vals = [train[n][key] for n in names if n in train and key in train[n]]
        if len(vals) < 2:
            return None
        return (max(vals) - min(vals)) / abs(statistics.mean(vals))

    lora = ("linen_lora", "nnx_lora", "nnx_flax_lora", "torch_peft")
    full = ("linen_full", "nnx_full", "torch_full")
    return {"lora_step0_rel_spread": spread(lora, "loss_step0"),
            "full_step0_rel_spread": spread(full, "loss_step0"),
            "lora_jax_vs_peft_step1_rel_spread": spread(("linen_lora", "nnx_lora", "torch_peft"),
                                                        "loss_step1"),
            "full_step1_rel_spread": spread(full, "loss_step1"),
            "losses": {n: [train[n].get("loss_step0"), train[n].get("loss_step1")]
                       for n in train}}


def run(args) -> dict:
    spec = dict(TINY if args.tiny else REFERENCE, rank=args.rank, alpha=args.alpha, lr=1e-4,
                threads=args.threads)
    names = [n for n in TRAIN + (() if args.no_inference else INFER)
             if args.only is None or n in args.only.split(",")]
    result = _common.metadata()
    result["settings"] = dict(spec, rounds=args.rounds, reps=args.reps, variants=names)
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.npz")
        make_weights(spec, weights)
        if args.shared_workers:  # one process per framework: faster, RSS shared
            plan = [[n for n in names if n.startswith("torch")],
                    [n for n in names if not n.startswith("torch")]]
        else:  # one process per variant group: its peak RSS is its own
            plan = [[n] for n in names]
        workers = []
        try:
            for groups in filter(None, plan):  # start all; each compiles and warms up
                workers.append(Worker(groups, spec, weights))
            order = {w: w.recv()["ready"] for w in workers}
            print("workers ready:", ", ".join(w.name for w in workers), flush=True)
            # Round-robin in the order of `names`, whatever process hosts them.
            pairs = sorted(((w, v) for w in workers for v in order[w]),
                           key=lambda p: (names.index(p[1].split(":")[0]), p[1]))
            times = {v: [] for _, v in pairs}
            cpu = {v: [] for _, v in pairs}
            for r in range(args.rounds):
                for w, v in pairs:
                    for wall, c in w.ask(cmd="time", variant=v, reps=args.reps)["times"]:
                        times[v].append(wall)
                        cpu[v].append(c)
                print(f"round {r + 1}/{args.rounds} done", flush=True)
            infos, procs = {}, {}
            for w in workers:
                msg = w.ask(cmd="info")
                for g, info in msg["info"].items():
                    infos[g] = info
                    procs[g] = dict(msg["process"], shared=len(msg["process"]["groups"]) > 1)
        finally:
            for w in workers:
                w.close()
    train, infer = {}, {}
    for n in names:
        proc = procs[n]
        mem = dict(peak_rss=proc["peak_rss"], rss_after_imports=proc["rss_after_imports"],
                   rss_shared_with_other_variants=proc["shared"])
        if n in TRAIN:
            train[n] = dict(infos[n], **mem,
                            **_common.summarize(times[f"{n}:train"], cpu[f"{n}:train"]))
            continue
        lib = n[: -len("_infer")]
        for key in times:
            if key.startswith(n + ":"):
                v = key.split(":", 1)[1]
                infer[f"{lib}/{v}"] = dict(infos[n].get(v, {}),
                                           **_common.summarize(times[key], cpu[key]))
        infer[f"{lib}/_process"] = dict(mem, setup_s=infos[n]["setup_s"])
        if "explain_fallbacks" in infos[n]:
            infer[f"{lib}/_process"]["explain_fallbacks"] = infos[n]["explain_fallbacks"]
    result.update(train=train, inference=infer, ratios=ratios(train), cross_check=cross_check(train))
    result["targets"] = targets(result["ratios"])
    for proc in procs.values():
        result["versions"].update(proc["versions"])
    return result


def table(res: dict) -> str:
    rows = ["variant          median ms   q1-q3 ms       GFLOP   XLA total MiB  peak RSS MiB",
            "-" * 82]
    for n, v in res["train"].items():
        fl = v.get("flops") or v.get("torch_flops")
        rows.append(f"{n:16} {v['median_s'] * 1e3:9.1f}   {v['q1_s'] * 1e3:6.1f}-"
                    f"{v['q3_s'] * 1e3:<6.1f}  {(fl or 0) / 1e9:8.2f}   "
                    f"{_common.fmt_mib(v.get('total_bytes')):>12}  "
                    f"{_common.fmt_mib(v.get('peak_rss')):>12}")
    for n, v in res["inference"].items():
        if n.endswith("/_process"):
            continue
        rows.append(f"{n:28} {v['median_s'] * 1e3:9.1f} ms")
    for k, v in res["ratios"].items():
        rows.append(f"  {k:32} {v:.3f}")
    for k, v in res["targets"].items():
        rows.append(f"  target {k} {v['target']}: {v['measured']:.3f} "
                    f"{'met' if v['met'] else 'MISSED'}")
    rows.append(f"  cross-check: {json.dumps({k: v for k, v in res['cross_check'].items() if k != 'losses'})}")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="5 rounds of 1 rep (reference dims)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model, 2 rounds (for tests)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--only", default=None, help="comma-separated variant/worker names")
    ap.add_argument("--no-inference", action="store_true")
    ap.add_argument("--shared-workers", action="store_true",
                    help="one worker process per framework instead of per variant "
                         "(faster start; peak RSS is then shared, not per variant)")
    ap.add_argument("--out", default=os.path.join(_common.OUT_DIR, "bench_compare.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker.split(","), json.loads(args.spec), args.weights)
    if args.quick:
        args.rounds, args.reps = 5, 1
    if args.tiny:
        args.rounds, args.reps = min(args.rounds, 2), 1
    res = run(args)
    print(table(res), flush=True)
    _common.write_json(args.out, res)


if __name__ == "__main__":
    main()
