"""Regenerates the shipped WordNet extract, ``examples/data/wordnet_nouns.tsv``.

Reads WordNet 3.0's ``data.noun`` (Debian package ``wordnet-base``, at
``/usr/share/wordnet``) and writes a balanced sample of noun definitions
labelled by their lexicographer file (the supersense: ``noun.animal``,
``noun.food``, ...), split into train and test. The sample is a pure function
of the WordNet files and the arguments: synsets are ordered by a SHA-256 of
``seed:offset``, so reruns and other machines give the same bytes.

    python examples/make_wordnet_data.py             # rewrite the shipped extract
    python examples/make_wordnet_data.py --check     # verify it is up to date

Each ``data.noun`` line is ``offset lex_filenum ss_type w_cnt word lex_id ...
| gloss`` (wndb(5WN)); ``w_cnt`` is hexadecimal, ``lex_filenum`` decimal, and
the licence header lines start with two spaces. A gloss is the definition
followed by optional quoted examples (``; "..."``); only the definition is
kept, because the examples often repeat the word itself.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import NamedTuple

import numpy as np

WORDNET = "/usr/share/wordnet"
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data", "wordnet_nouns.tsv")

# lexnames(5WN): lex_filenum -> lexicographer file, nouns only (03..28).
NOUN_LEXNAMES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact",
    7: "noun.attribute", 8: "noun.body", 9: "noun.cognition", 10: "noun.communication",
    11: "noun.event", 12: "noun.feeling", 13: "noun.food", 14: "noun.group",
    15: "noun.location", 16: "noun.motive", 17: "noun.object", 18: "noun.person",
    19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession", 22: "noun.process",
    23: "noun.quantity", 24: "noun.relation", 25: "noun.shape", 26: "noun.state",
    27: "noun.substance", 28: "noun.time",
}

CLASSES = ("noun.animal", "noun.plant", "noun.food", "noun.artifact")
N_TRAIN, N_TEST, SEED = 1000, 250, 0
HEADER = "split\tlabel\toffset\tword\tdefinition"


def parse_data_noun(path: str) -> list[tuple[str, str, str, str]]:
    """``[(offset, lexname, first word, definition), ...]`` for every noun synset."""
    out = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            fields, _, gloss = line.partition(" | ")
            parts = fields.split()
            offset, lex_filenum = parts[0], int(parts[1])
            word = parts[4].replace("_", " ")
            definition = gloss.strip().split('; "')[0].strip().rstrip(";").strip()
            out.append((offset, NOUN_LEXNAMES[lex_filenum], word, definition))
    return out


def _order(seed: int, offset: str) -> bytes:
    return hashlib.sha256(f"{seed}:{offset}".encode()).digest()


def make_rows(synsets, classes=CLASSES, n_train=N_TRAIN, n_test=N_TEST, seed=SEED):
    """Balanced ``(split, label, offset, word, definition)`` rows, train first.

    Definitions that occur more than once in WordNet are dropped, so no text
    is in both splits and no text has two labels.

    Raises:
      ValueError: a class name is unknown or has too few synsets.
    """
    unknown = [c for c in classes if c not in NOUN_LEXNAMES.values()]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; known: {sorted(NOUN_LEXNAMES.values())}")
    counts: dict[str, int] = {}
    for s in synsets:
        counts[s[3].lower()] = counts.get(s[3].lower(), 0) + 1
    by_class: dict[str, list] = {c: [] for c in classes}
    for s in synsets:
        if s[1] in by_class and counts[s[3].lower()] == 1 and "\t" not in s[3]:
            by_class[s[1]].append(s)
    rows = {"train": [], "test": []}
    for c in classes:
        pool = sorted(by_class[c], key=lambda s: _order(seed, s[0]))
        if len(pool) < n_train + n_test:
            raise ValueError(f"{c} has {len(pool)} usable synsets, fewer than "
                             f"{n_train} + {n_test}; lower --train/--test.")
        rows["test"] += [("test", *s[1:2], s[0], *s[2:]) for s in pool[:n_test]]
        rows["train"] += [("train", *s[1:2], s[0], *s[2:])
                          for s in pool[n_test:n_test + n_train]]
    # Interleave classes deterministically so a prefix of the file is balanced too.
    for split in rows:
        rows[split].sort(key=lambda r: _order(seed + 1, r[2]))
    return rows["train"] + rows["test"]


class Split(NamedTuple):
    texts: list      # definitions
    labels: np.ndarray  # int32 class indices into `classes`
    words: list      # the synsets' first word forms


def read_extract(path: str = OUT) -> tuple[tuple[str, ...], dict[str, Split]]:
    """Reads the extract: ``(classes, {"train": Split, "test": Split})``.

    Classes are sorted by name, so label indices don't depend on row order.

    Example:
      >>> classes, splits = read_extract()
      >>> classes
      ('noun.animal', 'noun.artifact', 'noun.food', 'noun.plant')
      >>> len(splits["train"].texts), len(splits["test"].texts)
      (4000, 1000)
    """
    with open(path, encoding="utf-8") as f:
        header, *lines = f.read().splitlines()
    if header != HEADER:
        raise ValueError(f"{path}: header {header!r} is not {HEADER!r}. Fix: regenerate it "
                         f"with python examples/make_wordnet_data.py.")
    rows = [line.split("\t") for line in lines]
    classes = tuple(sorted({r[1] for r in rows}))
    out = {}
    for split in ("train", "test"):
        sel = [r for r in rows if r[0] == split]
        out[split] = Split([r[4] for r in sel],
                           np.array([classes.index(r[1]) for r in sel], np.int32),
                           [r[3] for r in sel])
    return classes, out


def render(rows) -> str:
    return HEADER + "\n" + "".join("\t".join(r) + "\n" for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wordnet", default=WORDNET, help="directory holding data.noun")
    p.add_argument("--out", default=OUT)
    p.add_argument("--classes", default=",".join(CLASSES))
    p.add_argument("--train", type=int, default=N_TRAIN, help="train definitions per class")
    p.add_argument("--test", type=int, default=N_TEST, help="test definitions per class")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--check", action="store_true",
                   help="compare with --out instead of writing it; exit 1 if different")
    args = p.parse_args(argv)
    data = os.path.join(args.wordnet, "data.noun")
    if not os.path.exists(data):
        print(f"{data} not found. Install WordNet 3.0: apt-get install wordnet-base",
              file=sys.stderr)
        return 2
    rows = make_rows(parse_data_noun(data), tuple(args.classes.split(",")),
                     args.train, args.test, args.seed)
    text = render(rows)
    if args.check:
        with open(args.out, encoding="utf-8") as f:
            same = f.read() == text
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from regenerated data'}")
        return 0 if same else 1
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"wrote {len(rows)} rows ({os.path.getsize(args.out):,} bytes) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
