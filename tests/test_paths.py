"""Paths, target matching, layouts and every resolve error branch."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj
from lora_jax._core.paths import leaves_with_paths, path_str, resolve


def test_path_str_kinds():
    tree = {"a": [1.0, (2.0, {"b": 3.0})]}
    assert [p for p, _ in leaves_with_paths(tree)] == ["a/0", "a/1/0", "a/1/1/b"]


def test_path_str_nnx_state_matches_pure_dict():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 4, rngs=rngs)
            self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs)])

    _, state = nnx.split(M(nnx.Rngs(0)))
    got = [p for p, _ in leaves_with_paths(state)]
    assert got == [p for p, _ in leaves_with_paths(nnx.to_pure_dict(state))]
    assert "layers/0/kernel" in got


def test_path_str_attr_keys():
    from typing import NamedTuple

    class P(NamedTuple):
        w: object
        value: object

    kp = jax.tree_util.tree_flatten_with_path(P(1.0, 2.0))[0]
    # A NamedTuple field called "value" at the root is kept (only a trailing
    # Variable .value under another key is dropped).
    assert [path_str(p) for p, _ in kp] == ["w", "value"]


def _params():
    k = jax.random.key(0)
    return {
        "params": {
            "block_0": {"q": {"kernel": jax.random.normal(k, (16, 8)), "bias": jnp.ones(8)},
                        "v": {"kernel": jnp.ones((16, 8))}},
            "head": {"kernel": jnp.ones((8, 3))},
            "steps": jnp.zeros((), jnp.int32),
        }
    }


def test_regex_tuple_callable_exclude():
    p = _params()
    by_regex = resolve(p, lj.LoraConfig(targets=r".*/(q|v)/kernel"))
    assert list(by_regex.targets) == ["params/block_0/q/kernel", "params/block_0/v/kernel"]
    by_tuple = resolve(p, lj.LoraConfig(targets=(r".*/q/kernel", r".*/v/kernel")))
    assert list(by_tuple.targets) == list(by_regex.targets)
    by_fn = resolve(p, lj.LoraConfig(targets=lambda path, x: path.endswith("q/kernel")))
    assert list(by_fn.targets) == ["params/block_0/q/kernel"]
    excl = resolve(p, lj.LoraConfig(targets=r".*/kernel", exclude=r".*/head/.*"))
    assert "params/head/kernel" not in excl.targets
    # fullmatch: a bare name does not match a longer path
    with pytest.raises(ValueError, match="matched no leaf"):
        resolve(p, lj.LoraConfig(targets="q"))


def test_no_match_lists_real_paths():
    with pytest.raises(ValueError) as e:
        resolve(_params(), lj.LoraConfig(targets=r".*/query/kernel"))
    msg = str(e.value)
    assert "params/block_0/q/kernel" in msg and "Fix:" in msg


def test_pattern_matching_nothing_warns_when_others_match():
    with pytest.warns(lj.LoraWarning, match=r"'\.\*/nope' matched no leaf"):
        resolve(_params(), lj.LoraConfig(targets=(r".*/q/kernel", r".*/nope")))


def test_unfactorizable_leaves():
    p = _params()
    with pytest.raises(ValueError, match=r"params/block_0/q/bias: can't factorize a 1-D leaf"):
        resolve(p, lj.LoraConfig(targets=r".*/q/.*"))
    with pytest.raises(ValueError, match=r"params/steps: can't adapt a int32 leaf"):
        resolve(p, lj.LoraConfig(targets=r"params/steps"))


def test_non_array_target():
    with pytest.raises(ValueError, match=r"meta: LoraConfig.targets matched a str"):
        resolve({"meta": "hello", "w": jnp.ones((2, 2))}, lj.LoraConfig(targets=".*"))


def test_rank_too_large_names_path_and_dims():
    with pytest.raises(ValueError, match=r"params/head/kernel: rank 8 exceeds min\(in, out\) = min\(8, 3\)"):
        resolve(_params(), lj.LoraConfig(targets=r".*/head/kernel", rank=8))
    ok = resolve(_params(), lj.LoraConfig(targets=r".*/head/kernel", rank=8,
                                          rank_pattern={r".*/head/.*": 3}))
    assert ok.targets["params/head/kernel"].rank == 3


def test_layouts_default_and_override():
    p = {"q": jnp.ones((32, 4, 8)), "o": jnp.ones((4, 8, 32)), "stack": jnp.ones((3, 32, 16)),
         "conv": jnp.ones((3, 3, 4, 8))}
    cfg = lj.LoraConfig(targets=".*", rank=2, layouts={"q": lj.Layout(0, 1, 2),
                                                       "stack": (1, 1, 1)})
    t = resolve(p, cfg).targets
    assert (t["q"].a_shape, t["q"].b_shape) == ((32, 2), (2, 32))
    assert (t["o"].a_shape, t["o"].b_shape) == ((32, 2), (2, 32))          # default (*in, out)
    assert (t["stack"].a_shape, t["stack"].b_shape) == ((3, 32, 2), (3, 2, 16))
    assert (t["conv"].a_shape, t["conv"].b_shape) == ((36, 2), (2, 8))      # (*spatial, in) flattened
    assert t["stack"].stacked_shape == (3,)


def test_layout_rank_mismatch():
    with pytest.raises(ValueError, match=r"q: layout \(0, 1, 1\) .* covers 2 axes but the leaf has shape \(32, 4, 8\)"):
        resolve({"q": jnp.ones((32, 4, 8))}, lj.LoraConfig(targets="q", layouts={"q": (0, 1, 1)}))


def test_train_leaves():
    r = resolve(_params(), lj.LoraConfig(targets=r".*/q/kernel", train=r".*/head/.*"))
    assert r.train == ("params/head/kernel",)
    with pytest.raises(ValueError, match=r"params/block_0/q/kernel: matched by both"):
        resolve(_params(), lj.LoraConfig(targets=r".*/q/kernel", train=r".*/kernel"))
    with pytest.raises(ValueError, match=r"LoraConfig.train: '\.\*nohead\.\*' matched no leaf"):
        resolve(_params(), lj.LoraConfig(targets=r".*/q/kernel", train=r".*nohead.*"))


def test_abstract_params_resolve_without_allocation():
    abstract = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)}
    spec = resolve(abstract, lj.LoraConfig(targets="w")).targets["w"]
    assert spec.n_adapter_params == 65_536
    assert spec.dtype == np.dtype(jnp.bfloat16)


def test_no_warning_on_plain_match():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve(_params(), lj.LoraConfig(targets=r".*/q/kernel"))


def test_resolve_rejects_non_config():
    with pytest.raises(TypeError, match="expected a lj.LoraConfig"):
        resolve(_params(), {"rank": 8})
