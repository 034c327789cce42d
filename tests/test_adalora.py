"""AdaLoRA: `lj.adalora_init`, `lj.adalora` (the rank allocator as an optax
transformation), `lj.adalora_view`, `lj.adalora_orthogonality`,
`lj.adalora_to_lora`.

The reference is PEFT's AdaLoRA run in torch: same model, same initial
triplets, same data, same hyperparameters, both in float64. Over a run that
crosses ``tinit``, several ``deltaT`` allocations and ``tfinal``, the pruned
set is identical at every step and the factors agree <= 1e-9 relative
(measured ~1e-15). In float32 the two would also agree to ~1e-5 for a while,
but Adam amplifies last-bit gradient differences of near-zero entries, and a
near-tie in the importance scores could then flip one mask: float64 is the
comparison that holds for every seed.
"""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax._adalora import _budgets
from tests._asserts import CompileCounter, rel_err, rel_err64
from tests.conftest import SEED

D_IN, D_H, D_OUT = 12, 10, 6


def _gen(k=0):
    return np.random.default_rng(SEED + k)


SCHEDULE = dict(target_r=2, total_step=24, tinit=3, tfinal=5, delta_t=2)
INIT_R, PEFT_ALPHA, ORTH, LR = 5, 8.0, 0.5, 2e-2


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.standard_promotion   # optax's adam
def test_matches_peft_adalora_masks_and_factors():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    gen = _gen(1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = torch.nn.Linear(D_IN, D_H)
            self.l2 = torch.nn.Linear(D_H, D_OUT)

        def forward(self, x, y):   # PEFT adds its orthogonal penalty to outputs.loss
            out = self.l2(torch.tanh(self.l1(x)))
            return SimpleNamespace(loss=torch.mean((out - y) ** 2))

    torch.manual_seed(0)
    net = Net().double()
    pcfg = peft.AdaLoraConfig(init_r=INIT_R, lora_alpha=PEFT_ALPHA, target_modules=["l1", "l2"],
                              beta1=0.85, beta2=0.85, orth_reg_weight=ORTH,
                              total_step=SCHEDULE["total_step"], tinit=SCHEDULE["tinit"],
                              tfinal=SCHEDULE["tfinal"], deltaT=SCHEDULE["delta_t"],
                              target_r=SCHEDULE["target_r"])
    model = peft.get_peft_model(net, pcfg).double()
    ada = model.base_model

    with jax.enable_x64(True):
        params = {n: {"kernel": jnp.asarray(getattr(net, n).base_layer.weight.detach().numpy().T),
                      "bias": jnp.asarray(getattr(net, n).bias.detach().numpy())}
                  for n in ("l1", "l2")}
        # PEFT's scale is lora_alpha / (ranknum + 1e-5); lora_jax's alpha / rank.
        cfg = lj.LoraConfig(rank=INIT_R, alpha=PEFT_ALPHA * INIT_R / (INIT_R + 1e-5),
                            targets=r".*/kernel", dtype=jnp.float64)
        ad = lj.adalora_init(params, cfg, key=jax.random.key(SEED))
        # Λ starts at 0 in both; start from non-zero Λ so every factor moves at once.
        # The scale too: lj.init stores it in float32, which alone moves the gradients by
        # ~1e-9, and Adam turns that into ~1e-4 on near-zero entries.
        ad = jax.tree.map(lambda n: n._replace(e=jnp.asarray(gen.standard_normal(INIT_R) * 0.1),
                                               scale=jnp.float64(PEFT_ALPHA / (INIT_R + 1e-5)))
                          if lj.is_adalora(n) else n, ad, is_leaf=lj.is_adalora)
        for n in ("l1", "l2"):
            layer, node = getattr(net, n), ad[n]["kernel"]
            with torch.no_grad():
                layer.lora_A["default"].copy_(torch.tensor(np.asarray(node.a).T))
                layer.lora_E["default"].copy_(torch.tensor(np.asarray(node.e)[:, None]))
                layer.lora_B["default"].copy_(torch.tensor(np.asarray(node.b).T))
        x, y = gen.standard_normal((16, D_IN)), gen.standard_normal((16, D_OUT))

        # PEFT creates ranknum with requires_grad=False, but in peft 0.21 it ends up
        # requiring grad, so an optimizer over every trainable parameter would train
        # this constant too; the reference trains only A, E and B, as PEFT intends.
        opt = torch.optim.Adam([p for n, p in model.named_parameters()
                                if p.requires_grad and "ranknum" not in n], lr=LR)
        peft_masks = []
        for step in range(SCHEDULE["total_step"]):
            ada(torch.tensor(x), torch.tensor(y)).loss.backward()
            opt.step()
            ada.update_and_allocate(step)
            opt.zero_grad()
            peft_masks.append([getattr(net, n).lora_E["default"].detach().numpy()[:, 0] != 0
                               for n in ("l1", "l2")])

        fwd = lj.apply(lambda p, x: (jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
                                     @ p["l2"]["kernel"] + p["l2"]["bias"]), cfg)

        def loss(p, a, x, y):
            return jnp.mean((fwd(p, lj.adalora_view(a), x) - y) ** 2) + \
                ORTH * lj.adalora_orthogonality(a)

        tx = lj.adalora(optax.adam(LR), **SCHEDULE)
        step_fn = lj.make_train_step(loss, tx, donate=False)
        state = tx.init(ad)
        with CompileCounter() as cc:
            for step in range(SCHEDULE["total_step"]):
                if step == 1:
                    compiled = cc.count
                ad, state, _ = step_fn(params, ad, state, jnp.asarray(x), jnp.asarray(y))
                ours = [np.asarray(ad[n]["kernel"].e) != 0 for n in ("l1", "l2")]
                for n, want, got in zip(("l1", "l2"), peft_masks[step], ours, strict=True):
                    np.testing.assert_array_equal(got, want, err_msg=f"{n} after step {step}")
        assert cc.count == compiled     # pruning never changes a shape: no recompile

        pruned = sum(int(np.sum(~m)) for m in peft_masks[-1])
        assert pruned == 2 * INIT_R - 2 * SCHEDULE["target_r"]    # the budget was reached
        final = {k.split(".lora_E")[0]: v for k, v in pcfg.rank_pattern.items()}
        for i, n in enumerate(("l1", "l2")):
            np.testing.assert_array_equal(np.asarray(state.mask[i]), final[n])
            layer, node = getattr(net, n), ad[n]["kernel"]
            assert rel_err64(node.a, layer.lora_A["default"].detach().numpy().T) <= 1e-6, n
            assert rel_err64(node.b, layer.lora_B["default"].detach().numpy().T) <= 1e-6, n
            assert rel_err64(node.e, layer.lora_E["default"].detach().numpy()[:, 0]) <= 1e-6, n


@pytest.mark.torch
@pytest.mark.parametrize("tinit,tfinal,delta_t,total", [(0, 0, 1, 10), (3, 5, 2, 24),
                                                         (10, 20, 7, 100), (1, 1, 3, 9)])
def test_budget_schedule_is_peft_s(tinit, tfinal, delta_t, total):
    pytest.importorskip("torch")
    from peft.tuners.adalora.layer import RankAllocator
    cfg = SimpleNamespace(tinit=tinit, tfinal=tfinal, total_step=total, deltaT=delta_t)
    alloc = SimpleNamespace(peft_config=cfg, init_bgt=48, target_bgt=16)
    budgets, masks = _budgets(48, 16, total, tinit, tfinal, delta_t)
    for step in range(total - tfinal):     # PEFT calls the schedule before total - tfinal
        want_budget, want_mask = RankAllocator.budget_schedule(alloc, step)
        assert (budgets[step], bool(masks[step])) == (want_budget, want_mask), step
    assert budgets[total - tfinal] == 16 and masks[total - tfinal]   # PEFT's forced final mask


def _model(gen, stacked=True):
    params = {"q": {"kernel": jnp.asarray(gen.standard_normal((12, 8)), jnp.float32)},
              "layers": {"kernel": jnp.asarray(gen.standard_normal((3, 8, 8)) / 3, jnp.float32)}}
    layouts = {"layers/kernel": lj.Layout(1, 1, 1)} if stacked else {}

    def fn(p, x):
        h = x @ p["q"]["kernel"]
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["layers"]["kernel"])
        return h

    cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*/kernel", layouts=layouts)
    return params, fn, cfg


