"""Projections that read one input share their low-rank products (q, k, v; gate, up).

`lj.apply` evaluates ``x @ W_q``, ``x @ W_k``, ``x @ W_v`` on one ``x`` as one
kernel: ``x @ [a_q | a_k | a_v]`` forward, ``[dt_q | dt_k | dt_v] @ [...].T`` and
``x.T @ [dt_q | ...]`` backward. The reference for "shared equals unshared" is the
same model with the siblings reading ``x * 1`` (another value in the jaxpr, so
nothing is shared); the reference for correctness is the merged model. Every
comparison runs in float64 (a float32 comparison of gradients that cancel is
seed-dependent at 1e-5), so the bounds hold for every seed.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj
from tests._asserts import assert_trees_close, perturb_b

D_IN = 24
F64 = jnp.float64
# (kernel widths 16, 12, 16; the ranks below never sum to a width, so a
# (D_IN, sum of ranks) operand is the shared product and nothing else)
SHARED_TOL = 1e-6     # shared vs unshared form, relative to the largest value (float64)
MERGED_TOL = 1e-6     # vs the merged model (lj.merge forms s b a in float32 precision)
AUTODIFF_TOL = 1e-9   # vs the autodiff form, custom_grad=False (float64 throughout)


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


class QKV(nn.Module):
    """Three projections of one input (different widths), then one of their mix."""

    share: bool = True
    dtype: jnp.dtype = F64
    heads: bool = False

    @nn.compact
    def __call__(self, x):
        other = x if self.share else x * jnp.asarray(1, x.dtype)
        if self.heads:      # DenseGeneral: (in, heads, head_dim) kernels
            proj = lambda n, name: nn.DenseGeneral((2, n // 2), name=name,  # noqa: E731
                                                   dtype=self.dtype)
        else:
            proj = lambda n, name: nn.Dense(n, name=name, dtype=self.dtype)  # noqa: E731
        q = proj(16, "q")(x)
        k = proj(12, "k")(other)
        v = proj(16, "v")(other)
        flat = lambda t: t.reshape(*t.shape[:2], -1)  # noqa: E731
        q, k, v = flat(q), flat(k), flat(v)
        h = jnp.tanh(q) * jnp.sum(v, -1, keepdims=True) + jnp.mean(k, -1, keepdims=True)
        return nn.Dense(8, name="o", dtype=self.dtype)(h)


TARGETS = r".*/(q|k|v|o)/kernel"


def _case(rng, model, cfg, *, dtype=F64, param_dtype=F64):
    """float64 input; params in ``param_dtype`` (float32 ones are cast by each Dense,
    an equation after the previous projection's product); float64 adapters."""
    x = jax.random.normal(jax.random.fold_in(rng, 1), (3, 5, D_IN), dtype)
    params = model.init(jax.random.fold_in(rng, 2), x)
    params = jax.tree.map(lambda t: t.astype(param_dtype), params)
    if getattr(model, "heads", False):   # (in, heads, head_dim) kernels: layouts read
        cfg = lj.configure(cfg, model.apply, params, x)
    ad = perturb_b(lj.init(params, cfg, key=jax.random.fold_in(rng, 3)),
                   key=jax.random.fold_in(rng, 4), std=0.2)
    return params, ad, x, cfg


def _loss(model, cfg, x, **kw):
    def loss(params, ad):
        y = lj.apply(model.apply, cfg, **kw)(params, ad, x)
        return jnp.sum(jnp.sin(y))
    return loss


def _shared_dots(fn, *args) -> list:
    """Shapes of the right operands of dot_generals whose rank axis holds several
    adapters' ranks (the shared ``x @ [a_q | a_k | a_v]``), anywhere in the jaxpr."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(eqn.invars[1].aval.shape))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                        walk(getattr(sub, "jaxpr", sub))
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _ranks_sum(cfg, names=("q", "k", "v")) -> int:
    return sum(cfg.rank_for(f"params/{n}/kernel") for n in names)


@pytest.mark.parametrize("heads", [False, True], ids=["dense", "dense_general"])
def test_shared_equals_unshared_and_merged(rng, heads):
    cfg = lj.LoraConfig(rank=5, alpha=10, targets=TARGETS, dtype=F64,
                        rank_pattern={r"params/k/kernel": 2, r"params/v/kernel": 6})
    shared, unshared = QKV(heads=heads), QKV(share=False, heads=heads)
    params, ad, x, cfg = _case(rng, shared, cfg)
    y_s = lj.apply(shared.apply, cfg)(params, ad, x)
    y_u = lj.apply(unshared.apply, cfg)(params, ad, x)
    assert_trees_close(y_s, y_u, rtol=SHARED_TOL)
    assert_trees_close(y_s, shared.apply(lj.merge(params, ad, cfg), x), rtol=MERGED_TOL)
    g_s = jax.jit(jax.grad(_loss(shared, cfg, x), argnums=(0, 1)))(params, ad)
    g_u = jax.jit(jax.grad(_loss(unshared, cfg, x), argnums=(0, 1)))(params, ad)
    assert_trees_close(g_s, g_u, rtol=SHARED_TOL)
    # the autodiff form (no kernel, nothing shared) is an independent reference
    g_ref = jax.grad(_loss(shared, cfg, x, custom_grad=False), argnums=(0, 1))(params, ad)
    assert_trees_close(g_s, g_ref, rtol=AUTODIFF_TOL)
    # ... and the sharing really happened: one product with all three ranks
    k = D_IN
    assert (k, _ranks_sum(cfg)) in _shared_dots(lj.apply(shared.apply, cfg), params, ad, x)
    assert (k, _ranks_sum(cfg)) not in _shared_dots(lj.apply(unshared.apply, cfg), params, ad, x)


def test_input_gradient_is_shared_too(rng):
    """dL/dx sums every projection's path: equal to the unshared form and the merged."""
    cfg = lj.LoraConfig(rank=3, alpha=6, targets=TARGETS, dtype=F64)
    shared, unshared = QKV(), QKV(share=False)
    params, ad, x, cfg = _case(rng, shared, cfg)

    def dx(model, **kw):
        return jax.grad(lambda x: jnp.sum(jnp.sin(
            lj.apply(model.apply, cfg, **kw)(params, ad, x))))(x)
    assert_trees_close(dx(shared), dx(unshared), rtol=SHARED_TOL)
    merged = lj.merge(params, ad, cfg)
    ref = jax.grad(lambda x: jnp.sum(jnp.sin(shared.apply(merged, x))))(x)
    assert_trees_close(dx(shared), ref, rtol=MERGED_TOL)


@pytest.mark.slow
def test_compute_dtype_casts_of_the_kernels_are_evaluated_ahead(rng):
    """float32 params, float64 compute: each kernel's cast comes after the previous
    projection in the jaxpr; it is evaluated ahead of its turn and the three share."""
    cfg = lj.LoraConfig(rank=5, alpha=10, targets=TARGETS, dtype=F64)
    shared, unshared = QKV(), QKV(share=False)
    params, ad, x, cfg = _case(rng, shared, cfg, param_dtype=jnp.float32)
    assert (D_IN, _ranks_sum(cfg)) in _shared_dots(lj.apply(shared.apply, cfg), params, ad, x)
    g_s = jax.grad(_loss(shared, cfg, x), argnums=1)(params, ad)
    g_u = jax.grad(_loss(unshared, cfg, x), argnums=1)(params, ad)
    assert_trees_close(g_s, g_u, rtol=SHARED_TOL)
    g_ref = jax.grad(_loss(shared, cfg, x, custom_grad=False), argnums=1)(params, ad)
    assert_trees_close(g_s, g_ref, rtol=AUTODIFF_TOL)


def test_dropout_keeps_one_mask_per_projection(rng):
    """With dropout each projection draws its own mask (as PEFT's modules do), so
    nothing is shared -- and the result is the same as before sharing existed: the
    model whose siblings read ``x * 1`` draws the same masks."""
    cfg = lj.LoraConfig(rank=5, alpha=10, targets=TARGETS, dtype=F64, dropout=0.3)
    shared, unshared = QKV(), QKV(share=False)
    params, ad, x, cfg = _case(rng, shared, cfg)
    key = jax.random.fold_in(rng, 9)
    fn = lj.apply(shared.apply, cfg)
    assert (D_IN, _ranks_sum(cfg)) not in _shared_dots(
        lambda p, a, x: fn(p, a, x, lora_rng=key), params, ad, x)
    y_s = fn(params, ad, x, lora_rng=key)
    y_u = lj.apply(unshared.apply, cfg)(params, ad, x, lora_rng=key)
    assert_trees_close(y_s, y_u, rtol=SHARED_TOL)


@pytest.mark.parametrize("method", [pytest.param("nf4", marks=pytest.mark.slow), "int8"])
def test_quantized_base(rng, method):
    cfg = lj.LoraConfig(rank=5, alpha=10, targets=TARGETS, dtype=F64)
    shared, unshared = QKV(), QKV(share=False)
    params, ad, x, cfg = _case(rng, shared, cfg, param_dtype=jnp.float32)
    qparams = lj.quantize(params, targets=TARGETS, method=method, block_size=8)
    assert (D_IN, _ranks_sum(cfg)) in _shared_dots(lj.apply(shared.apply, cfg), qparams, ad, x)
    g_s = jax.jit(jax.grad(_loss(shared, cfg, x), argnums=1))(qparams, ad)
    g_u = jax.jit(jax.grad(_loss(unshared, cfg, x), argnums=1))(qparams, ad)
    assert_trees_close(g_s, g_u, rtol=SHARED_TOL)
    dense = lj.merge(lj.dequantize(qparams), ad, cfg)
    assert_trees_close(lj.apply(shared.apply, cfg)(qparams, ad, x), shared.apply(dense, x),
                       rtol=MERGED_TOL)


class ScannedQKV(nn.Module):
    @nn.compact
    def __call__(self, x):
        def layer(mdl, h, _):
            return h + 0.5 * QKV()(h)[..., :1], None
        body = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)
        return body(self, x, None)[0]


