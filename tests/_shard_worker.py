"""8-device checks for tests/test_shard.py, run in a fresh process.

XLA's device count is fixed when the backend starts, and the pytest process
has already started it with one CPU device, so `test_shard.py` runs this
module as ``python -m tests._shard_worker OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and asserts on the
JSON it writes. One process runs every check, and each layout compiles one
program, to keep the time down: the optimizer is Adam chained after
`keep_grads`, which stores the gradient it receives in the optimizer state,
so the train step itself hands back its loss *and* its exact gradients.

Layouts of the small decoder's base weights (LoRA on q,k,v,o,fc1,fc2):

* fsdp: mesh ('data',)=8; every kernel split along its input axis, the
  embeddings along d_model; batch split over 'data'.
* tp:   mesh ('model',)=8; q,k,v,fc1 column-parallel P(None,'model'),
  o,fc2 row-parallel P('model',None); batch replicated.
* mix:  mesh ('data','model')=2x4; q,k,v,fc1 P('data','model'), o,fc2
  P('model','data'); batch split over 'data'.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P, SingleDeviceSharding

import lora_jax as lj
from examples import gpt
from tests._asserts import CompileCounter, assert_trees_close, rel_err
from tests.conftest import SMALL as _SMALL

# The suite's small decoder with one block: all six targets, half the compile time.
SMALL = dataclasses.replace(_SMALL, n_layers=1)
COL = r".*/(q|k|v|fc1)"
ROW = r".*/(o|fc2)"
LAYOUTS = {
    "fsdp": ((8,), ("data",), P("data"), {
        r".*/kernel": P("data", None),
        r"params/(wte/embedding|wpe)": P(None, "data")}),
    "tp": ((8,), ("model",), P(), {
        COL + "/kernel": P(None, "model"), COL + "/bias": P("model"),
        ROW + "/kernel": P("model", None)}),
    "mix": ((2, 4), ("data", "model"), P("data"), {
        COL + "/kernel": P("data", "model"), COL + "/bias": P("model"),
        ROW + "/kernel": P("model", "data"),
        r"params/(wte/embedding|wpe)": P(None, "data")}),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
N_STEPS = 20
BATCH = 16


class KeptGrads(NamedTuple):
    grads: Any


def keep_grads() -> optax.GradientTransformation:
    """Passes updates through and keeps the last ones (the raw gradients) in its state."""
    return optax.GradientTransformation(
        lambda params: KeptGrads(jax.tree.map(jnp.zeros_like, params)),
        lambda updates, state, params=None: (updates, KeptGrads(updates)))


def kept_grads(opt_state):
    return opt_state.inner_states["train"].inner_state[0].grads


def mesh_of(shape, names):
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return jax.sharding.Mesh(devices, names)


def count_collectives(hlo_text: str) -> dict:
    """Collective ops in compiled HLO text (an async pair counts once, at -start)."""
    return {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo_text)) for op in COLLECTIVES}


def host(tree):
    return jax.tree.map(np.asarray, tree)


def worst_rel(actual, expected) -> tuple[float, str]:
    errs = {lj.path_str(p): rel_err(x, y) for (p, x), (_, y) in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0],
        jax.tree_util.tree_flatten_with_path(expected)[0])}
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def make_inputs(seed: int):
    """Model, params, config and adapters (non-zero B), filled from numpy's RNG:
    jax.random under jit would compile for seconds, and lj.init is tested elsewhere."""
    rng = np.random.default_rng(seed)
    model = gpt.GPT(SMALL)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))

    def fill(keypath, s):
        name = lj.path_str(keypath).rsplit("/", 1)[-1]
        base = 1.0 if name == "scale" else 0.0
        return (base + 0.02 * rng.standard_normal(s.shape)).astype(s.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, abstract)
    config = lj.LoraConfig(targets=gpt.TARGETS, rank=4, alpha=8)
    abstract_ad = jax.eval_shape(lambda v: lj.init(v, config, key=jax.random.key(0)), variables)

    def fill_ad(keypath, node):
        if not lj.is_lora(node):
            return node
        bound = 1 / np.sqrt(node.a.shape[-2])
        return lj.LoraWeights(
            rng.uniform(-bound, bound, node.a.shape).astype(np.float32),
            (0.1 * rng.standard_normal(node.b.shape)).astype(np.float32),
            np.float32(config.scale_for(lj.path_str(keypath))))

    adapters = jax.tree_util.tree_map_with_path(fill_ad, abstract_ad, is_leaf=lj.is_lora)
    return model, variables, config, adapters


def run_steps(step, params, ad, opt, toks):
    """N_STEPS steps; returns final state, losses, step-1 grads, compile counts."""
    losses, compiles, grads1 = [], [], None
    with CompileCounter() as cc:
        for i in range(N_STEPS):
            ad, opt, loss = step(params, ad, opt, toks)
            if i == 0:
                grads1 = host(kept_grads(opt))
            losses.append(float(loss))
            compiles.append(cc.count)
    return ad, opt, losses, grads1, compiles


def main(out_path: str) -> None:
    t_start = time.perf_counter()
    timings, tick = {}, [time.perf_counter(), time.process_time()]

    def lap(name):
        now = time.perf_counter(), time.process_time()
        timings[name] = {"wall_s": round(now[0] - tick[0], 2), "cpu_s": round(now[1] - tick[1], 2)}
        tick[:] = now

    seed = int(os.environ.get("LORA_JAX_TEST_SEED", "0"))
    model, variables, config, adapters = make_inputs(seed)
    tokens = np.asarray(gpt.random_tokens(SMALL, BATCH, seed=seed % 100003))
    tx = lj.optimizer(optax.chain(keep_grads(), optax.adam(1e-2)))
    forward, fwd_name = lj.apply(model.apply, config), "apply"

    def loss_fn(v, a, toks):
        return gpt.causal_lm_loss(forward(v, a, toks[:, :-1]), toks[:, 1:])

    h_vars, h_ad = host(variables), host(adapters)
    h_opt = host(jax.jit(tx.init)(adapters))
    dev0 = SingleDeviceSharding(jax.devices()[0])
    lap("setup")

    # ---- one device: the reference, and its own reduction-order noise (the
    # same step with the batch's examples permuted: the same sums, added in
    # another order, which is what sharding the batch changes too)
    single = jax.jit(lj.make_train_step(loss_fn, tx, jit=False), donate_argnums=(1, 2))
    with CompileCounter() as cc:
        ad, opt = jax.device_put(h_ad, dev0), jax.device_put(h_opt, dev0)
        compiled = single.lower(variables, ad, opt, tokens).compile()
        ad, opt, ref_losses, ref_grads, _ = run_steps(single, variables, ad, opt, tokens)
    ref_final = host(ad)
    perm = np.random.default_rng(seed).permutation(BATCH)
    _, opt_p, loss_p = single(variables, jax.device_put(h_ad, dev0),
                              jax.device_put(h_opt, dev0), tokens[perm])
    result = {
        "devices": jax.device_count(), "seed": seed, "forward": fwd_name,
        "model": dataclasses.asdict(SMALL) | {"dtype": "float32"}, "batch": BATCH,
        "single": {"flops": float(compiled.cost_analysis()["flops"]),
                   "collectives": count_collectives(compiled.as_text()),
                   "compiles": cc.count, "losses": ref_losses,
                   "reduction_order_noise": {
                       "loss_rel": abs(float(loss_p) - ref_losses[0]) / abs(ref_losses[0]),
                       "grad_rel": worst_rel(host(kept_grads(opt_p)), ref_grads)[0]}},
        "layouts": {}}
    lap("single")

    # ---- each layout: one compile, 20 steps
    built = {}
    for lname, (shape, names, batch_spec, rules) in LAYOUTS.items():
        mesh = mesh_of(shape, names)
        params = jax.device_put(h_vars, lj.param_shardings(h_vars, mesh, rules=rules))
        sh = lj.train_shardings(params, config, tx, batch=batch_spec)
        toks = jax.device_put(tokens, sh.batch[0])
        step = lj.make_sharded_train_step(loss_fn, tx, sh)
        ad, opt = lj.shard_train_state(jax.device_put(h_ad, dev0),
                                       jax.device_put(h_opt, dev0), sh)
        placed = jax.tree.map(lambda x: x.sharding, (ad, opt))
        with CompileCounter() as cc:
            compiled = step.lower(params, ad, opt, toks).compile()
            ad, opt, losses, grads, compiles = run_steps(step, params, ad, opt, toks)
        grad_rel, worst = worst_rel(grads, ref_grads)
        kept = all(a.is_equivalent_to(b, x.ndim) for a, b, x in zip(
            jax.tree.leaves(jax.tree.map(lambda x: x.sharding, (ad, opt))),
            jax.tree.leaves(placed), jax.tree.leaves((ad, opt))))
        q = sh.adapters["params"]["block_0"]["attn"]
        result["layouts"][lname] = {
            "mesh": dict(zip(names, shape)),
            "loss_rel": abs(losses[0] - ref_losses[0]) / abs(ref_losses[0]),
            "grad_rel": grad_rel, "grad_rel_worst_path": worst,
            "loss_rel_max_over_20": max(abs(a - b) / abs(b)
                                        for a, b in zip(losses, ref_losses)),
            "adapters_rel_after_20": worst_rel(host(ad), ref_final)[0],
            "flops_per_device": float(compiled.cost_analysis()["flops"]),
            "collectives": count_collectives(compiled.as_text()),
            "compiles_with_20_steps": cc.count,
            "compiles_during_20_steps": compiles[-1],
            "shardings_kept": kept, "losses": losses,
            "specs": {f"{n}/{f}": str(getattr(q[n]["kernel"], f).spec)
                      for n in ("q", "o") for f in ("a", "b")}}
        if lname == "mix":
            node = ad["params"]["block_0"]["attn"]["q"]["kernel"]
            moved = jax.tree.map(lambda x: x, ad)
            moved["params"]["block_0"]["attn"]["q"]["kernel"] = node._replace(
                a=jax.device_put(node.a, jax.sharding.NamedSharding(mesh, P(None, "model"))))
            try:
                step(params, moved, opt, toks)
                error = "none"
            except ValueError as e:
                error = str(e)
            result["layouts"][lname]["moved_adapter_error"] = error
        built[lname] = (sh, params, toks, step, ad, opt)
        lap(lname)

    # ---- checkpoints across topologies: 2x4 -> 8x1 -> 1 device -> 2x4, bit-exact
    sh24, params24, toks24, step24, ad24, opt24 = built["mix"]
    want_ad, want_opt = host(ad24), host(opt24)
    mesh81 = mesh_of((8, 1), ("data", "model"))
    sh81 = lj.train_shardings(
        jax.device_put(h_vars, lj.param_shardings(h_vars, mesh81, rules=LAYOUTS["fsdp"][3])),
        config, tx, batch=P("data"))

    def like(tree, shardings):
        if isinstance(shardings, jax.sharding.Sharding):
            shardings = jax.tree.map(lambda _: shardings, tree)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            tree, shardings)

    hops = {}
    with tempfile.TemporaryDirectory() as d:
        src_ad, src_opt = ad24, opt24
        for n, (hop, ad_to, opt_to) in enumerate([
                ("2x4->8x1", sh81.adapters, sh81.opt_state),
                ("8x1->1dev", dev0, dev0),
                ("1dev->2x4", sh24.adapters, sh24.opt_state)]):
            lj.save(d, src_ad, config, step=n, params=variables, opt_state=src_opt)
            state, cfg2 = lj.restore_state(d, params=variables, step=n, shardings=ad_to,
                                           opt_state_like=like(want_opt, opt_to))
            assert cfg2 == config
            assert_trees_close(host(state.adapters), want_ad, exact=True)
            assert_trees_close(host(state.opt_state), want_opt, exact=True)
            asked = jax.tree.leaves(like(want_ad, ad_to) if isinstance(
                ad_to, jax.sharding.Sharding) else ad_to)
            asked = [getattr(s, "sharding", s) for s in asked]
            hops[hop] = {
                "bit_exact": True,
                "placed": all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(
                    jax.tree.leaves((state.adapters)), asked)),
                "opt_placed": all(x.sharding.is_equivalent_to(s.sharding, x.ndim)
                                  for x, s in zip(jax.tree.leaves(state.opt_state),
                                                  jax.tree.leaves(like(want_opt, opt_to)))),
                "specs": sorted({str(getattr(x.sharding, "spec", "single device"))
                                 for x in jax.tree.leaves(state.adapters)})}
            src_ad, src_opt = state.adapters, state.opt_state
        # back on 2x4, the restored state trains on with the same compiled step
        with CompileCounter() as cc:
            for _ in range(2):
                src_ad, src_opt, _ = step24(params24, src_ad, src_opt, toks24)
        hops["resume_compiles"] = cc.count
    result["checkpoint"] = hops
    lap("checkpoint")
    result["timings"] = timings
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
