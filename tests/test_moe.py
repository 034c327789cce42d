"""LoRA on MoE expert weights: per-expert adapters on expert-stacked ``(E, in, out)``
weights, used through ``lax.ragged_dot`` (tokens sorted by expert), a batched
einsum (capacity-style dispatch) or a per-token gather ``W[ids]``.

The reference is the merged model (`lj.merge`, per expert ``W_e + s a_e b_e``)
run through the same function: outputs and adapter gradients <= 1e-5
relative (float32). `lj.configure` reads the layout ``(stacked experts, in,
out)`` from each form; the default layout is refused, never silently another
LoRA. The low-rank path holds no dense ``(E, in, out)`` update or gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from tests._asserts import rel_err
from tests.conftest import SEED

E, D, F, T, R = 4, 16, 12, 24, 3


def _gen(k=0):
    return np.random.default_rng(SEED + 7000 + k)


def _routing(gen):
    """Top-1 routing: every token's expert, tokens sorted by expert, group sizes."""
    ids = np.sort(gen.integers(0, E, T))
    ids[:E] = np.arange(E)             # every expert gets a token
    ids = np.sort(ids)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(np.bincount(ids, minlength=E), jnp.int32)


def _forms(ids, sizes):
    """name -> fn(params, x) of one MoE layer (the experts' matmul, then tanh)."""
    def ragged(p, x):
        return jnp.tanh(jax.lax.ragged_dot(x, p["moe"]["experts"], sizes))

    def ragged_transposed(p, x):     # experts stored (E, out, in), as some checkpoints do
        w = jnp.swapaxes(p["moe"]["experts_t"], 1, 2)
        return jnp.tanh(jax.lax.ragged_dot(x, w, sizes))

    def einsum(p, x):                # dispatch: x scattered to (E, capacity, D)
        slots = jnp.zeros((E, T, D), x.dtype).at[ids, jnp.arange(T)].set(x)
        y = jnp.einsum("ecd,edf->ecf", slots, p["moe"]["experts"])
        return jnp.tanh(y[ids, jnp.arange(T)])

    def gather(p, x):                # each token's expert weight, gathered
        return jnp.tanh(jnp.einsum("td,tdf->tf", x, p["moe"]["experts"][ids]))

    return {"ragged": ragged, "ragged_transposed": ragged_transposed, "einsum": einsum,
            "gather": gather}


def _params(gen):
    w = jnp.asarray(gen.standard_normal((E, D, F)) * 0.3, jnp.float32)
    return {"moe": {"experts": w, "experts_t": jnp.swapaxes(w, 1, 2) * 0.9}}


def _with_b(ad, gen):
    return jax.tree.map(lambda n: n._replace(b=jnp.asarray(gen.standard_normal(n.b.shape) * 0.3,
                                                           n.b.dtype)) if lj.is_lora(n) else n,
                        ad, is_leaf=lj.is_lora)


def _target(form):
    return "moe/experts_t" if form == "ragged_transposed" else "moe/experts"


@pytest.mark.parametrize("base", ["float", "nf4"])
@pytest.mark.parametrize("form", ["ragged", "ragged_transposed", "einsum", "gather"])
def test_per_expert_lora_equals_the_merged_experts(rng, form, base):
    gen = _gen(1)
    ids, sizes = _routing(gen)
    fn = _forms(ids, sizes)[form]
    params = _params(gen)
    x = jnp.asarray(gen.standard_normal((T, D)), jnp.float32)
    cfg = lj.configure(lj.LoraConfig(rank=R, alpha=2 * R, targets=_target(form)), fn, params, x)
    layout = dict(cfg.inferred_layouts)[_target(form)][0]
    assert (layout.n_stacked, layout.n_in, layout.n_out) == (1, 1, 1)
    if base == "nf4":
        params = lj.quantize(params, targets=_target(form), config=cfg)
    ad = _with_b(lj.init(params, cfg, key=rng), gen)
    node = ad["moe"][_target(form).split("/")[1]]
    assert node.a.shape[0] == E and node.b.shape[0] == E       # one adapter per expert
    assert lj.explain(fn, cfg, params, ad, x).n_fallbacks == 0
    dense = lj.dequantize(params) if base == "nf4" else params
    got = jax.jit(lj.apply(fn, cfg))(params, ad, x)
    want = fn(lj.merge(dense, ad, cfg), x)
    assert rel_err(got, want) <= 1e-5

    def loss_lora(a):
        return jnp.sum(lj.apply(fn, cfg)(params, a, x) ** 2)

    def loss_merged(a):
        return jnp.sum(fn(lj.merge(dense, a, cfg), x) ** 2)

    g, g_ref = jax.grad(loss_lora)(ad), jax.grad(loss_merged)(ad)
    for u, v in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        if np.ndim(u):
            assert rel_err(u, v) <= 1e-5