def _trained_like(ad, gen, zero=()):
    """Random factors and Λ with some triplets pruned (zero e), never all zero."""
    def fill(node):
        if not lj.is_adalora(node):
            return node
        a, b = (jnp.asarray(gen.standard_normal(x.shape) * 0.3, x.dtype) for x in (node.a, node.b))
        e = gen.standard_normal(node.e.shape) + np.sign(gen.standard_normal(node.e.shape))
        e = e * (gen.random(node.e.shape) > 0.4)
        e.reshape(-1, e.shape[-1])[:, 0] = 1.5        # each layer keeps at least one
        return node._replace(a=a, b=b, e=jnp.asarray(e, node.e.dtype))
    return jax.tree.map(fill, ad, is_leaf=lj.is_adalora)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["float", "nf4"])
def test_view_through_apply_equals_merge_at_the_low_rank_floor(rng, base):
    gen = _gen(2)
    params, fn, cfg = _model(gen)
    if base == "nf4":
        params = lj.quantize(params, targets=r".*/kernel", config=cfg)
    ad = _trained_like(lj.adalora_init(params, cfg, key=rng), gen)
    x = jnp.asarray(gen.standard_normal((4, 12)), jnp.float32)
    view = lj.adalora_view(ad)
    e = lj.explain(fn, cfg, params, view, x)
    assert e.n_fallbacks == 0, str(e)
    got = jax.jit(lj.apply(fn, cfg))(params, view, x)
    dense = lj.dequantize(params) if base == "nf4" else params
    want = fn(lj.merge(dense, view, cfg), x)
    assert rel_err(got, want) <= 1e-5
    # gradients reach a, e and b; a pruned triplet's e still gets one (it may regrow)
    g = jax.grad(lambda a: jnp.sum(lj.apply(fn, cfg)(params, lj.adalora_view(a), x) ** 2))(ad)
    for path in ("q", "layers"):
        node = g[path]["kernel"]
        assert all(float(jnp.max(jnp.abs(v))) > 0 for v in (node.a, node.e, node.b)), path