@pytest.mark.slow
def test_scanned_layers_share_inside_the_scan_body(rng):
    cfg = lj.LoraConfig(rank=2, alpha=4, targets=r".*/(q|k|v|o)/kernel", dtype=F64,
                        layouts={r"params/.*": lj.Layout(1, 1, 1)})
    model = ScannedQKV()
    params, ad, x, cfg = _case(rng, model, cfg)
    assert (D_IN, 3 * 2) in _shared_dots(lj.apply(model.apply, cfg), params, ad, x)
    merged = lj.merge(params, ad, cfg)
    assert_trees_close(lj.apply(model.apply, cfg)(params, ad, x), model.apply(merged, x),
                       rtol=MERGED_TOL)
    g = jax.grad(_loss(model, cfg, x), argnums=1)(params, ad)
    g_ref = jax.grad(_loss(model, cfg, x, custom_grad=False), argnums=1)(params, ad)
    assert_trees_close(g, g_ref, rtol=AUTODIFF_TOL)


class NNXQKV(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.Linear(D_IN, 16, param_dtype=F64, rngs=rngs)
        self.k = nnx.Linear(D_IN, 12, param_dtype=F64, rngs=rngs)
        self.v = nnx.Linear(D_IN, 16, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.q(x)) * jnp.mean(self.k(x), -1, keepdims=True) + self.v(x)


def test_nnx_projections_share(rng):
    graphdef, state = nnx.split(NNXQKV(nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)

    def fn(p, x):
        st = nnx.state(nnx.merge(graphdef, state))
        nnx.replace_by_pure_dict(st, p)
        return nnx.merge(graphdef, st)(x)

    cfg = lj.LoraConfig(rank=3, alpha=6, targets=r"(q|k|v)/kernel", dtype=F64)
    x = jax.random.normal(rng, (4, D_IN), F64)
    ad = perturb_b(lj.init(params, cfg, key=jax.random.fold_in(rng, 1)),
                   key=jax.random.fold_in(rng, 2), std=0.2)
    assert (D_IN, 9) in _shared_dots(lj.apply(fn, cfg), params, ad, x)
    assert_trees_close(lj.apply(fn, cfg)(params, ad, x), fn(lj.merge(params, ad, cfg), x),
                       rtol=MERGED_TOL)
    loss = lambda ad, **kw: jnp.sum(jnp.sin(lj.apply(fn, cfg, **kw)(params, ad, x)))  # noqa: E731
    assert_trees_close(jax.grad(loss)(ad), jax.grad(lambda a: loss(a, custom_grad=False))(ad),
                       rtol=AUTODIFF_TOL)


def test_dora_projections_are_not_shared_and_stay_exact(rng):
    """DoRA's column norm scales each product's output; those products run alone."""
    cfg = lj.LoraConfig(rank=3, alpha=6, targets=TARGETS, dtype=F64, use_dora=True)
    model = QKV()
    params, ad, x, cfg = _case(rng, model, cfg)
    assert (D_IN, 9) not in _shared_dots(lj.apply(model.apply, cfg), params, ad, x)
    assert_trees_close(lj.apply(model.apply, cfg)(params, ad, x),
                       model.apply(lj.merge(params, ad, cfg), x), rtol=MERGED_TOL)


def test_explain_counts_each_shared_projection(rng):
    cfg = lj.LoraConfig(rank=2, alpha=4, targets=TARGETS, dtype=F64)
    model = QKV()
    params, ad, x, cfg = _case(rng, model, cfg)
    e = lj.explain(model.apply, cfg, params, ad, x)
    assert e.n_fallbacks == 0
    assert {p: r for p, r in e.rules.items()} == {
        f"params/{n}/kernel": {"lowrank_dot": 1} for n in ("k", "o", "q", "v")}


def test_mixed_adapter_batches_share_per_example(rng):
    """apply_mixed vmaps the shared kernel: equal to each example's own adapter."""
    cfg = lj.LoraConfig(rank=2, alpha=4, targets=TARGETS, dtype=F64)
    model = QKV()
    params, ad1, x, cfg = _case(rng, model, cfg)
    ad2 = perturb_b(ad1, key=jax.random.fold_in(rng, 7), std=0.3)
    aset = lj.adapter_set({"one": (ad1, cfg), "two": (ad2, cfg)})
    ids = jnp.asarray([1, 0, 1])
    y = lj.apply_mixed(model.apply)(params, aset, ids, x)
    for i, ad in enumerate((ad2, ad1, ad2)):
        ref = lj.apply(model.apply, cfg)(params, ad, x[i:i + 1])
        assert_trees_close(y[i:i + 1], ref, rtol=MERGED_TOL)
    assert np.isfinite(np.asarray(y)).all()