def test_the_default_layout_is_refused_naming_the_fix(rng):
    gen = _gen(2)
    ids, sizes = _routing(gen)
    params = _params(gen)
    x = jnp.asarray(gen.standard_normal((T, D)), jnp.float32)
    cfg = lj.LoraConfig(rank=R, targets="moe/experts")
    ad = lj.init(params, cfg, key=rng)      # the default: (E * D) inputs, one shared adapter
    for form in ("ragged", "einsum", "gather"):
        fn = _forms(ids, sizes)[form]
        with pytest.raises(ValueError, match=r"moe/experts: the program uses this \(4, 16, 12\) "
                           r"weight as lj.Layout\(1, 1, 1\) \(axes: stacked 4, in 16, out 12\)"
                           r"[\s\S]*a different LoRA[\s\S]*lj.configure"):
            lj.apply(fn, cfg)(params, ad, x)


@pytest.mark.slow
@pytest.mark.standard_promotion     # optax's adam
def test_experts_in_scanned_layers_train_without_dense_updates(rng):
    """(layers, experts, in, out) under nn.scan-style lax.scan: Layout(2, 1, 1) read from the
    program; the training step's jaxpr holds no (L, E, in, out)- or (E, in, out)-shaped
    value besides the frozen weights (no dense update, no dense weight gradient)."""
    gen = _gen(3)
    n_layers = 2
    ids, sizes = _routing(gen)
    w = jnp.asarray(gen.standard_normal((n_layers, E, D, D)) * 0.2, jnp.float32)
    params = {"layers": {"experts": w}}

    def fn(p, x):
        def body(h, we):
            return jnp.tanh(jax.lax.ragged_dot(h, we, sizes)) + h, None
        return jax.lax.scan(body, x, p["layers"]["experts"])[0]

    x = jnp.asarray(gen.standard_normal((T, D)), jnp.float32)
    cfg = lj.configure(lj.LoraConfig(rank=R, targets="layers/experts"), fn, params, x)
    layout = dict(cfg.inferred_layouts)["layers/experts"][0]
    assert (layout.n_stacked, layout.n_in, layout.n_out) == (2, 1, 1)
    ad = _with_b(lj.init(params, cfg, key=rng), gen)
    assert ad["layers"]["experts"].a.shape == (n_layers, E, D, R)
    want = fn(lj.merge(params, ad, cfg), x)
    assert rel_err(lj.apply(fn, cfg)(params, ad, x), want) <= 1e-5
    tx = lj.optimizer(optax.adam(1e-2))
    fwd = lj.apply(fn, cfg)

    def loss(p, a, x):
        return jnp.mean(fwd(p, a, x) ** 2)

    step = lj.make_train_step(loss, tx, jit=False)
    jaxpr = jax.make_jaxpr(step)(params, ad, tx.init(ad), x)
    big = {(n_layers, E, D, D), (E, D, D)}

    def all_eqns(jx):
        for eqn in jx.eqns:
            yield eqn
            for v in eqn.params.values():
                for j in (v if isinstance(v, (tuple, list)) else (v,)):
                    inner = getattr(j, "jaxpr", None)
                    if inner is not None:
                        yield from all_eqns(getattr(inner, "jaxpr", inner))

    dense = [(e.primitive.name, tuple(v.aval.shape)) for e in all_eqns(jaxpr.jaxpr)
             for v in e.outvars if tuple(getattr(v.aval, "shape", ())) in big
             and e.primitive.name not in ("pjit", "jit", "scan")]
    assert not dense, dense
    p2, _, l0 = step(params, ad, tx.init(ad), x)
    assert np.isfinite(float(l0))