@pytest.mark.slow
def test_to_lora_is_exact_with_per_layer_ranks(rng):
    gen = _gen(3)
    params, fn, cfg = _model(gen)
    ad = _trained_like(lj.adalora_init(params, cfg, key=rng), gen)
    ranks = lj.adalora_ranks(ad)
    lora, cfg2 = lj.adalora_to_lora(ad, cfg)
    for path in ("q", "layers"):
        node, k = lora[path]["kernel"], int(np.max(ranks[f"{path}/kernel"]))
        assert node.a.shape[-1] == k and cfg2.rank_for(f"{path}/kernel") == k
        assert float(node.scale) == pytest.approx(8 / k)
    # float64 reference: W + scale * sum over kept triplets of e_i a_i b_i^T, layer by layer
    for path in ("q", "layers"):
        n = ad[path]["kernel"]
        a, e, b = (np.asarray(v, np.float64) for v in (n.a, n.e, n.b))
        want = np.asarray(params[path]["kernel"], np.float64) + \
            float(n.scale) * np.einsum("...ir,...r,...ro->...io", a, e, b)
        got = lj.merge(params, lora, cfg2)[path]["kernel"]
        assert rel_err(got, want) <= 1e-6, path
    # ... and the plain LoRA goes through everything else, e.g. a PEFT-style save
    y = lj.apply(fn, cfg2)(params, lora, jnp.asarray(gen.standard_normal((2, 12)), jnp.float32))
    assert bool(jnp.all(jnp.isfinite(y)))


