"""plan and presets: the seed figures, exact counts, and the CLI.

Counts are integers and checked exactly, against hand-written formulas
(2 * r * d per square projection; the published parameter counts of the
public models the presets mirror).
"""

import argparse
import math

import jax
import jax.numpy as jnp
import pytest

import lora_jax as lj
from lora_jax._analysis import plan as _plan
from examples import gpt
from tests.conftest import SMALL

QV = lj.LoraConfig(rank=8, alpha=16, targets=r".*/(q_proj|v_proj)/kernel")


def test_single_projection_seed_figure():
    """Seed: a 4096x4096 projection at r=8 -> 65,536 parameters, 256x fewer."""
    tree = {"q": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
    p = lj.plan(tree, lj.LoraConfig(rank=8, targets="q"))
    assert p.n_params == 4096 * 4096 == 16_777_216
    assert p.trainable == p.lora_params == 2 * 8 * 4096 == 65_536
    assert p.reduction == 256.0
    assert p.adapter_bytes == 65_536 * 4 and p.optimizer_bytes == 2 * 65_536 * 4
    assert p.frozen_bytes == 16_777_216 * 4


@pytest.mark.parametrize("name,count", [("gpt2", 124_439_808), ("bert-base", 109_482_240),
                                        ("llama-7b", 6_738_415_616)])
def test_presets_match_published_counts(name, count):
    tree = lj.preset(name)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(tree)) == count
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))
    bf = lj.preset(name, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bf)} == {jnp.dtype(jnp.bfloat16)}


def test_llama_7b_seed_figures():
    """Seed: r=8 on q and v of 32 layers -> 4,194,304 params, ~8.4 MB in fp16; 50 such
    adapters next to one fp16 base vs 50 fp16 copies (14.4 GB vs 700 GB at a nominal 7e9
    parameters; 13.9 GB vs 674 GB at Llama-2-7B's real 6.74e9)."""
    p = lj.plan("llama-7b", QV, adapter_dtype="float16")
    assert p.n_targets == 64
    assert p.trainable == 32 * 2 * (2 * 8 * 4096) == 4_194_304
    assert p.adapter_bytes == 8_388_608 and _plan.fmt_bytes(p.adapter_bytes) == "8.4 MB"
    assert p.frozen_bytes == 6_738_415_616 * 2           # fp16 base
    assert p.reduction == pytest.approx(6_738_415_616 / 4_194_304)  # ~1,607x
    lora, full = p.storage(50)
    assert lora == p.frozen_bytes + 50 * 8_388_608
    assert full == 50 * p.frozen_bytes
    assert (_plan.fmt_bytes(lora), _plan.fmt_bytes(full)) == ("13.9 GB", "673.8 GB")
    # At the seed's nominal 7e9 parameters (14 GB per fp16 copy):
    nominal = 14e9
    assert (nominal + 50 * p.adapter_bytes) / 1e9 == pytest.approx(14.42, abs=0.01)
    assert 50 * nominal / 1e9 == 700
    # Seed: Adam's two states for full fine-tuning of a 7B model ~28 GB (fp16 states).
    assert p.full_optimizer_bytes == 2 * 2 * 6_738_415_616
    assert _plan.fmt_bytes(p.full_optimizer_bytes) == "27.0 GB"


def test_quantized_bases_and_optimizers():
    tree = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16),
            "n": jax.ShapeDtypeStruct((1024,), jnp.float32)}
    cfg = lj.LoraConfig(rank=4, targets="w", train="n")
    n = 1024 * 1024 + 1024
    for dtype, bits in [("nf4", 4.127), ("int8", 8), ("bf16", 16), ("float32", 32)]:
        p = lj.plan(tree, cfg, base_dtype=dtype)
        assert p.frozen_bytes == math.ceil(n * bits / 8), dtype
    mixed = lj.plan(tree, cfg)
    assert mixed.base_dtype == "mixed" and mixed.frozen_bytes == 1024 * 1024 * 2 + 1024 * 4
    # Fully-trained leaves count as trainable; optimizer states per parameter.
    lora = 2 * 4 * 1024
    for opt, states in [("adamw", 2), ("sgd", 0), ("lion", 1), (3, 3)]:
        p = lj.plan(tree, cfg, optimizer=opt, adapter_dtype=jnp.float32)
        assert p.trainable == lora + 1024 and p.trained_params == 1024
        assert p.optimizer_bytes == states * (lora + 1024) * 4
        assert p.gradient_bytes == p.adapter_bytes == (lora + 1024) * 4
        assert p.full_optimizer_bytes == states * n * 4
        assert p.total_bytes == p.frozen_bytes + p.adapter_bytes * (2 + states)


