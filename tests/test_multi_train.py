"""Many adapters trained in one step: `lj.make_mixed_train_step`, `lj.mixed_opt_state`.

The reference is one `lj.make_train_step` step per adapter on its own
sub-batch, with its own learning rate (``lr * lr_scale[i]``) and its own Adam
state; an adapter with no example in a batch does not step. Compared on the
updated factors, <= 1e-5 relative (float32), after several steps in which
the assignment of examples to adapters changes (and never recompiles).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from tests._asserts import CompileCounter, rel_err
from tests.conftest import SEED

D_IN, D_H, D_OUT, T = 8, 12, 10, 3
RANKS = {"r2": 2, "r4": 4, "r8": 8}
LR = 3e-2


def _gen(k=0):
    return np.random.default_rng(SEED + 4000 + k)


def _model(gen):
    params = {"l1": {"kernel": jnp.asarray(gen.standard_normal((D_IN, D_H)) * 0.4, jnp.float32)},
              "l2": {"kernel": jnp.asarray(gen.standard_normal((D_H, D_OUT)) * 0.4,
                                           jnp.float32)}}

    def fn(p, x):
        return jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]

    def loss(p, x, y):                    # one example (1, T, D_IN), or a sub-batch
        return jnp.mean((fn(p, x) - y) ** 2)

    return params, fn, loss


def _members(params, gen, dtype=jnp.float32):
    """Adapters of ranks 2, 4, 8 with non-zero B (each learns from the first step)."""
    out = {}
    for i, (name, r) in enumerate(RANKS.items()):
        cfg = lj.LoraConfig(rank=r, alpha=2 * r, targets=r".*/kernel", dtype=dtype)
        ad = lj.init(params, cfg, key=jax.random.key(SEED + i))
        ad = jax.tree.map(lambda n: n._replace(b=jnp.asarray(
            gen.standard_normal(n.b.shape) * 0.2, n.b.dtype)) if lj.is_lora(n) else n,
            ad, is_leaf=lj.is_lora)
        out[name] = (ad, cfg)
    return out


def _batches(gen, n_steps, n_ex=7):
    """Per step: ids (one adapter absent in step 1, a base example in step 2), x, y."""
    out = []
    for s in range(n_steps):
        ids = gen.integers(0, 3, n_ex)
        if s == 1:
            ids[ids == 2] = 0                 # r8 has no example: it must not step
        if s == 2:
            ids[0] = -1                       # a base example trains nothing
        ids[1:4] = (0, 1, 2) if s != 1 else (0, 1, 1)
        x = gen.standard_normal((n_ex, T, D_IN)).astype(np.float32)
        y = gen.standard_normal((n_ex, T, D_OUT)).astype(np.float32)
        out.append((ids, x, y))
    return out


# Adam normalizes each update by the gradient's own size, so a last-bit difference in a
# near-zero gradient entry (the mixed step sums per-example gradients in another order than
# a sub-batch mean) becomes a visible one within a step or two: float32 holds <= 1e-5 for
# every seed with SGD (updates linear in the gradient), Adam is compared in float64.
_PRECISIONS = {"f32-sgd": (jnp.float32, lambda lr: optax.sgd(lr, momentum=0.9), 1e-5),
               "f64-adam": (jnp.float64, optax.adam, 1e-9)}


@pytest.mark.slow
@pytest.mark.standard_promotion          # optax's adam
@pytest.mark.parametrize("precision", list(_PRECISIONS))
def test_one_step_equals_a_separate_step_per_adapter_on_its_examples(rng, precision):
    dtype, opt_of, tol = _PRECISIONS[precision]
    with jax.enable_x64(dtype == jnp.float64):
        _one_step_equals_separate_steps(dtype, opt_of, tol)


def _one_step_equals_separate_steps(dtype, opt_of, tol):
    gen = _gen(1)
    params, fn, loss = _model(gen)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    members = _members(params, gen, dtype)
    aset = lj.adapter_set(members)
    lr_scale = np.array([1.0, 0.5, 2.0], np.float32)
    sched = optax.linear_schedule(LR, LR / 4, 4)
    tx = lj.optimizer(opt_of(sched))
    step = lj.make_mixed_train_step(loss, tx, donate=False)
    opt = lj.mixed_opt_state(tx, aset)
    batches = [(ids, x.astype(dtype), y.astype(dtype)) for ids, x, y in _batches(gen, 4)]

    # the reference: one single-adapter run per member, stepping only on its examples
    ref = {}
    for i, (name, (ad, cfg)) in enumerate(members.items()):
        tx_i = lj.optimizer(opt_of(lambda c, i=i: sched(c) * float(lr_scale[i])))
        f = lj.apply(fn, cfg)
        step_i = lj.make_train_step(lambda p, a, x, y, f=f: jnp.mean((f(p, a, x) - y) ** 2),
                                    tx_i, donate=False)
        state_i, losses_i = tx_i.init(ad), []
        for ids, x, y in batches:
            mine = ids == i
            if mine.any():
                ad, state_i, l_i = step_i(params, ad, state_i, x[mine], y[mine])
                losses_i.append(float(l_i))
            else:
                losses_i.append(np.nan)
        ref[name] = (ad, losses_i)

    got_losses, scale = [], jnp.asarray(lr_scale)
    ids_all = [jnp.asarray(ids, jnp.int32) for ids, _, _ in batches]
    with CompileCounter() as cc:
        for k, (ids, (_, x, y)) in enumerate(zip(ids_all, batches, strict=True)):
            aset, opt, losses = step(params, aset, opt, ids, x, y, lr_scale=scale)
            got_losses.append(np.asarray(losses))
            if k == 0:
                first = cc.count
    assert cc.count == first      # only the first step compiles, whatever the assignment
    for i, (name, (want, want_losses)) in enumerate(ref.items()):
        got = lj.select_adapter(aset, name, trim=True)
        for path in ("l1", "l2"):
            node, ref_node = got[path]["kernel"], want[path]["kernel"]
            assert node.a.dtype == dtype
            assert rel_err(node.a, ref_node.a) <= tol, (name, path)
            assert rel_err(node.b, ref_node.b) <= tol, (name, path)
        np.testing.assert_allclose([g[i] for g in got_losses], want_losses, rtol=max(tol, 1e-6))
    # r8 sat out step 1: its loss is NaN there and its step count is 3 of 4 steps
    assert np.isnan(got_losses[1][2])
    counts = [x for x in jax.tree.leaves(opt) if x.shape == (3,) and x.dtype == jnp.int32]
    assert counts and all(c.tolist() == [4, 4, 3] for c in counts)


@pytest.mark.standard_promotion
def test_assignments_change_without_recompiling_and_base_examples_train_nothing(rng):
    gen = _gen(2)
    params, _, loss = _model(gen)
    aset = lj.adapter_set(_members(params, gen))
    tx = lj.optimizer(optax.adam(LR))
    step = lj.make_mixed_train_step(loss, tx)
    opt = lj.mixed_opt_state(tx, aset)
    x = jnp.asarray(gen.standard_normal((6, T, D_IN)), jnp.float32)
    y = jnp.asarray(gen.standard_normal((6, T, D_OUT)), jnp.float32)
    aset, opt, _ = step(params, aset, opt, jnp.zeros((6,), jnp.int32), x, y)
    before = jax.tree.map(np.asarray, (aset.adapters, opt))
    all_base = jnp.asarray(np.full((6,), -1, np.int32))
    later = [jnp.asarray(gen.integers(-1, 3, 6), jnp.int32) for _ in range(3)]
    with CompileCounter() as cc:
        aset, opt, losses = step(params, aset, opt, all_base, x, y)
        assert np.isnan(np.asarray(losses)).all()
        # base examples only: no adapter stepped, factors and Adam state as they were
        for u, v in zip(jax.tree.leaves(before), jax.tree.leaves((aset.adapters, opt)),
                        strict=True):
            np.testing.assert_array_equal(u, np.asarray(v))
        for ids in later:
            aset, opt, _ = step(params, aset, opt, ids, x, y)
    assert cc.count == 0


@pytest.mark.standard_promotion
def test_per_tenant_checkpoint_round_trip(rng, tmp_path):
    gen = _gen(3)
    params, _, loss = _model(gen)
    members = _members(params, gen)
    aset = lj.adapter_set(members)
    tx = lj.optimizer(optax.adam(LR))
    step = lj.make_mixed_train_step(loss, tx)
    opt = lj.mixed_opt_state(tx, aset)
    ids, x, y = _batches(gen, 1)[0]
    aset, opt, _ = step(params, aset, opt, jnp.asarray(ids, jnp.int32), x, y)
    i = aset.index("r4")
    ad = lj.select_adapter(aset, "r4", trim=True)
    cfg = aset.members[i].config
    mine = jax.tree.map(lambda s: s[i], opt)
    # the tenant's own state fits its trimmed adapter only where shapes agree: save the
    # padded adapter with the set's config, the form the state was built for
    padded = lj.select_adapter(aset, "r4")
    lj.save(str(tmp_path / "r4"), padded, aset.config, params=params, opt_state=mine)
    ts, got_cfg = lj.restore_state(str(tmp_path / "r4"), params=params, tx=tx)
    for u, v in zip(jax.tree.leaves(ts.adapters), jax.tree.leaves(padded), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    for u, v in zip(jax.tree.leaves(ts.opt_state), jax.tree.leaves(mine), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert ad["l1"]["kernel"].a.shape == (D_IN, 4) and cfg.rank == 4


def test_bad_arguments_are_clear_errors(rng):
    gen = _gen(4)
    params, _, loss = _model(gen)
    aset = lj.adapter_set(_members(params, gen))
    tx = lj.optimizer(optax.sgd(LR))
    opt = lj.mixed_opt_state(tx, aset)
    ids, x, y = _batches(gen, 1)[0]
    step = lj.make_mixed_train_step(loss, tx, jit=False)
    with pytest.raises(ValueError, match=r"lr_scale has shape \(2,\); it must hold one "
                       r"multiplier per adapter \(3,\)"):
        step(params, aset, opt, jnp.asarray(ids), x, y, lr_scale=[1.0, 2.0])
    bad = lj.make_mixed_train_step(lambda p, x, y: (x @ p["l1"]["kernel"]).sum(-1), tx,
                                   jit=False)
    with pytest.raises(ValueError, match=r"loss_fn returned shape \(1, 3\) for one example"):
        bad(params, aset, opt, jnp.asarray(ids), x, y)
    with pytest.raises(TypeError, match=r"tx must be an optax GradientTransformation"):
        lj.make_mixed_train_step(loss, "adam")
    with pytest.raises(TypeError, match=r"expected an lj.AdapterSet"):
        lj.mixed_opt_state(tx, {"l1": None})
    with pytest.raises(ValueError, match=r"adapter_ids hold \[3\]"):
        step(params, aset, opt, jnp.asarray([3] * len(ids)), x, y)


@pytest.mark.slow
@pytest.mark.standard_promotion
@pytest.mark.parametrize("base", ["float", "nf4"])
def test_stacked_layers_on_any_base_train_as_separate_steps(rng, base):
    """Scanned (stacked) layers, on a float or an NF4 base: the mixed step equals one
    step per adapter on its examples."""
    gen = _gen(5)
    n_layers = 3
    params = {"q": {"kernel": jnp.asarray(gen.standard_normal((D_IN, D_H)) * 0.4, jnp.float32)},
              "layers": {"kernel": jnp.asarray(gen.standard_normal((n_layers, D_H, D_H)) * 0.3,
                                               jnp.float32)}}

    def fn(p, x):
        h = x @ p["q"]["kernel"]
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["layers"]["kernel"])[0]

    def loss(p, x, y):
        return jnp.mean((fn(p, x) - y) ** 2)

    x0 = jnp.zeros((1, T, D_IN), jnp.float32)
    members = {}
    for i, r in enumerate((2, 4)):
        cfg = lj.configure(lj.LoraConfig(rank=r, alpha=2 * r, targets=r".*/kernel"), fn,
                           params, x0)
        ad = lj.init(params, cfg, key=jax.random.fold_in(rng, i))
        ad = jax.tree.map(lambda n: n._replace(b=jnp.asarray(
            gen.standard_normal(n.b.shape) * 0.2, n.b.dtype)) if lj.is_lora(n) else n,
            ad, is_leaf=lj.is_lora)
        members[f"r{r}"] = (ad, cfg)
    if base == "nf4":
        params = lj.quantize(params, targets=r".*/kernel", config=members["r2"][1])
    aset = lj.adapter_set(members)
    tx = lj.optimizer(optax.sgd(LR, momentum=0.9))     # float32: see _PRECISIONS
    step = lj.make_mixed_train_step(loss, tx, donate=False)
    opt = lj.mixed_opt_state(tx, aset)
    batches = [(np.array([0, 1, 1, 0, 1], np.int32),
                gen.standard_normal((5, T, D_IN)).astype(np.float32),
                gen.standard_normal((5, T, D_H)).astype(np.float32)) for _ in range(2)]
    for ids, x, y in batches:
        aset, opt, _ = step(params, aset, opt, jnp.asarray(ids), x, y)
    assert_equals_separate_steps(aset, fn, params, members, tx, batches)


def assert_equals_separate_steps(aset, fn, params, members, tx, batches) -> None:
    """Each member trained alone (`lj.make_train_step`, mean squared error of ``fn``) on
    its examples of ``batches`` ends where the set's mixed steps left it, <= 1e-5."""
    for i, (name, (ad, cfg)) in enumerate(members.items()):
        f = lj.apply(fn, cfg)
        single = lj.make_train_step(lambda p, a, x, y, f=f: jnp.mean((f(p, a, x) - y) ** 2),
                                    tx, donate=False)
        state = tx.init(ad)
        for ids, x, y in batches:
            ad, state, _ = single(params, ad, state, x[ids == i], y[ids == i])
        got = lj.select_adapter(aset, name, trim=True)
        for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(ad), strict=True):
            if np.ndim(u):
                assert rel_err(u, v) <= 1e-5, name