def test_to_lora_leaf_with_nothing_kept_is_a_zero_update(rng):
    gen = _gen(4)
    params, _, cfg = _model(gen, stacked=True)
    ad = _trained_like(lj.adalora_init(params, cfg, key=rng), gen)
    ad["q"]["kernel"] = ad["q"]["kernel"]._replace(e=jnp.zeros(4))
    lora, cfg2 = lj.adalora_to_lora(ad, cfg)
    assert lora["q"]["kernel"].a.shape == (12, 1) and cfg2.rank_for("q/kernel") == 1
    assert not np.any(np.asarray(lora["q"]["kernel"].a)) and \
        not np.any(np.asarray(lora["q"]["kernel"].b))


def test_orthogonality_against_numpy(rng):
    gen = _gen(5)
    params, _, cfg = _model(gen)
    ad = _trained_like(lj.adalora_init(params, cfg, key=rng), gen)
    terms = []
    for path in ("q", "layers"):
        n = ad[path]["kernel"]
        a = np.asarray(n.a, np.float64).reshape(-1, *n.a.shape[-2:])
        b = np.asarray(n.b, np.float64).reshape(-1, *n.b.shape[-2:])
        for al, bl in zip(a, b, strict=True):
            terms.append(np.linalg.norm(al.T @ al - np.eye(4)))
            terms.append(np.linalg.norm(bl @ bl.T - np.eye(4)))
    assert float(lj.adalora_orthogonality(ad)) == pytest.approx(np.mean(terms), rel=1e-5)


@pytest.mark.slow
@pytest.mark.standard_promotion   # optax's adam
def test_stacked_layers_prune_per_layer_without_recompiling(rng):
    gen = _gen(6)
    params, fn, cfg = _model(gen)
    ad = lj.adalora_init(params, cfg, key=rng)
    x = jnp.asarray(gen.standard_normal((8, 12)), jnp.float32)
    y = jnp.asarray(gen.standard_normal((8, 8)), jnp.float32)
    fwd = lj.apply(fn, cfg)
    tx = lj.adalora(optax.adam(1e-2), target_r=2, total_step=12, tinit=2, tfinal=3, delta_t=2)
    step = lj.make_train_step(lambda p, a, x, y: jnp.mean((fwd(p, lj.adalora_view(a), x) - y)
                                                          ** 2), tx)
    state = tx.init(ad)
    ad, state, _ = step(params, ad, state, x, y)
    with CompileCounter() as cc:
        for _ in range(11):
            ad, state, _ = step(params, ad, state, x, y)
    assert cc.count == 0
    ranks = lj.adalora_ranks(ad)
    assert ranks["layers/kernel"].shape == (3,)
    # 4 matrices (q + 3 stacked layers), budget 2 each: 8 of the 16 triplets kept
    assert int(np.sum(ranks["q/kernel"])) + int(np.sum(ranks["layers/kernel"])) == 8
    masks = {p: np.asarray(m) for p, m in zip(("layers/kernel", "q/kernel"), state.mask)}
    assert masks["layers/kernel"].shape == (3, 4)
    assert int(sum(m.sum() for m in masks.values())) == 8
    # the optimizer state holds nothing for the frozen scales
    assert state.inner is not None and int(state.count) == 12


def test_labels_freeze_only_the_scale(rng):
    params, _, cfg = _model(_gen(7))
    labels = lj.trainable_labels(lj.adalora_init(params, cfg, key=rng))
    assert labels["q"]["kernel"] == lj.AdaLoraWeights("train", "train", "train", "frozen")


_SETTINGS = dict(target_r=2, total_step=10)


@pytest.mark.parametrize("kw,match", [
    (dict(target_r=0), r"target_r=0 must be an int >= 1"),
    (dict(target_r=2.5), r"target_r=2.5 must be an int >= 1"),
    (dict(total_step=0), r"total_step=0 must be an int >= 1"),
    (dict(tinit=-1), r"tinit=-1 must be an int >= 0"),
    (dict(delta_t=0), r"delta_t=0 must be an int >= 1"),
    (dict(tinit=6, tfinal=4), r"tinit=6 leaves no budgeting phase"),
    (dict(beta1=1.0), r"beta1=1.0 must be in \(0, 1\)"),
    (dict(beta2=True), r"beta2=True must be in \(0, 1\)"),
])
def test_bad_settings_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=r"lj.adalora: " + match):
        lj.adalora(optax.sgd(0.1), **{**_SETTINGS, **kw})