def test_plan_matches_real_adapters_and_optimizer_state(small_gpt, rng):
    """On real params, the plan's counts equal lj.summary of real adapters and Adam state."""
    import optax

    _, variables = small_gpt
    cfg = lj.LoraConfig(rank=4, targets=gpt.TARGETS, train=r".*/ln_f/scale")
    abstract = jax.eval_shape(lambda: variables)
    p = lj.plan(abstract, cfg)
    ad = lj.init(variables, cfg, key=rng)
    state = lj.optimizer(optax.adamw(1e-3)).init(ad)
    s = lj.summary(variables, ad, opt_state=state)
    assert p.trainable == s.trainable and p.n_params == s.total - s.lora
    assert p.adapter_bytes == sum(s.adapter_bytes.values())
    assert p.optimizer_bytes == 4 * s.optimizer_state
    assert p.frozen_bytes == sum(s.frozen_bytes.values())
    assert lj.plan(variables, cfg).trainable == p.trainable   # concrete arrays too
    assert p.n_targets == 6 * SMALL.n_layers


def test_table():
    p = lj.plan("gpt2", lj.LoraConfig(rank=8, targets=r".*/c_attn/kernel"))
    text = p.table(n_adapters=10)
    assert text.startswith("gpt2: 124,439,808 parameters, 12 targets (rank 8)")
    assert "storage, 10 tasks" in text and "294,912" in text
    assert str(p) == p.table(n_adapters=50)


def test_plan_errors():
    tree = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    cfg = lj.LoraConfig(rank=4, targets="w")
    with pytest.raises(ValueError, match="optimizer='adagrad' is unknown"):
        lj.plan(tree, cfg, optimizer="adagrad")
    with pytest.raises(ValueError, match="optimizer=-1"):
        lj.plan(tree, cfg, optimizer=-1)
    with pytest.raises(ValueError, match="base_dtype='int4' is not one of"):
        lj.plan(tree, cfg, base_dtype="int4")
    with pytest.raises(ValueError, match="adapter_dtype='nf4': trainable weights must be"):
        lj.plan(tree, cfg, adapter_dtype="nf4")
    with pytest.raises(ValueError, match="unknown preset 'llama-70b'"):
        lj.plan("llama-70b", cfg)
    with pytest.raises(ValueError, match="matched no leaf"):
        lj.plan(tree, lj.LoraConfig(rank=4, targets="q"))
    with pytest.raises(ValueError, match="n_adapters=0"):
        lj.plan(tree, cfg).storage(0)
    with pytest.raises(ValueError, match="a params leaf dtype"):
        lj.plan({"w": jax.ShapeDtypeStruct((64, 64), jnp.float32),
                 "i": jax.ShapeDtypeStruct((3,), jnp.int32)}, cfg)


def test_targets_regex():
    assert _plan.targets_regex("q_proj, v_proj") == ".*/(q_proj|v_proj)/(kernel|weight)"
    assert _plan.targets_regex(r".*/c_attn/kernel") == r".*/c_attn/kernel"
    with pytest.raises(ValueError, match="--targets is empty"):
        _plan.targets_regex(" , ")


def test_plan_command(capsys):
    parser = argparse.ArgumentParser(prog="lora_jax")
    _plan.add_plan_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", "--preset", "llama-7b", "--rank", "8", "--targets",
                              "q_proj,v_proj", "--adapter-dtype", "float16"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "64 targets (rank 8)" in out and "4,194,304" in out and "8.4 MB" in out
    assert "storage, 50 tasks" in out and "673.8 GB" in out


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_plan_subprocess():
    """The documented command line, end to end."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "lora_jax", "plan", "--preset", "llama-7b", "--rank", "8",
         "--targets", "q_proj,v_proj"], capture_output=True, text=True, cwd=root, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert "llama-7b: 6,738,415,616 parameters, 64 targets (rank 8)" in out.stdout
    assert "4,194,304" in out.stdout and "16.8 MB" in out.stdout   # float32 adapters
    bad = subprocess.run([sys.executable, "-m", "lora_jax", "plan", "--preset", "llama-7b",
                          "--optimizer", "adagrad"], capture_output=True, text=True, cwd=root,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert bad.returncode == 2 and "optimizer='adagrad' is unknown" in bad.stderr
