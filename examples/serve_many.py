"""Serving many adapters on one base: a set, a mixed batch, hot swap, composition.

Builds three adapters of different ranks for a small decoder (the reference
architecture, scaled down so this runs in seconds on a CPU), stacks them into
an `lj.AdapterSet`, saves and restores it, then

* runs one batch in which every sequence names its adapter (or ``__base__``)
  through `lj.apply_mixed`, and checks each row against that sequence run
  alone with its own adapter;
* swaps the active adapter of a jitted single-adapter forward and counts
  compilations (none after the first);
* combines two adapters with weights (exact ``cat``, truncated ``svd``).

Usage:
  python examples/serve_many.py
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lora_jax as lj  # noqa: E402
from examples import gpt  # noqa: E402

CFG = gpt.GPTConfig(vocab=257, d_model=64, n_heads=4, n_layers=2, d_mlp=128, max_len=32)


def trained_like(variables, config, seed):
    """An adapter with random A and non-zero B (as if trained)."""
    ad = lj.init(variables, config, key=jax.random.key(seed))
    gen = np.random.default_rng(seed)
    return jax.tree.map(
        lambda n: n._replace(b=jnp.asarray(0.05 * gen.standard_normal(n.b.shape), n.b.dtype))
        if lj.is_lora(n) else n, ad, is_leaf=lj.is_lora)


def main():
    model, variables = gpt.init_linen(CFG, seed=0)
    members = {}
    for seed, (name, rank) in enumerate([("support", 4), ("legal", 8), ("poetry", 2)]):
        cfg = lj.LoraConfig(rank=rank, alpha=2 * rank, targets=gpt.TARGETS)
        members[name] = (trained_like(variables, cfg, seed), cfg)
    aset = lj.adapter_set(members)
    print(aset, "| set config rank:", aset.config.rank)

    with tempfile.TemporaryDirectory() as d:
        lj.save_set(d, aset, params=variables)
        aset = lj.restore_set(d, params=variables)              # verified, on this base

    # one batch, one adapter per sequence, one compiled program
    names = ["legal", "__base__", "support", "poetry", "legal", "support"]
    tokens = gpt.random_tokens(CFG, len(names), seed=1)[:, :-1]
    serve = jax.jit(lj.apply_mixed(model.apply))
    logits = serve(variables, aset, lj.adapter_ids(aset, names), tokens)
    single = jax.jit(lj.apply(model.apply, aset.config))
    worst = 0.0
    for e, name in enumerate(names):
        if name == lj.BASE:
            alone = model.apply(variables, tokens[e:e + 1])
        else:
            alone = single(variables, lj.select_adapter(aset, name), tokens[e:e + 1])
        worst = max(worst, float(jnp.max(jnp.abs(logits[e] - alone[0])) /
                                 jnp.max(jnp.abs(alone))))
    print(f"mixed batch of {len(names)}: max relative difference to each sequence alone "
          f"{worst:.1e}")

    # hot swap: same shapes for every adapter of the set, so no recompilation
    n_compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda ev, dur, **kw: n_compiles.append(ev)
        if ev == "/jax/core/compile/backend_compile_duration" else None)
    for name in aset.names * 2:
        jax.block_until_ready(single(variables, lj.select_adapter(aset, name), tokens[:1]))
    print(f"6 swaps of the active adapter: {len(n_compiles)} compilations")

    # composition: exact sum (cat) and its best rank-4 approximation (svd)
    weights = {"support": 1.0, "legal": -0.5}
    cat = lj.combine(aset, weights, method="cat")
    svd = lj.combine(aset, weights, method="svd", rank=4)
    kept = min(1 - s.error_at(s.rank_kept) ** 2 for s in svd.report)
    print(f"cat: rank {cat.config.rank} (exact); svd: rank {svd.config.rank}, "
          f"energy kept >= {kept:.3f} in every layer")
    merged = lj.merge_weighted(variables, aset, weights)   # the same sum, folded into W
    via_cat = lj.merge(variables, cat.adapters, cat.config)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(merged), jax.tree.leaves(via_cat)))
    print(f"merge_weighted vs merge(cat): max abs difference {diff:.1e}")
    return worst, len(n_compiles)


if __name__ == "__main__":
    main()