def test_einsum_experts_step_flops_at_the_hand_counted_floor(rng):
    """XLA's FLOP count of the adapter-gradient step (batched-einsum experts, whose
    matmuls XLA counts exactly) against the frozen model's forward + input gradient
    plus the low-rank terms counted by hand: forward x a, (x a) b; backward
    g b^T, (g b^T) a^T, x^T (g b^T), (x a)^T g -- 6 E C r (D + F) in all; and far below
    the step that also forms the experts' weight gradient."""
    gen = _gen(4)
    C, d_in, d_out, r = 32, 64, 48, 2          # tokens per expert (capacity), sizes, rank
    params = {"w": jnp.asarray(gen.standard_normal((E, d_in, d_out)), jnp.float32)}

    def fn(p, x):
        return jnp.einsum("ecd,edf->ecf", x, p["w"])

    x = jnp.asarray(gen.standard_normal((E, C, d_in)), jnp.float32)
    cfg = lj.LoraConfig(rank=r, targets="w", layouts={"w": lj.Layout(1, 1, 1)})
    ad = _with_b(lj.init(params, cfg, key=rng), gen)

    def flops(f, *args):      # every array an argument: nothing for XLA to constant-fold
        cost = jax.jit(f).lower(*args).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

    # value_and_grad: the loss is used, so no forward product is dead code
    lora = flops(jax.value_and_grad(lambda p, a, x: jnp.sum(lj.apply(fn, cfg)(p, a, x)), (1, 2)),
                 params, ad, x)
    frozen = flops(jax.value_and_grad(lambda p, x: jnp.sum(fn(p, x)), 1), params, x)  # y, dx
    full = flops(jax.value_and_grad(lambda p, x: jnp.sum(fn(p, x)), (0, 1)), params, x)
    floor = 6 * E * C * r * (d_in + d_out)
    extra = lora - frozen
    # the floor, plus at most the elementwise sum of the two branches and the scale
    assert floor <= extra <= floor + 4 * E * C * d_out, (lora, frozen, floor)
    assert lora < full - 0.5 * 2 * E * C * d_in * d_out    # no dense weight gradient


def test_moe_adapters_compose_with_checkpoints_sets_and_peft_style_merge(rng, tmp_path):
    gen = _gen(5)
    ids, sizes = _routing(gen)
    fn = _forms(ids, sizes)["ragged"]
    params = _params(gen)
    x = jnp.asarray(gen.standard_normal((T, D)), jnp.float32)
    cfg = lj.configure(lj.LoraConfig(rank=R, targets="moe/experts"), fn, params, x)
    ad1 = _with_b(lj.init(params, cfg, key=rng), gen)
    ad2 = _with_b(lj.init(params, cfg, key=jax.random.fold_in(rng, 1)), gen)
    lj.save(str(tmp_path / "moe"), ad1, cfg, params=params)
    back, back_cfg = lj.restore(str(tmp_path / "moe"), params=params)
    np.testing.assert_array_equal(np.asarray(back["moe"]["experts"].b),
                                  np.asarray(ad1["moe"]["experts"].b))
    aset = lj.adapter_set({"one": (ad1, cfg), "two": (ad2, cfg)})
    got = lj.apply(fn, aset.config)(params, lj.select_adapter(aset, "two"), x)
    assert rel_err(got, fn(lj.merge(params, ad2, cfg), x)) <= 1e-5
    # a weighted merge of both into the experts
    merged = lj.merge_weighted(params, aset, {"one": 0.5, "two": 0.5})
    def upd(ad):      # s a_e b_e per expert, in float64
        n = ad["moe"]["experts"]
        return float(n.scale) * np.einsum("eir,ero->eio", np.asarray(n.a, np.float64),
                                          np.asarray(n.b, np.float64))
    want = np.asarray(params["moe"]["experts"], np.float64) + 0.5 * (upd(ad1) + upd(ad2))
    assert rel_err(merged["moe"]["experts"], want) <= 1e-5
    # DoRA on ragged_dot experts has no grouped low-rank form: computed densely, said so
    dcfg = cfg.replace(use_dora=True)
    dad = _with_b(lj.init(params, dcfg, key=rng), gen)
    e = lj.explain(fn, dcfg, params, dad, x)
    assert e.n_fallbacks == 1 and "DoRA on a ragged_dot" in str(e)
    with pytest.warns(lj.LoraWarning, match=r"moe/experts: lj.apply materialized"):
        got = lj.apply(fn, dcfg)(params, dad, x)
    assert rel_err(got, fn(lj.merge(params, dad, dcfg), x)) <= 1e-5