def test_misuse_is_a_clear_error(rng):
    params, _, cfg = _model(_gen(8))
    with pytest.raises(ValueError, match=r"AdaLoRA with DoRA"):
        lj.adalora_init(params, lj.LoraConfig(rank=4, targets=r".*/kernel", use_dora=True,
                                              layouts=cfg.layouts), key=rng)
    with pytest.raises(ValueError, match=r"init='pissa' moves the base"):
        lj.adalora_init(params, lj.LoraConfig(rank=4, targets=r".*/kernel", init="pissa",
                                              layouts=cfg.layouts), key=rng)
    lora = lj.init(params, cfg, key=rng)
    tx = lj.adalora(optax.sgd(0.1), **_SETTINGS)
    with pytest.raises(ValueError, match=r"'layers/kernel' holds LoraWeights, not AdaLoraWeights"):
        tx.init(lora)
    with pytest.raises(ValueError, match=r"holds LoraWeights, not AdaLoraWeights"):
        lj.adalora_to_lora(lora, cfg)
    with pytest.raises(ValueError, match=r"holds no AdaLoraWeights"):
        lj.adalora_orthogonality({"w": None})
    ad = lj.adalora_init(params, cfg, key=rng)
    big = lj.adalora(optax.sgd(0.1), target_r=5, total_step=10)
    with pytest.raises(ValueError, match=r"target_r=5 asks for 20 triplets but the adapters "
                       r"start with 16"):
        big.update(jax.tree.map(jnp.zeros_like, ad), big.init(ad), ad)
    with pytest.raises(ValueError, match=r"the update needs the current adapters"):
        tx.update(jax.tree.map(jnp.zeros_like, ad), tx.init(ad))


@pytest.mark.parametrize("entry", ["apply", "merge", "summary", "export_peft"])
def test_lora_entry_points_refuse_adalora_trees_with_the_fix(rng, tmp_path, entry):
    params, fn, cfg = _model(_gen(9))
    ad = lj.adalora_init(params, cfg, key=rng)
    x = jnp.ones((2, 12), jnp.float32)
    call = {"apply": lambda: lj.apply(fn, cfg)(params, ad, x),
            "merge": lambda: lj.merge(params, ad, cfg),
            "summary": lambda: lj.summary(params, ad),
            "export_peft": lambda: lj.export_peft(str(tmp_path / "pe"), ad, cfg,
                                                  key_map={".*": "{path}"},
                                                  params=params)}[entry]
    with pytest.raises(ValueError, match=r"(layers|q)/kernel: the adapters hold AdaLoraWeights"
                       r"[\s\S]*Fix: pass lj.adalora_view\(adapters\)[\s\S]*adalora_to_lora"):
        call()


def _leaves_equal(x, y) -> None:
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.slow
@pytest.mark.parametrize("base", ["float", "nf4"])
def test_save_restore_keeps_every_triplet_and_mask(rng, tmp_path, base):
    gen = _gen(10)
    params, _, cfg = _model(gen)
    if base == "nf4":
        params = lj.quantize(params, targets=r".*/kernel", config=cfg)
    ad = _trained_like(lj.adalora_init(params, cfg, key=rng), gen)
    lj.save(str(tmp_path / "ck"), ad, cfg, params=params)
    for kw in (dict(params=params), dict(like=ad), {}):
        got, got_cfg = lj.restore(str(tmp_path / "ck"), **kw)
        if kw:
            _leaves_equal(got, ad)
            assert lj.is_adalora(got["layers"]["kernel"])
        else:   # the flat {path: node} form
            assert set(got) == {"q/kernel", "layers/kernel"}
            _leaves_equal(got["layers/kernel"], ad["layers"]["kernel"])
        assert got_cfg.rank == cfg.rank
    # the pruned triplets are the zero e entries, restored as they were
    assert {p: r.tolist() for p, r in lj.adalora_ranks(got).items()} == \
        {p: r.tolist() for p, r in lj.adalora_ranks(
            {"q/kernel": ad["q"]["kernel"], "layers/kernel": ad["layers"]["kernel"]}).items()}
    info = lj.checkpoint_info(str(tmp_path / "ck"))
    assert info.format_version == 2
    assert {r[0]: r[1] for r in info.rows} == {"q/kernel": "adalora", "layers/kernel": "adalora"}
    assert "adalora" in str(info)
    # a LoRA checkpoint keeps format version 1 (lora_jax 0.2 reads it)
    lj.save(str(tmp_path / "plain"), lj.init(params, cfg, key=rng), cfg)
    assert lj.checkpoint_info(str(tmp_path / "plain")).format_version == 1


