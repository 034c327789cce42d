"""LoRA+ (``lj.optimizer(tx, b_lr_ratio=λ)``): B learns at λ times A's rate.

Checked against PEFT's ``create_loraplus_optimizer`` (torch AdamW with weight
decay, same model, same factors, same data, both in float64: factors equal
<= 1e-12 relative after several steps (measured ~1e-15); in float32 Adam's normalisation amplifies
the last-bit differences of near-zero gradients to ~1e-5), and exactly for
SGD on every adapter kind (LoRA, DoRA's magnitude, stacked layers,
fully-trained leaves, frozen scales).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from tests._asserts import rel_err64
from tests.conftest import SEED

D_IN, D_H, D_OUT, RANK, ALPHA = 16, 24, 8, 4, 8


def _gen(k=0):
    return np.random.default_rng(SEED + k)


@pytest.mark.torch
@pytest.mark.standard_promotion   # optax's adamw
def test_matches_peft_loraplus_adamw():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    gen = _gen(1)
    ratio, lr, wd, steps = 8.0, 1e-2, 0.05, 6
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(D_IN, D_H), torch.nn.Tanh(),
                               torch.nn.Linear(D_H, D_OUT)).double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                      target_modules=["0", "2"]))
    # Non-zero B on both sides, so A's gradient is not zero at the first step.
    factors = {}
    for name in ("0", "2"):
        layer = model.base_model.model[int(name)]
        a = gen.standard_normal(tuple(layer.lora_A["default"].weight.shape)) * 0.3
        b = gen.standard_normal(tuple(layer.lora_B["default"].weight.shape)) * 0.3
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.tensor(a))
            layer.lora_B["default"].weight.copy_(torch.tensor(b))
        factors[name] = (a, b)
    x, y = gen.standard_normal((32, D_IN)), gen.standard_normal((32, D_OUT))

    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                    loraplus_weight_decay=wd)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.mean((model(torch.tensor(x)) - torch.tensor(y)) ** 2)
        loss.backward()
        opt.step()

    with jax.enable_x64(True):
        params = {f"l{n}": {"kernel": jnp.asarray(base[int(n)].weight.detach().numpy().T),
                            "bias": jnp.asarray(base[int(n)].bias.detach().numpy())}
                  for n in ("0", "2")}
        ad = {f"l{n}": {"kernel": lj.LoraWeights(jnp.asarray(a.T, jnp.float64),
                                                 jnp.asarray(b.T, jnp.float64),
                                                 jnp.float64(ALPHA / RANK)), "bias": None}
              for n, (a, b) in factors.items()}
        cfg = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=r".*/kernel")

        def fn(p, x):
            h = jnp.tanh(x @ p["l0"]["kernel"] + p["l0"]["bias"])
            return h @ p["l2"]["kernel"] + p["l2"]["bias"]

        fwd = lj.apply(fn, cfg)

        def train(b_lr_ratio):
            tx = lj.optimizer(optax.adamw(lr, weight_decay=wd), b_lr_ratio=b_lr_ratio)
            step = lj.make_train_step(lambda p, a, x, y: jnp.mean((fwd(p, a, x) - y) ** 2), tx,
                                      donate=False)
            a, state = ad, tx.init(ad)
            for _ in range(steps):
                a, state, _ = step(params, a, state, jnp.asarray(x), jnp.asarray(y))
            return a

        plus, plain = train(ratio), train(1.0)
        for n in ("0", "2"):
            layer = model.base_model.model[int(n)]
            want_a = layer.lora_A["default"].weight.detach().numpy().T
            want_b = layer.lora_B["default"].weight.detach().numpy().T
            got = plus[f"l{n}"]["kernel"]
            assert rel_err64(got.a, want_a) <= 1e-12, n
            assert rel_err64(got.b, want_b) <= 1e-12, n
            # ... and the ratio mattered: plain AdamW's B is far from PEFT's LoRA+ B.
            assert rel_err64(plain[f"l{n}"]["kernel"].b, want_b) > 1e-3, n


def _adapters(gen):
    params = {"q": {"kernel": jnp.asarray(gen.standard_normal((12, 10)), jnp.float32)},
              "layers": {"kernel": jnp.asarray(gen.standard_normal((3, 8, 6)), jnp.float32)},
              "head": {"bias": jnp.asarray(gen.standard_normal(6), jnp.float32)}}
    cfg = lj.LoraConfig(rank=2, alpha=4, targets=r".*/kernel", use_dora=True,
                        layouts={"layers/kernel": lj.Layout(1, 1, 1)}, train=r"head/bias")
    ad = lj.init(params, cfg, key=jax.random.key(SEED))
    return params, cfg, ad


@pytest.mark.parametrize("ratio", [1.0, 16.0])
def test_sgd_update_is_ratio_times_lr_for_b_and_magnitude(ratio):
    gen = _gen(2)
    _, _, ad = _adapters(gen)
    grads = jax.tree.map(lambda x: jnp.asarray(gen.standard_normal(np.shape(x)), x.dtype), ad)
    lr = 0.05
    tx = lj.optimizer(optax.sgd(lr), b_lr_ratio=ratio)
    updates, _ = tx.update(grads, tx.init(ad), ad)
    for path in ("q", "layers"):
        u, g = updates[path]["kernel"], grads[path]["kernel"]
        np.testing.assert_allclose(u.a, -lr * g.a, rtol=1e-6)
        np.testing.assert_allclose(u.b, -lr * ratio * g.b, rtol=1e-6)
        np.testing.assert_allclose(u.m, -lr * ratio * g.m, rtol=1e-6)   # as PEFT: 1-D params
        assert float(jnp.max(jnp.abs(u.scale))) == 0.0                   # frozen
    np.testing.assert_allclose(updates["head"]["bias"], -lr * grads["head"]["bias"], rtol=1e-6)


@pytest.mark.standard_promotion   # optax's adam
def test_state_is_the_same_as_without_loraplus():
    _, _, ad = _adapters(_gen(3))
    plain, plus = lj.optimizer(optax.adam(1e-3)), lj.optimizer(optax.adam(1e-3), b_lr_ratio=4)
    s0, s1 = plain.init(ad), plus.init(ad)
    assert jax.tree.structure(s0) == jax.tree.structure(s1)
    assert [np.shape(x) for x in jax.tree.leaves(s0)] == [np.shape(x) for x in jax.tree.leaves(s1)]


@pytest.mark.parametrize("bad", [0, -2.0, float("nan"), float("inf"), True, "16", None])
def test_bad_ratio_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"lj.optimizer: b_lr_ratio=.* must be a positive number"
                       r"[\s\S]*Fix: e.g. b_lr_ratio=16.0"):
        lj.optimizer(optax.sgd(0.1), b_lr_ratio=bad)
