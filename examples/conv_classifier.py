"""LoRA on a small convolutional classifier: pretrain, then adapt the conv kernels.

Synthetic 24x24 grey images (generated here; nothing is downloaded) of
shapes at random positions, sizes and brightness, with noise:

* task A (pretraining): filled square, disc, triangle, plus sign;
* task B (the new task): hollow square, ring, X, L-corner.

A 3-layer CNN (Flax ``nn.Conv``, ~14k parameters) is pretrained on task A,
then adapted to task B three ways, each with a fresh head, for the same
steps on the same batches:

* ``probe``: the head only, on the frozen pretrained features;
* ``lora``:  LoRA on every conv kernel (``lj.apply`` runs each convolution
  as ``conv(x, W) + s * conv(conv(x, a_kernel), b_1x1)``: an r-channel
  convolution then a 1x1 up-projection) + the head;
* ``full``:  everything.

Then the LoRA adapter is merged into the kernels and the merged model's
predictions are compared with the unmerged ones. ``--dora`` trains DoRA
magnitudes as well; ``--quantize nf4|int8`` stores the frozen conv kernels
in 4/8 bits (QLoRA), dequantized at each use.

    python examples/conv_classifier.py              # ~30 s on 2 CPU cores
    python examples/conv_classifier.py --dora --quantize nf4
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a script: make `lora_jax` importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_jax as lj  # noqa: E402

SIZE = 24
TASK_A = ("square", "disc", "triangle", "plus")
TASK_B = ("hollow square", "ring", "X", "L-corner")
CONV_KERNELS = r"params/conv_\d/kernel"
HEAD = r"params/head/(kernel|bias)"


@dataclasses.dataclass(frozen=True)
class Settings:
    """The command-line flags (same names)."""

    pretrain_steps: int = 300
    steps: int = 200
    batch: int = 64
    rank: int = 4
    alpha: float = 8.0
    lr: float = 3e-3
    dora: bool = False
    quantize: str = "none"      # "none", "nf4" or "int8"
    n_train: int = 4000
    n_test: int = 1000
    seed: int = 0


# ----------------------------------------------------------------------------- data


def shapes(kind: str, n: int, gen: np.random.Generator) -> np.ndarray:
    """``n`` noisy 24x24 images of one shape kind, float32 in about [-0.5, 1.5]."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    r = gen.uniform(4.0, 8.0, (n, 1, 1))
    cx = gen.uniform(r[:, 0, 0] + 1, SIZE - r[:, 0, 0] - 1)[:, None, None]
    cy = gen.uniform(r[:, 0, 0] + 1, SIZE - r[:, 0, 0] - 1)[:, None, None]
    dx, dy = x - cx, y - cy
    t = np.maximum(1.5, r / 3)                      # stroke width
    box = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    disc = dx ** 2 + dy ** 2 <= r ** 2
    if kind == "square":
        m = box
    elif kind == "disc":
        m = disc
    elif kind == "triangle":
        m = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    elif kind == "plus":
        m = ((np.abs(dx) <= t / 2) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t / 2) & (np.abs(dx) <= r))
    elif kind == "hollow square":
        m = box & ~((np.abs(dx) <= r - t) & (np.abs(dy) <= r - t))
    elif kind == "ring":
        m = disc & ~(dx ** 2 + dy ** 2 <= (r - t) ** 2)
    elif kind == "X":
        m = box & ((np.abs(dx - dy) <= t / 1.4) | (np.abs(dx + dy) <= t / 1.4))
    elif kind == "L-corner":
        m = box & ((dx <= -r + t) | (dy >= r - t))
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    brightness = gen.uniform(0.6, 1.0, (n, 1, 1))
    img = m * brightness + gen.normal(0.0, 0.25, (n, SIZE, SIZE))
    return img.astype(np.float32)[..., None]