@pytest.mark.standard_promotion
def test_a_new_tenant_in_a_slot_trains_from_scratch_without_recompiling(rng):
    gen = _gen(6)
    params, fn, loss = _model(gen)
    members = _members(params, gen)
    aset = lj.adapter_set(members)
    tx = lj.optimizer(optax.sgd(LR, momentum=0.9))     # float32: see _PRECISIONS
    step = lj.make_mixed_train_step(loss, tx, donate=False)
    opt = lj.mixed_opt_state(tx, aset)
    ids = jnp.asarray([0, 1, 2, 1, 0, 2], jnp.int32)
    x = jnp.asarray(gen.standard_normal((6, T, D_IN)), jnp.float32)
    y = jnp.asarray(gen.standard_normal((6, T, D_OUT)), jnp.float32)
    for _ in range(2):
        aset, opt, _ = step(params, aset, opt, ids, x, y)
    cfg4 = members["r4"][1]
    newcomer = _members(params, _gen(60))["r4"][0]           # same config, new factors
    # the reference works on the set's padded form (the form the slots' states are for)
    before = {n: lj.select_adapter(aset, n) for n in ("r2", "r8")}
    slots = {n: aset.index(n) for n in ("r2", "r8")}
    states = {n: jax.tree.map(lambda s, i=i: s[i], opt) for n, i in slots.items()}
    aset = lj.add_adapter(aset, "r4", newcomer, cfg4, replace=True)
    opt = lj.reset_opt_state(tx, aset, opt, "r4")
    before["r4"] = lj.select_adapter(aset, "r4")
    with CompileCounter() as cc:
        aset, opt, _ = step(params, aset, opt, ids, x, y)
    assert cc.count == 0
    # the newcomer took one fresh step; the others went on from where they were
    f = lj.apply(fn, aset.config)
    single = lj.make_train_step(lambda p, a, x, y: jnp.mean((f(p, a, x) - y) ** 2), tx,
                                donate=False)
    for name, ad in before.items():
        state = states[name] if name in states else tx.init(ad)
        mine = np.asarray(ids) == aset.index(name)
        want, _, _ = single(params, ad, state, x[mine], y[mine])
        got = lj.select_adapter(aset, name)
        for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            if np.ndim(u):
                assert rel_err(u, v) <= 1e-5, name


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_names_work_as_ids_jitted_or_not(rng):
    gen = _gen(7)
    params, _, loss = _model(gen)
    tx = lj.optimizer(optax.sgd(LR))
    ids, x, y = _batches(gen, 1)[0]
    names = ["__base__" if i < 0 else list(RANKS)[i] for i in ids]
    outs = []
    for jit in (True, False):
        aset = lj.adapter_set(_members(params, _gen(7)))
        step = lj.make_mixed_train_step(loss, tx, jit=jit)
        aset, _, losses = step(params, aset, lj.mixed_opt_state(tx, aset), names, x, y)
        outs.append(np.asarray(losses))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)