def test_restore_into_the_wrong_kind_is_a_clear_error(rng, tmp_path):
    gen = _gen(11)
    params, _, cfg = _model(gen)
    ad = _trained_like(lj.adalora_init(params, cfg, key=rng), gen)
    lj.save(str(tmp_path / "ck"), ad, cfg)
    with pytest.raises(lj.CheckpointError, match=r"layers/kernel was saved as AdaLoraWeights "
                       r"but the target holds LoraWeights"):
        lj.restore(str(tmp_path / "ck"), like=lj.init(params, cfg, key=rng))
    bad = dict(ad, q={"kernel": ad["q"]["kernel"]._replace(e=ad["q"]["kernel"].e[:2])})
    with pytest.raises(ValueError, match=r"q/kernel: AdaLoraWeights with a \(12, 4\) and e "
                       r"\(2,\): e must be \(\*stacked, rank\)"):
        lj.save(str(tmp_path / "bad"), bad, cfg, params=params)


@pytest.mark.slow
@pytest.mark.standard_promotion   # optax's adam
def test_checkpointer_resume_equals_the_uninterrupted_run(rng, tmp_path):
    """AdaLoRA's state (EMAs, masks, the step count, Adam's moments) goes through
    lj.Checkpointer; a run stopped after tinit and resumed makes the same masks and
    the same factors as the run that never stopped."""
    gen = _gen(12)
    params, fn, cfg = _model(gen)
    ad0 = lj.adalora_init(params, cfg, key=rng)
    ad0 = jax.tree.map(lambda n: n._replace(e=jnp.full_like(n.e, 0.5)) if lj.is_adalora(n)
                       else n, ad0, is_leaf=lj.is_adalora)
    x = jnp.asarray(gen.standard_normal((8, 12)), jnp.float32)
    y = jnp.asarray(gen.standard_normal((8, 8)), jnp.float32)
    fwd = lj.apply(fn, cfg)
    tx = lj.adalora(optax.adam(1e-2), target_r=2, total_step=14, tinit=2, tfinal=3, delta_t=2)
    step = jax.jit(lj.make_train_step(
        lambda p, a, x, y: jnp.mean((fwd(p, lj.adalora_view(a), x) - y) ** 2), tx))

    def run(ad, state, n):
        for _ in range(n):
            ad, state, _ = step(params, ad, state, x, y)
        return ad, state

    full_ad, full_state = run(ad0, tx.init(ad0), 12)
    ad, state = run(ad0, tx.init(ad0), 5)          # past tinit: masks already pruned
    with lj.Checkpointer(str(tmp_path / "run")) as ck:
        ck.save(5, ad, cfg, params=params, opt_state=state)
    with lj.Checkpointer(str(tmp_path / "run")) as ck:   # a fresh process would do this
        ts, _ = ck.restore_state(params=params, tx=tx)
    assert ts.step == 5
    _leaves_equal(ts.adapters, ad)
    _leaves_equal(ts.opt_state, state)
    resumed_ad, resumed_state = run(ts.adapters, ts.opt_state, 7)
    for m_full, m_res in zip(full_state.mask, resumed_state.mask, strict=True):
        np.testing.assert_array_equal(np.asarray(m_full), np.asarray(m_res))
    for u, v in zip(jax.tree.leaves(full_ad), jax.tree.leaves(resumed_ad), strict=True):
        assert rel_err(v, u) <= 1e-6
    assert int(resumed_state.count) == 12