def dataset(classes, n: int, seed: int):
    """``(images (n, 24, 24, 1), labels (n,))``, balanced and shuffled."""
    gen = np.random.default_rng(seed)
    per = -(-n // len(classes))
    x = np.concatenate([shapes(k, per, gen) for k in classes])
    y = np.repeat(np.arange(len(classes)), per)
    order = gen.permutation(len(y))[:n]
    return x[order], y[order].astype(np.int32)


# ----------------------------------------------------------------------------- model


class CNN(nn.Module):
    """Conv(16) -> pool -> Conv(32) -> pool -> Conv(32) -> mean -> Dense."""

    n_classes: int = 4

    @nn.compact
    def __call__(self, x):
        for i, ch in enumerate((16, 32, 32)):
            x = nn.relu(nn.Conv(ch, (3, 3), name=f"conv_{i}")(x))
            if i < 2:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(self.n_classes, name="head")(x.mean(axis=(1, 2)))


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits, labels) -> float:
    return float(np.mean(np.asarray(logits).argmax(-1) == labels))


def _fit(loss_fn, frozen, trainable, tx, data, steps, batch, seed):
    """Adam steps on random batches; returns the trained tree and seconds."""
    x, y = data
    gen = np.random.default_rng(seed)
    step = lj.make_train_step(loss_fn, tx, donate=False)
    state = tx.init(trainable)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = gen.integers(0, len(y), batch)
        trainable, state, _ = step(frozen, trainable, state, x[idx], y[idx])
    jax.block_until_ready(trainable)
    return trainable, time.perf_counter() - t0


def run(s: Settings) -> dict:
    """Pretrains on task A, adapts to task B three ways; returns the results."""
    if s.quantize not in ("none", "nf4", "int8"):
        raise ValueError(f"quantize={s.quantize!r}; use none, nf4 or int8.")
    t_all = time.perf_counter()
    cnn = CNN()
    train_a = dataset(TASK_A, s.n_train, s.seed)
    test_a = dataset(TASK_A, s.n_test, s.seed + 1)
    train_b = dataset(TASK_B, s.n_train, s.seed + 2)
    test_b = dataset(TASK_B, s.n_test, s.seed + 3)
    variables = cnn.init(jax.random.key(s.seed), train_a[0][:1])

    # --- pretraining on task A (everything trained) ----------------------------
    def full_loss(_, v, x, y):
        return cross_entropy(cnn.apply(v, x), y)

    pre, secs = _fit(full_loss, None, variables, optax.adam(s.lr), train_a, s.pretrain_steps,
                     s.batch, s.seed)
    forward = jax.jit(cnn.apply)
    results = {"pretrain_accuracy_task_a": accuracy(forward(pre, test_a[0]), test_a[1]),
               "pretrain_seconds": secs, "runs": {}}

    # Task B starts from the pretrained body and a fresh head.
    head = cnn.init(jax.random.key(s.seed + 1), train_a[0][:1])["params"]["head"]
    base = {"params": {**pre["params"], "head": head}}

    # --- probe: the head alone ----------------------------------------------------
    def head_loss(v, h, x, y):
        p = {"params": {**v["params"], "head": h}}
        return cross_entropy(cnn.apply(p, x), y)

    h, secs = _fit(head_loss, base, base["params"]["head"], optax.adam(s.lr), train_b,
                   s.steps, s.batch, s.seed)
    acc = accuracy(forward({"params": {**base["params"], "head": h}}, test_b[0]), test_b[1])
    results["runs"]["probe"] = {"accuracy": acc, "trainable": _count(h), "seconds": secs}

    # --- LoRA on the conv kernels + the head ----------------------------------
    config = lj.LoraConfig(rank=s.rank, alpha=s.alpha, targets=CONV_KERNELS, train=HEAD,
                           use_dora=s.dora)
    frozen = base
    if s.quantize != "none":
        frozen = lj.quantize(base, targets=CONV_KERNELS, method=s.quantize, config=config)
    adapters = lj.init(frozen, config, key=jax.random.key(s.seed + 2))
    lora_forward = lj.apply(cnn.apply, config)
    explanation = lj.explain(cnn.apply, config, frozen, adapters, test_b[0][:2])

    def lora_loss(v, ad, x, y):
        return cross_entropy(lora_forward(v, ad, x), y)

    adapters, secs = _fit(lora_loss, frozen, adapters, lj.optimizer(optax.adam(s.lr)),
                          train_b, s.steps, s.batch, s.seed)
    unmerged = jax.jit(lora_forward)(frozen, adapters, test_b[0])
    summ = lj.summary(frozen, adapters)
    if s.quantize == "none":
        merged = lj.merge(frozen, adapters, config)
    else:   # merge into a float copy (merging into NF4 would round the update away)
        merged = lj.merge(lj.dequantize(frozen), adapters, config)
    merged_logits = forward(merged, test_b[0])
    results["runs"]["lora"] = {
        "accuracy": accuracy(unmerged, test_b[1]), "trainable": summ.trainable,
        "seconds": secs, "merged_accuracy": accuracy(merged_logits, test_b[1]),
        "merged_vs_unmerged_disagreements":
            int(np.sum(np.asarray(merged_logits).argmax(-1) != np.asarray(unmerged).argmax(-1))),
        "max_logit_diff": float(np.max(np.abs(np.asarray(merged_logits) - np.asarray(unmerged)))),
        "rules": {p: dict(r) for p, r in explanation.rules.items()},
        "frozen_bytes": summ.frozen_bytes}

    # --- full fine-tuning ----------------------------------------------------------
    tuned, secs = _fit(full_loss, None, jax.tree.map(jnp.copy, base), optax.adam(s.lr),
                       train_b, s.steps, s.batch, s.seed)
    results["runs"]["full"] = {"accuracy": accuracy(forward(tuned, test_b[0]), test_b[1]),
                               "trainable": _count(tuned), "seconds": secs}
    results["total_seconds"] = time.perf_counter() - t_all
    return results


