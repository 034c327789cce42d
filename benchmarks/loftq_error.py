"""LoftQ's reconstruction error against plain quantization (``python benchmarks/loftq_error.py``).

For a 256x256 standard-normal weight (numpy seed 0): ``||W - W'||_F / ||W||_F`` with
``W' = deq(quantize(W))`` (plain) and ``W' = deq(Q) + s * A @ B`` after LoftQ
(`lj.init` with ``LoraConfig(init="loftq")``), for NF4 and int8, rank 8 and 16,
1 and 5 rounds; then per layer for a stacked (4, 256, 256) weight (seed 1). A
few seconds on a CPU; the figures are in ``benchmarks/RESULTS.md``.
"""

import jax.numpy as jnp
import numpy as np

import lora_jax as lj


def main():
    w = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((256, 256)), jnp.float32)}
    print("| method | rank | rounds | plain | LoftQ |\n|---|---|---|---|---|")
    for method in ("nf4", "int8"):
        for r in (8, 16):
            for it in (1, 5):
                cfg = lj.LoraConfig(rank=r, alpha=16, targets="w", init="loftq", loftq_iters=it)
                q, ad = lj.init(w, cfg, return_params=True,
                                quantized=lj.quantize(w, targets="w", method=method, config=cfg))
                e = lj.loftq_report(w, q, ad, cfg)["w"]
                print(f"| {method} | {r} | {it} | {float(e.plain):.5f} | {float(e.loftq):.5f} |")
    g = np.random.default_rng(1)
    p = {"layers": jnp.asarray(g.standard_normal((4, 256, 256)), jnp.float32)}
    cfg = lj.LoraConfig(rank=16, alpha=16, targets="layers", init="loftq", loftq_iters=5,
                        layouts={"layers": lj.Layout(1, 1, 1)})
    q, ad = lj.init(p, cfg, return_params=True,
                    quantized=lj.quantize(p, targets="layers", config=cfg))
    e = lj.loftq_report(p, q, ad, cfg)["layers"]
    print(f"stacked (4, 256, 256), nf4, rank 16, 5 rounds, per layer: plain "
          f"{np.round(e.plain, 5).tolist()}, LoftQ {np.round(e.loftq, 5).tolist()}")


if __name__ == "__main__":
    main()
