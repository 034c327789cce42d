"""Domain adaptation of a small GPT with LoRA: what it gains, what it forgets.

The reference decoder (``examples/gpt.py``, shrunk for a CPU) is pre-trained
on WordNet definitions of one category (``noun.artifact``: "a fabric woven
from goat hair and camel hair") and then adapted to another
(``noun.animal``) two ways at the same step budget: LoRA on every linear
layer, and full fine-tuning. Byte-level tokens; the held-out text is the
test split of the shipped extract. It prints the perplexity per byte of each
model on held-out text of both domains.

    python examples/gpt_domain.py
    python examples/gpt_domain.py --pretrain-steps 2000 --adapt-steps 600
    python examples/gpt_domain.py --source noun.plant --target noun.food
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_jax as lj  # noqa: E402
from examples import gpt  # noqa: E402
from examples.make_wordnet_data import read_extract  # noqa: E402

# Small enough for two CPU cores; same architecture as the reference.
SMALL = gpt.GPTConfig(vocab=256, d_model=128, n_heads=4, n_layers=3, d_mlp=512, max_len=64)


@dataclasses.dataclass(frozen=True)
class Settings:
    source: str = "noun.artifact"
    target: str = "noun.animal"
    pretrain_steps: int = 500
    adapt_steps: int = 150
    batch: int = 16
    rank: int = 8
    alpha: float = 16.0
    lr_pretrain: float = 3e-3
    lr_lora: float = 3e-3
    lr_full: float = 1e-3
    seed: int = 0
    progress: bool = True
    full: bool = True          # also adapt by full fine-tuning, for comparison
    model: gpt.GPTConfig = SMALL
    eval_windows: int | None = None   # cap on held-out windows per domain (smoke tests)


def encode(texts) -> np.ndarray:
    """One byte stream: the definitions, each ended by a newline."""
    return np.frombuffer("".join(t + "\n" for t in texts).encode("utf-8"), np.uint8
                         ).astype(np.int32)


def windows(stream: np.ndarray, length: int) -> np.ndarray:
    """Non-overlapping ``(n, length + 1)`` windows (inputs and next-byte targets)."""
    n = (len(stream) - 1) // length
    idx = np.arange(n)[:, None] * length + np.arange(length + 1)[None, :]
    return stream[idx]


def sample(stream: np.ndarray, rng, batch: int, length: int) -> np.ndarray:
    starts = rng.integers(0, len(stream) - length - 1, size=batch)
    return stream[starts[:, None] + np.arange(length + 1)[None, :]]


def perplexity(loss_fn, held_out: np.ndarray, batch: int = 64) -> float:
    """exp(mean next-byte cross-entropy) over the held-out windows.

    ``loss_fn(tokens)`` returns the mean loss of each window, ``(batch,)``.
    """
    total = 0.0
    for i in range(0, len(held_out), batch):
        chunk = held_out[i:i + batch]
        n = len(chunk)
        # Pad the last chunk with copies of its first window (one compiled shape),
        # and count only the real windows: the loss is a mean over the batch.
        full = np.concatenate([chunk, np.repeat(chunk[:1], batch - n, 0)])
        losses = loss_fn(jnp.asarray(full))
        total += float(jnp.sum(losses[:n]))
    return float(np.exp(total / len(held_out)))


def train(step, frozen, trainable, opt_state, stream, steps, s: Settings, rng, desc):
    from tqdm import tqdm

    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not s.progress, ncols=90)
    for _ in bar:
        tokens = jnp.asarray(sample(stream, rng, s.batch, s.model.max_len))
        trainable, opt_state, loss = step(frozen, trainable, opt_state, tokens)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return trainable, losses


def run(s: Settings) -> dict:
    """Pre-trains, adapts, and returns ``{model: {domain: perplexity}}``."""
    classes, splits = read_extract()
    for name in (s.source, s.target):
        if name not in classes:
            raise ValueError(f"unknown category {name!r}; the extract has {classes}.")
    if s.source == s.target:
        raise ValueError("source and target are the same category; pick two different ones.")

    def stream(split, label):
        sp = splits[split]
        return encode([t for t, y in zip(sp.texts, sp.labels) if classes[y] == label])

    train_src, train_tgt = stream("train", s.source), stream("train", s.target)
    held = {d: windows(stream("test", d), s.model.max_len)[: s.eval_windows]
            for d in (s.source, s.target)}
    rng = np.random.default_rng(s.seed)
    model, variables = gpt.init_linen(s.model, seed=s.seed)
    loss = gpt.loss_fn(model.apply)
    t0 = time.perf_counter()

    # 1. Pre-train everything on the source domain.
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, s.lr_pretrain, 50,
                                                        max(s.pretrain_steps, 51)))
    step = lj.make_train_step(lambda _, v, tokens: loss(v, tokens), tx)
    base, _ = train(step, {}, variables, tx.init(variables), train_src, s.pretrain_steps, s,
                    rng, "pretrain")

    @jax.jit
    def eval_fn(v, tokens):  # per-window mean next-byte loss
        logits = model.apply(v, tokens[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(1)
    results = {"base": {d: perplexity(lambda t: eval_fn(base, t), w) for d, w in held.items()}}

    # 2. LoRA on the target domain: the base stays frozen.
    config = lj.LoraConfig(rank=s.rank, alpha=s.alpha, targets=gpt.TARGETS)
    adapters = lj.init(base, config, key=jax.random.key(s.seed + 1))
    sched = optax.warmup_cosine_decay_schedule(0.0, s.lr_lora, 20, max(s.adapt_steps, 21))
    tx = lj.optimizer(optax.adam(sched))
    fwd = lj.apply(model.apply, config)  # x @ W + s * (x @ a) @ b: W + s * a @ b never formed

    def lora_loss(v, ad, tokens):
        return gpt.causal_lm_loss(fwd(v, ad, tokens[:, :-1]), tokens[:, 1:])

    step = lj.make_train_step(lora_loss, tx)
    adapters, _ = train(step, base, adapters, tx.init(adapters), train_tgt, s.adapt_steps, s,
                        rng, "LoRA")
    adapted = lj.merge(base, adapters, config)
    results["LoRA"] = {d: perplexity(lambda t: eval_fn(adapted, t), w) for d, w in held.items()}
    n_lora = lj.summary(base, adapters).trainable

    # 3. Full fine-tuning on the target domain, same steps, for comparison.
    if s.full:
        sched = optax.warmup_cosine_decay_schedule(0.0, s.lr_full, 20, max(s.adapt_steps, 21))
        tx = optax.adamw(sched)
        step = lj.make_train_step(lambda _, v, tokens: loss(v, tokens), tx)
        tuned = jax.tree.map(jnp.copy, base)
        tuned, _ = train(step, {}, tuned, tx.init(tuned), train_tgt, s.adapt_steps, s, rng,
                         "full FT")
        results["full FT"] = {d: perplexity(lambda t: eval_fn(tuned, t), w)
                              for d, w in held.items()}

    n_all = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base))
    trained = {"base": n_all, "LoRA": n_lora, "full FT": n_all}
    print(f"\nperplexity per byte on held-out definitions ({time.perf_counter() - t0:.0f} s)")
    print(f"| model | trained params | {s.source} (source) | {s.target} (target) |")
    print("|---|---|---|---|")
    for name, ppl in results.items():
        what = "pre-trained on source" if name == "base" else f"{trained[name]:,}"
        print(f"| {name} | {what} | {ppl[s.source]:.3f} | {ppl[s.target]:.3f} |")
    return results


def parse(argv=None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Settings):
        if not isinstance(f.default, (int, float, str)) or isinstance(f.default, bool):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--no-full", action="store_true", help="skip the full fine-tuning run")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(Settings)
          if f.name in vars(a)}
    return Settings(**kw, full=not a.no_full, progress=not a.no_progress)


if __name__ == "__main__":
    run(parse())