@pytest.mark.parametrize("variant", ["rslora", "pissa", "adalora"])
def test_expert_adapters_of_every_kind_equal_the_merged_experts(rng, variant):
    gen = _gen(6)
    ids, sizes = _routing(gen)
    fn = _forms(ids, sizes)["ragged"]
    params = _params(gen)
    x = jnp.asarray(gen.standard_normal((T, D)), jnp.float32)
    base = lj.LoraConfig(rank=R, alpha=2 * R, targets="moe/experts",
                         use_rslora=variant == "rslora",
                         init="pissa" if variant == "pissa" else "kaiming")
    cfg = lj.configure(base, fn, params, x)
    if variant == "pissa":       # per expert: the top singular directions, the residual base
        original = params
        params, ad = lj.init(params, cfg, key=rng, return_params=True)
        view = ad
        # residual + s a b is the original experts; a holds each expert's top directions
        assert rel_err(lj.merge(params, ad, cfg)["moe"]["experts"],
                       original["moe"]["experts"]) <= 1e-5
        top = np.linalg.svd(np.asarray(original["moe"]["experts"], np.float64),
                            compute_uv=False)[:, :R]
        got_sv = np.linalg.svd(np.asarray(
            lj.merge(jax.tree.map(jnp.zeros_like, params), ad, cfg)["moe"]["experts"],
            np.float64), compute_uv=False)[:, :R]
        np.testing.assert_allclose(got_sv, top, rtol=1e-4)
    elif variant == "adalora":
        ad = lj.adalora_init(params, cfg, key=rng)
        ad = jax.tree.map(lambda n: n._replace(
            e=jnp.asarray(gen.standard_normal(n.e.shape), n.e.dtype),
            b=jnp.asarray(gen.standard_normal(n.b.shape) * 0.3, n.b.dtype))
            if lj.is_adalora(n) else n, ad, is_leaf=lj.is_adalora)
        view = lj.adalora_view(ad)
    else:
        ad = view = _with_b(lj.init(params, cfg, key=rng), gen)
    assert lj.explain(fn, cfg, params, view, x).n_fallbacks == 0
    got = lj.apply(fn, cfg)(params, view, x)
    want = fn(lj.merge(params, view, cfg), x)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(want, fn(params, x)) > 1e-4          # the adapter acts


def test_mixed_batches_of_expert_adapters_for_the_vmappable_forms(rng):
    """`lj.apply_mixed` maps the model over examples with `jax.vmap`: the einsum and gather
    forms go through it; `ragged_dot` does not (jax 0.10 has no vmap rule for it) and the
    error says what to do instead."""
    gen = _gen(7)
    params = _params(gen)
    ids_t = jnp.asarray(gen.integers(0, E, (3, T)), jnp.int32)     # each example's routing

    def gather(p, x, ids):           # one example: x (1, T, D), ids (1, T)
        return jnp.tanh(jnp.einsum("btd,btdf->btf", x, p["moe"]["experts"][ids]))

    x = jnp.asarray(gen.standard_normal((3, T, D)), jnp.float32)
    cfg = lj.configure(lj.LoraConfig(rank=R, targets="moe/experts"), gather, params, x[:1],
                       ids_t[:1])
    members = {n: (_with_b(lj.init(params, cfg, key=jax.random.fold_in(rng, i)), gen), cfg)
               for i, n in enumerate(("one", "two"))}
    aset = lj.adapter_set(members)
    names = ["two", "__base__", "one"]
    got = jax.jit(lj.apply_mixed(gather))(params, aset, lj.adapter_ids(aset, names), x, ids_t)
    for e, name in enumerate(names):
        want = (gather(params, x[e:e + 1], ids_t[e:e + 1]) if name == "__base__" else
                lj.apply(gather, cfg)(params, members[name][0], x[e:e + 1], ids_t[e:e + 1]))
        assert rel_err(got[e], want[0]) <= 1e-5, name
    sizes = jnp.asarray([T // E] * E, jnp.int32)

    def ragged(p, x, ids):
        return jax.lax.ragged_dot(x[0], p["moe"]["experts"], sizes)[None]

    with pytest.raises(NotImplementedError, match=r"lj.apply_mixed: fn uses lax.ragged_dot, "
                       r"which jax.vmap cannot map[\s\S]*Fix: write the experts as a gather"):
        lj.apply_mixed(ragged)(params, aset, lj.adapter_ids(aset, names), x, ids_t)


def test_a_looked_up_3d_table_used_as_activations_stays_a_lookup():
    """Only a gather whose result a product batches over (a per-token weight) is an expert
    gather; rows of a 3-D table used as activations are an embedding lookup, and the
    weight they meet is read as usual."""
    gen = _gen(8)
    params = {"table": jnp.asarray(gen.standard_normal((20, 4, 8)), jnp.float32),
              "w": jnp.asarray(gen.standard_normal((8, 5)), jnp.float32)}
    tok = jnp.asarray(gen.integers(0, 20, 6), jnp.int32)

    def fn(p, x):
        return jnp.einsum("thd,dk->thk", p["table"][tok], p["w"]) * x

    report = lj.infer_layouts(fn, params, jnp.ones(()), config=lj.LoraConfig(
        rank=2, targets="table|w"))
    got = {p: lay for p, lay in report.layouts.items()}
    assert (got["table"].n_stacked, got["table"].n_in, got["table"].n_out) == (0, 1, 2)
    assert (got["w"].n_stacked, got["w"].n_in, got["w"].n_out) == (0, 1, 1)
