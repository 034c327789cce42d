"""LoraConfig: validation (every error branch), hashing, per-path resolution."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj


def test_defaults_and_scale():
    c = lj.LoraConfig(targets=r".*/kernel")
    assert (c.rank, c.alpha, c.dropout, c.init, c.use_rslora) == (8, 8.0, 0.0, "kaiming", False)
    assert c.dtype == np.dtype("float32")
    assert c.targets == (r".*/kernel",)
    assert c.scale_for("x/kernel") == 1.0


def test_rslora_scale():
    c = lj.LoraConfig(targets="w", rank=16, alpha=8, use_rslora=True)
    assert c.scale_for("w") == pytest.approx(8 / math.sqrt(16))


def test_patterns_first_match_wins():
    c = lj.LoraConfig(targets=".*", rank=8, alpha=16,
                      rank_pattern={r".*/fc2/.*": 4, r".*/fc.*": 2},
                      alpha_pattern={r".*/fc2/.*": 8})
    assert c.rank_for("b/fc2/kernel") == 4
    assert c.rank_for("b/fc1/kernel") == 2
    assert c.rank_for("b/q/kernel") == 8
    assert c.scale_for("b/fc2/kernel") == 2.0
    assert c.scale_for("b/fc1/kernel") == 8.0
    assert c.scale_for("b/q/kernel") == 2.0


def test_frozen_keyword_only_hashable():
    c = lj.LoraConfig(targets="w", rank_pattern={"w": 2}, layouts={"w": (0, 1, 1)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.rank = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        lj.LoraConfig(8)  # type: ignore[misc]
    assert hash(c) == hash(lj.LoraConfig(targets="w", rank_pattern={"w": 2},
                                         layouts={"w": (0, 1, 1)}))
    assert {c: 1}[c] == 1


def test_usable_as_static_jit_argument():
    c1 = lj.LoraConfig(targets="w", rank=4, alpha=4)
    f = jax.jit(lambda x, cfg: x * cfg.scale_for("w"), static_argnums=1)
    assert float(f(jnp.float32(2), c1)) == 2.0
    assert float(f(jnp.float32(2), c1.replace(alpha=8))) == 4.0


def test_round_trip_dict():
    c = lj.LoraConfig(targets=(r".*/q/kernel", r".*/v/kernel"), exclude=r".*block_0.*",
                      rank=4, alpha=3.5, rank_pattern={r".*/v/.*": 2},
                      alpha_pattern={r".*/q/.*": 7.0}, dropout=0.1, init="gaussian",
                      use_rslora=True, dtype=jnp.bfloat16, train=r".*/head/.*",
                      layouts={r".*/q/kernel": lj.Layout(0, 1, 2)})
    d = c.to_dict()
    import json
    assert lj.LoraConfig.from_dict(json.loads(json.dumps(d))) == c


def test_to_dict_rejects_callables():
    c = lj.LoraConfig(targets=lambda p, x: True)
    with pytest.raises(ValueError, match="targets.*callable"):
        c.to_dict()


def test_from_dict_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown fields \['future'\]"):
        lj.LoraConfig.from_dict({"targets": ["w"], "future": 1})


@pytest.mark.parametrize("kw, match", [
    ({"targets": None}, r"LoraConfig.targets: None is invalid: it is required"),
    ({"targets": ()}, r"LoraConfig.targets: \(\) is invalid: it is empty"),
    ({"targets": "(["}, r"LoraConfig.targets: '\(\[' is invalid: not a valid regex"),
    ({"targets": ("w", 3)}, r"element 3 is a int"),
    ({"targets": "w", "rank": 0}, r"LoraConfig.rank: 0 is invalid: the rank must be a positive int"),
    ({"targets": "w", "rank": -2}, r"LoraConfig.rank: -2"),
    ({"targets": "w", "rank": 2.0}, r"LoraConfig.rank: 2.0"),
    ({"targets": "w", "rank": True}, r"LoraConfig.rank: True"),
    ({"targets": "w", "alpha": 0}, r"LoraConfig.alpha: 0 is invalid"),
    ({"targets": "w", "alpha": float("nan")}, r"LoraConfig.alpha: nan is invalid"),
    ({"targets": "w", "alpha": float("inf")}, r"LoraConfig.alpha: inf"),
    ({"targets": "w", "alpha": "16"}, r"LoraConfig.alpha: '16'"),
    ({"targets": "w", "dropout": 1.0}, r"LoraConfig.dropout: 1.0 is invalid: dropout must be in \[0, 1\)"),
    ({"targets": "w", "dropout": -0.1}, r"LoraConfig.dropout: -0.1"),
    ({"targets": "w", "init": "xavier"}, r"LoraConfig.init: 'xavier' is invalid: known inits"),
    ({"targets": "w", "use_rslora": 1}, r"LoraConfig.use_rslora: 1 is invalid"),
    ({"targets": "w", "dtype": "int32"}, r"LoraConfig.dtype: 'int32' is invalid: adapters must be floating"),
    ({"targets": "w", "dtype": "notadtype"}, r"LoraConfig.dtype: 'notadtype' is invalid: not a dtype"),
    ({"targets": "w", "rank_pattern": {"w": 0}}, r"LoraConfig.rank_pattern\['w'\]: 0 is invalid"),
    ({"targets": "w", "rank_pattern": {"([": 2}}, r"LoraConfig.rank_pattern: '\(\[' is invalid: not a valid regex"),
    ({"targets": "w", "rank_pattern": {3: 2}}, r"key 3 is not a str"),
    ({"targets": "w", "rank_pattern": [("w",)]}, r"is not a \(regex, value\) pair"),
    ({"targets": "w", "alpha_pattern": {"w": -1}}, r"LoraConfig.alpha_pattern\['w'\]: -1 is invalid"),
    ({"targets": "w", "layouts": {"w": (0, 1)}}, r"a layout is \(n_stacked, n_in, n_out\[, order\]\)"),
    ({"targets": "w", "layouts": {"w": (0, 0, 1)}}, r"n_in=0 must be an int >= 1"),
    ({"targets": "w", "layouts": {"w": (-1, 1, 1)}}, r"n_stacked=-1 must be an int >= 0"),
    ({"targets": "w", "train": ("(",)}, r"LoraConfig.train: '\(' is invalid"),
    ({"targets": "w", "exclude": (1,)}, r"LoraConfig.exclude: \(1,\) is invalid"),
])
def test_validation_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        lj.LoraConfig(**kw)


@pytest.mark.parametrize("kw", [{"targets": 3}, {"targets": "w", "rank_pattern": 5}])
def test_type_errors(kw):
    with pytest.raises(TypeError, match="LoraConfig"):
        lj.LoraConfig(**kw)


def test_replace_revalidates():
    c = lj.LoraConfig(targets="w")
    with pytest.raises(ValueError, match="rank"):
        c.replace(rank=0)
