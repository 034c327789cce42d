"""Adapter sets of DoRA adapters: select, mixed batches, training many at once, checkpoints.

The reference is each DoRA adapter alone (`lj.apply` with its own config):
every example of a mixed batch equals its adapter's output alone <= 1e-5
(and a ``"__base__"`` example the base model's), and one mixed training step
equals one single-adapter step per adapter on its examples <= 1e-5 on a, b
and the magnitudes m. What has no exact meaning for DoRA (weighted sums of
adapters) is refused.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from tests._asserts import rel_err
from tests.conftest import SEED
from tests.test_multi_train import D_H, D_IN, D_OUT, T, assert_equals_separate_steps
from tests.test_multi_train import _model as two_layer_model


def _gen(k=0):
    return np.random.default_rng(SEED + 8000 + k)


def _model(gen):
    params, fn, _ = two_layer_model(gen)
    return params, fn


def _dora(params, gen, ranks=(2, 4, 4)):
    """DoRA adapters with non-zero B and magnitudes moved off the column norms."""
    out = {}
    for i, r in enumerate(ranks):
        cfg = lj.LoraConfig(rank=r, alpha=2 * r, targets=r".*/kernel", use_dora=True)
        ad = lj.init(params, cfg, key=jax.random.key(SEED + i))
        ad = jax.tree.map(lambda n: n._replace(
            b=jnp.asarray(gen.standard_normal(n.b.shape) * 0.3, n.b.dtype),
            m=n.m * jnp.asarray(1 + 0.2 * gen.standard_normal(n.m.shape), n.m.dtype))
            if lj.is_lora(n) else n, ad, is_leaf=lj.is_lora)
        out[f"d{i}"] = (ad, cfg)
    return out


@pytest.mark.slow
def test_mixed_batch_of_dora_adapters_equals_each_alone(rng):
    gen = _gen(1)
    params, fn = _model(gen)
    members = _dora(params, gen)
    aset = lj.adapter_set(members)
    assert aset.adapters["l1"]["kernel"].m.shape == (3, D_H)
    for name, (ad, _) in members.items():          # trimmed selection gives it back
        back = lj.select_adapter(aset, name, trim=True)
        for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(ad), strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    x = jnp.asarray(gen.standard_normal((5, T, D_IN)), jnp.float32)
    names = ["d2", "__base__", "d0", "d1", "d2"]
    got = jax.jit(lj.apply_mixed(fn))(params, aset, lj.adapter_ids(aset, names), x)
    for e, name in enumerate(names):
        if name == "__base__":
            want = fn(params, x[e:e + 1])[0]
        else:
            ad, cfg = members[name]
            want = lj.apply(fn, cfg)(params, ad, x[e:e + 1])[0]
            assert rel_err(want, fn(params, x[e:e + 1])[0]) > 1e-3       # the adapter acts
        assert rel_err(got[e], want) <= 1e-5, name


@pytest.mark.slow
@pytest.mark.standard_promotion     # optax's adam
def test_training_dora_adapters_at_once_equals_separate_steps(rng):
    gen = _gen(2)
    params, fn = _model(gen)
    members = _dora(params, gen)
    aset = lj.adapter_set(members)

    def loss(p, x, y):
        return jnp.mean((fn(p, x) - y) ** 2)

    tx = lj.optimizer(optax.sgd(5e-2, momentum=0.9))   # float32 with SGD: see test_multi_train
    step = lj.make_mixed_train_step(loss, tx, donate=False)
    opt = lj.mixed_opt_state(tx, aset)
    batches = []
    for _ in range(3):
        ids = np.concatenate([[0, 1, 2], gen.integers(0, 3, 4)]).astype(np.int32)
        batches.append((ids, gen.standard_normal((7, T, D_IN)).astype(np.float32),
                        gen.standard_normal((7, T, D_OUT)).astype(np.float32)))
    for ids, x, y in batches:
        aset, opt, _ = step(params, aset, opt, jnp.asarray(ids), x, y)
    assert_equals_separate_steps(aset, fn, params, members, tx, batches)


def test_dora_sets_save_restore_and_refuse_what_has_no_exact_meaning(rng, tmp_path):
    gen = _gen(3)
    params, fn = _model(gen)
    members = _dora(params, gen, ranks=(2, 3))
    aset = lj.adapter_set(members)
    lj.save_set(str(tmp_path / "set"), aset, params=params)
    back = lj.restore_set(str(tmp_path / "set"), params=params)
    for u, v in zip(jax.tree.leaves(back.adapters), jax.tree.leaves(aset.adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    with pytest.raises(ValueError, match=r"lj.combine: the set holds DoRA adapters"):
        lj.combine(aset, {"d0": 1.0, "d1": 1.0}, method="cat")
    with pytest.raises(ValueError, match=r"lj.merge_weighted: the set holds DoRA adapters"):
        lj.merge_weighted(params, aset, {"d0": 0.5})
    plain_cfg = lj.LoraConfig(rank=2, targets=r".*/kernel")
    with pytest.raises(ValueError, match=r"adapters \['d0', 'd1'\] are DoRA adapters and "
                       r"\['p'\] are not"):
        lj.adapter_set({**members, "p": (lj.init(params, plain_cfg, key=rng), plain_cfg)})
    only_l1 = lj.LoraConfig(rank=2, targets="l1/kernel", use_dora=True)
    with pytest.raises(ValueError, match=r"l2/kernel: DoRA adapters \['o'\] leave this weight "
                       r"alone while \['d0', 'd1'\] adapt it"):
        lj.adapter_set({**members, "o": (lj.init(params, only_l1, key=rng), only_l1)})