def _count(tree) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def report(r: dict, s: Settings) -> str:
    lines = [f"pretrained on task A ({', '.join(TASK_A)}): "
             f"{100 * r['pretrain_accuracy_task_a']:.1f}% test accuracy",
             f"task B ({', '.join(TASK_B)}), {s.steps} steps of {s.batch}:",
             f"  {'run':<6} {'accuracy':>9} {'trainable':>10} {'train s':>8}"]
    for name, run_ in r["runs"].items():
        lines.append(f"  {name:<6} {100 * run_['accuracy']:>8.1f}% {run_['trainable']:>10,} "
                     f"{run_['seconds']:>8.1f}")
    lo = r["runs"]["lora"]
    kind = ("DoRA" if s.dora else "LoRA") + (f" on a {s.quantize} base" if s.quantize != "none"
                                              else "")
    lines.append(f"{kind} r={s.rank}: rules {sorted({k for v in lo['rules'].values() for k in v})}"
                 f"; merged accuracy {100 * lo['merged_accuracy']:.1f}% "
                 f"({lo['merged_vs_unmerged_disagreements']} predictions differ from unmerged, "
                 f"max logit diff {lo['max_logit_diff']:.1e})")
    lines.append(f"total {r['total_seconds']:.0f} s")
    return "\n".join(lines)


def parse(argv=None) -> Settings:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    p.add_argument("--steps", type=int, default=d.steps, help="steps of each task-B run")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--dora", action="store_true", help="DoRA: also train magnitudes")
    p.add_argument("--quantize", choices=("none", "nf4", "int8"), default=d.quantize,
                   help="store the frozen conv kernels quantized (QLoRA)")
    p.add_argument("--n-train", type=int, default=d.n_train, help="images per task")
    p.add_argument("--n-test", type=int, default=d.n_test)
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args(argv)
    return Settings(pretrain_steps=a.pretrain_steps, steps=a.steps, batch=a.batch,
                    rank=a.rank, alpha=a.alpha, lr=a.lr, dora=a.dora, quantize=a.quantize,
                    n_train=a.n_train, n_test=a.n_test, seed=a.seed)


def main(argv=None):
    s = parse(argv)
    print(report(run(s), s))


if __name__ == "__main__":
    main()
