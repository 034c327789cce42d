"""``python -m lora_jax``: inspect, merge, export-peft, import-peft end to end."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from examples import llama
from lora_jax.__main__ import main
from tests._asserts import assert_trees_close, random_adapters
from tests.conftest import ROOT, SEED

CFG = llama.LlamaConfig(vocab=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64)
LORA = lj.LoraConfig(rank=4, alpha=8, targets=llama.TARGETS)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    shapes = jax.eval_shape(llama.Llama(CFG).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    gen = np.random.default_rng(SEED)
    base = jax.tree.map(lambda s: jnp.asarray(0.1 * gen.normal(size=s.shape), s.dtype), shapes)
    ad = random_adapters(base, LORA, seed=SEED)
    lj.interop.save_params(d / "base.safetensors", base)
    lj.save(d / "ckpt", ad, LORA, params=base)
    return d, base, ad


@pytest.mark.subprocess
def test_help_for_every_command():
    out = subprocess.run([sys.executable, "-m", "lora_jax", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0
    for cmd in ("inspect", "merge", "export-peft", "import-peft"):
        assert cmd in out.stdout
    for cmd in ("inspect", "merge", "export-peft", "import-peft"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0


def test_inspect(setup, capsys):
    d, base, ad = setup
    assert main(["inspect", str(d / "ckpt"), "--no-spectra"]) == 0
    out = capsys.readouterr().out
    assert "params/model/layers_1/mlp/down_proj/kernel" in out
    assert "base fingerprint" in out and "14 entries" in out


def test_merge(setup, tmp_path, capsys):
    d, base, ad = setup
    out = tmp_path / "merged.npz"
    assert main(["merge", str(d / "ckpt"), "--base", str(d / "base.safetensors"),
                 "--out", str(out)]) == 0
    merged = lj.interop.load_params(out)
    want = {lj.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
        lj.merge(base, ad, LORA))[0]}
    assert_trees_close(merged, {k: np.asarray(v) for k, v in want.items()}, exact=True)
    # merging onto the merged params is refused: it is not the fingerprinted base
    code = main(["merge", str(d / "ckpt"), "--base", str(out), "--out", str(tmp_path / "x.npz")])
    assert code == 2 and "different base" in capsys.readouterr().err


def test_export_then_import_roundtrip(setup, tmp_path):
    d, base, ad = setup
    assert main(["export-peft", str(d / "ckpt"), str(tmp_path / "peft"), "--key-map", "llama",
                 "--task-type", "CAUSAL_LM"]) == 0
    assert os.path.isfile(tmp_path / "peft" / "adapter_model.safetensors")
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "ckpt2"),
                 "--base", str(d / "base.safetensors"), "--key-map", "llama"]) == 0
    back, cfg = lj.restore(tmp_path / "ckpt2", params=base)
    assert_trees_close(back, ad, exact=True)
    assert lj.describe(base, cfg).specs.keys() == lj.describe(base, LORA).specs.keys()


def test_orbax_directory_as_base(setup, tmp_path):
    import orbax.checkpoint as ocp
    d, base, ad = setup
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "base_orbax", base)
    ck.wait_until_finished()
    assert main(["merge", str(d / "ckpt"), "--base", str(tmp_path / "base_orbax"),
                 "--out", str(tmp_path / "m.safetensors")]) == 0


def test_errors_are_reported_not_raised(setup, tmp_path, capsys):
    d, base, _ = setup
    assert main(["export-peft", str(d / "ckpt"), str(tmp_path / "p"), "--key-map", "nope"]) == 2
    assert "not a preset" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert main(["merge", str(d / "ckpt"), "--base", str(tmp_path / "b.txt"),
                 "--out", str(tmp_path / "o.npz")]) == 2
    assert "no such params file" in capsys.readouterr().err


def test_params_files_keep_dtypes(tmp_path, rng):
    params = {"p": {"w": jax.random.normal(rng, (4, 3)).astype(jnp.bfloat16),
                    "b": jax.random.normal(rng, (3,))}}
    lj.interop.save_params(tmp_path / "p.safetensors", params)
    back = lj.interop.load_params(tmp_path / "p.safetensors")
    assert back["p/w"].dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(back["p/w"]), np.asarray(params["p"]["w"]))
    with pytest.raises(ValueError, match="can't hold bfloat16.*safetensors"):
        lj.interop.save_params(tmp_path / "p.npz", params)


def _one_line_error(capsys, *wanted):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in wanted:
        assert w in err, (w, err)
    return err


def test_user_errors_are_one_line(setup, tmp_path, capsys):
    import json
    d, base, _ = setup
    peft_dir = tmp_path / "peft"
    assert main(["export-peft", str(d / "ckpt"), str(peft_dir), "--key-map", "llama"]) == 0
    capsys.readouterr()
    cfg_path = peft_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "r"}))
    argv = ["import-peft", str(peft_dir), str(tmp_path / "ck"), "--base",
            str(d / "base.safetensors"), "--key-map", "llama"]
    assert main(argv) == 2
    _one_line_error(capsys, f"{cfg_path}: has no 'r'", "Fix: ")
    cfg_path.write_text("[1, 2]")
    assert main(argv) == 2
    _one_line_error(capsys, "holds a JSON list")
    # merge into a folder that doesn't exist: FileNotFoundError, named and fixed
    missing = tmp_path / "no" / "such"
    assert main(["merge", str(d / "ckpt"), "--base", str(d / "base.safetensors"),
                 "--out", str(missing / "m.npz")]) == 2
    _one_line_error(capsys, f"the folder {missing} does not exist", "mkdir -p")
    # a multi-line message still prints as one line
    assert main(["merge", str(d / "ckpt"), "--base", str(d / "base.safetensors"),
                 "--out", str(tmp_path / "m.txt")]) == 2
    _one_line_error(capsys, "params files end in .safetensors or .npz")


def test_checkpoint_errors_are_one_line(setup, tmp_path, capsys):
    d, base, _ = setup
    assert main(["merge", str(tmp_path), "--base", str(d / "base.safetensors"),
                 "--out", str(tmp_path / "m.npz")]) == 2
    _one_line_error(capsys, str(tmp_path))


def test_save_params_into_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"the folder .*/nope does not exist.*Fix: "
                                                r"create it first"):
        lj.interop.save_params(tmp_path / "nope" / "p.npz", {"w": np.ones(2, np.float32)})


@pytest.mark.subprocess
def test_no_traceback_from_the_command_line(setup, tmp_path):
    d, _, _ = setup
    out = subprocess.run([sys.executable, "-m", "lora_jax", "import-peft", str(tmp_path / "x"),
                          str(tmp_path / "ck"), "--base", str(d / "base.safetensors"),
                          "--key-map", "llama"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'x'}: no adapter_config.json. Fix: point at the folder "
        f"save_pretrained / lj.export_peft wrote (extra adapters are in sub-folders: pass "
        f"adapter_name=)."]
