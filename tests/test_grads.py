"""Gradients through `lj.apply` with respect to everything: the inputs, the
frozen params (a user may differentiate the base, e.g. for influence
functions) and the adapters, against autodiff of the merged model
``fn(lj.merge(params, adapters, config), x)``.

Each model runs through the hand-written matmul backward (``custom_grad=True``,
the default) and through autodiff of the low-rank form (``custom_grad=False``),
with and without jit: a Dense MLP, multi-axis DenseGeneral / Einsum kernels, a
tied embedding / output projection, and layers stacked by ``nn.scan`` (layouts
read from the program by `lj.configure`). A float64 test checks `lj.apply`
and its gradients against a numpy float64 hand computation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from tests._asserts import assert_close, assert_trees_close, random_adapters, rel_err, rel_err64

GRAD_RTOL = 1e-5
# B's std: large enough that s * a @ b is comparable to W, so an adapter the
# backward pass got wrong (or ignored) moves every gradient far beyond GRAD_RTOL.
B_STD = 0.5

# ----------------------------------------------------------------------------- models


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="out")(nn.gelu(nn.Dense(32, name="hidden")(x)))


class _MultiAxis(nn.Module):
    """DenseGeneral in (d -> heads, hd) and out (heads, hd -> d), Einsum both ways."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((4, 8), axis=-1, name="proj_in")(x)
        o = nn.DenseGeneral(16, axis=(-2, -1), name="proj_out")(jnp.tanh(q))
        h = nn.Einsum((16, 4, 6), "btd,dhk->bthk", name="up")(o)
        return nn.Einsum((4, 6, 16), "bthk,hkd->btd", name="down")(jax.nn.relu(h))


class _Tied(nn.Module):
    """Embedding lookup plus a float input, and the tied output projection."""

    @nn.compact
    def __call__(self, x, ids):
        embed = nn.Embed(40, 16, name="embed")
        h = nn.Dense(16, name="mix")(jnp.tanh(embed(ids) + x))
        return embed.attend(h)


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        up = nn.Dense(24, name="up")(h)
        return h + nn.Dense(16, name="down")(jnp.tanh(up)), None


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=3)
        h, _ = stack(name="layers")(x, None)
        return nn.Dense(8, name="head")(h)


def _gen(rng):
    """A numpy generator seeded from ``rng`` (numpy draws compile nothing)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())


def _normal(gen, shape, std=1.0):
    return jnp.asarray(std * gen.standard_normal(shape), jnp.float32)


def _mlp(gen):
    x = _normal(gen, (3, 5, 16))
    return _MLP(), (x,), lj.LoraConfig(rank=4, alpha=8, targets=r".*/kernel")


def _multi_axis(gen):
    x = _normal(gen, (2, 6, 16))
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*/kernel",
                        layouts={r".*/(proj_in|up)/kernel": lj.Layout(0, 1, 2),
                                 r".*/(proj_out|down)/kernel": lj.Layout(0, 2, 1)})
    return _MultiAxis(), (x,), cfg


def _tied(gen):
    x = _normal(gen, (3, 7, 16))
    ids = jnp.asarray(gen.integers(0, 40, (3, 7)), jnp.int32)
    return _Tied(), (x, ids), lj.LoraConfig(rank=4, alpha=8,
                                             targets=r".*/(embedding|kernel)")


def _scan(gen):
    x = _normal(gen, (2, 5, 16))
    # no layouts declared: lj.configure reads the leading layer axis from the scan
    return _Stack(), (x,), lj.LoraConfig(rank=4, alpha=8, targets=r".*/kernel")


MODELS = {"dense_mlp": _mlp, "multi_axis": _multi_axis, "tied_embedding": _tied,
          "scan_stack": _scan}
_COSTLY = ("multi_axis", "scan_stack")      # the most to trace and compile

# What each targeted kernel's adapter looks like (so the model is the one meant).
A_SHAPES = {
    "dense_mlp": {"params/hidden/kernel": (16, 4), "params/out/kernel": (32, 4)},
    "multi_axis": {"params/proj_in/kernel": (16, 4), "params/proj_out/kernel": (32, 4),
                   "params/up/kernel": (16, 4), "params/down/kernel": (24, 4)},
    "tied_embedding": {"params/embed/embedding": (40, 4), "params/mix/kernel": (16, 4)},
    "scan_stack": {"params/layers/up/kernel": (3, 16, 4), "params/layers/down/kernel": (3, 24, 4),
                   "params/head/kernel": (16, 4)},
}


def _setup(name, rng):
    """(fn, variables, adapters with non-zero B, args, config), all fresh from ``rng``.

    Everything is drawn with numpy into shapes from ``jax.eval_shape`` (no
    compiles): weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), adapters by
    `random_adapters` (B ~ N(0, B_STD^2)).
    """
    gen = _gen(rng)
    model, args, cfg = MODELS[name](gen)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
    variables = jax.tree.map(
        lambda x: _normal(gen, x.shape, 1 / np.sqrt(x.size // x.shape[-1]) if x.ndim > 1
                          else 0.1), shapes)
    if name == "scan_stack":
        cfg = lj.configure(cfg, model.apply, variables, *args)
        assert cfg.layout_for("params/layers/up/kernel") == lj.Layout(1, 1, 1)
    ad = random_adapters(variables, cfg, seed=int(gen.integers(2**31)), b_std=B_STD)
    a_shapes = {lj.path_str(p): node.a.shape
                for p, node in jax.tree_util.tree_flatten_with_path(ad, is_leaf=lj.is_lora)[0]
                if lj.is_lora(node)}
    assert a_shapes == A_SHAPES[name]
    return model.apply, variables, ad, args, cfg


# ----------------------------------------------------------------------------- grads


def _vjp_loss(f, g):
    """``<g, f(params, adapters, *args)>``: its gradient is f's VJP with cotangent g."""
    return lambda p, a, *args: jnp.vdot(f(p, a, *args), g)


def _out_and_vjp(f, g):
    """``(f(params, adapters, x, *rest), its VJP with g w.r.t. (params, adapters, x))``."""
    def run(p, a, x, *rest):
        out, pull = jax.vjp(lambda p, a, x: f(p, a, x, *rest), p, a, x)
        return out, pull(g)
    return run


def _merged(fn, cfg):
    return lambda p, a, *xs: fn(lj.merge(p, a, cfg), *xs)


def _cotangent(f, args, gen):
    return _normal(gen, jax.eval_shape(f, *args).shape)


# The fast tier runs every model through the custom-grad kernel; autodiff of
# the low-rank form (custom_grad=False) of the two costlier models is slow-tier.
_SLOW = pytest.mark.slow
GRAD_CASES = [pytest.param(name, custom_grad, id=f"{name}-{form}",
                           marks=[_SLOW] if not custom_grad and name in _COSTLY else [])
              for name in MODELS for custom_grad, form in ((True, "custom_grad"),
                                                            (False, "autodiff"))]


@pytest.mark.parametrize("name, custom_grad", GRAD_CASES)
def test_grads_wrt_inputs_params_and_adapters_match_merged(rng, maybe_jit, name, custom_grad):
    """d/dx, d/dparams (frozen weights included) and d/dadapters of `lj.apply` ==
    those of the merged model (the reference always jitted), for a random cotangent."""
    fn, variables, ad, args, cfg = _setup(name, rng)
    adapted, merged = lj.apply(fn, cfg, custom_grad=custom_grad), _merged(fn, cfg)
    g = _cotangent(merged, (variables, ad, *args), _gen(jax.random.fold_in(rng, 1)))
    got_out, got = maybe_jit(_out_and_vjp(adapted, g))(variables, ad, *args)
    want_out, want = jax.jit(_out_and_vjp(merged, g))(variables, ad, *args)
    assert_close(got_out, want_out, rtol=GRAD_RTOL, what="output")
    for part, got_part, want_part in zip(("d/dparams", "d/dadapters", "d/dx"), got, want,
                                         strict=True):
        try:
            assert_trees_close(got_part, want_part, rtol=GRAD_RTOL)
        except AssertionError as e:
            raise AssertionError(f"{part}: {e}") from None
    # every A and B gets a gradient; no scale does (it is never trained)
    for node in jax.tree.leaves(got[1], is_leaf=lj.is_lora):
        assert np.abs(np.asarray(node.a)).max() > 0 and np.abs(np.asarray(node.b)).max() > 0
        np.testing.assert_array_equal(node.scale, 0.0)


@pytest.mark.slow             # a check of the inputs above, not of lora_jax
@pytest.mark.parametrize("name", list(MODELS))
def test_the_adapter_moves_every_gradient(rng, name):
    """What makes the comparison above discriminating: with these adapters, the
    merged model's d/dx and d/dW differ from the base model's by far more than
    its tolerance, so a backward pass that dropped the adapter would fail it."""
    fn, variables, ad, args, cfg = _setup(name, rng)
    g = _cotangent(_merged(fn, cfg), (variables, ad, *args), _gen(jax.random.fold_in(rng, 1)))
    adapted = jax.jit(jax.grad(_vjp_loss(_merged(fn, cfg), g), argnums=(0, 2)))(
        variables, ad, *args)
    base = jax.jit(jax.grad(_vjp_loss(lambda p, a, *xs: fn(p, *xs), g), argnums=(0, 2)))(
        variables, ad, *args)
    assert rel_err(adapted[1], base[1]) > 100 * GRAD_RTOL, "d/dx"
    n_weights = 0
    for (path, w_adapted), (_, w_base) in zip(
            jax.tree_util.tree_flatten_with_path(adapted[0])[0],
            jax.tree_util.tree_flatten_with_path(base[0])[0], strict=True):
        if lj.path_str(path).endswith(("/kernel", "/embedding")):
            n_weights += 1
            assert rel_err(w_adapted, w_base) > 100 * GRAD_RTOL, lj.path_str(path)
    assert n_weights == len(A_SHAPES[name])


def _primitives(jaxpr, out):
    """Counts every primitive of ``jaxpr`` into ``out``, sub-jaxprs (jit, scan) included."""
    for eqn in jaxpr.eqns:
        out[str(eqn.primitive)] = out.get(str(eqn.primitive), 0) + 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    _primitives(getattr(sub, "jaxpr", sub), out)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_custom_grad_routes_every_matmul_through_the_kernel(rng, name):
    """The gradients above go through the hand-written backward: every low-rank
    matmul site is one custom_vjp call with custom_grad=True, none without."""
    fn, variables, ad, args, cfg = _setup(name, rng)
    e = lj.explain(fn, cfg, variables, ad, *args)
    assert e.n_fallbacks == 0, str(e)
    n_dots = sum(rules.get("lowrank_dot", 0) for rules in e.rules.values())
    assert n_dots == len(A_SHAPES[name])       # one matmul per weight (tied: the attend)
    for custom_grad in (True, False):
        jaxpr = jax.make_jaxpr(lj.apply(fn, cfg, custom_grad=custom_grad))(variables, ad, *args)
        n_kernels = _primitives(jaxpr.jaxpr, {}).get("custom_vjp_call", 0)
        assert n_kernels == (n_dots if custom_grad else 0), (custom_grad, n_kernels)


# ----------------------------------------------------------------------------- float64

N_IN, N_OUT, RANK = 24, 12, 4


def _linear(p, x):
    return x @ p["w"]


def _float64_case(rng):
    """float64 params, input, cotangent and adapters (``LoraConfig(dtype=float64)``,
    a non-zero B); call under ``jax.enable_x64(True)``."""
    gen = _gen(rng)
    f64 = lambda shape: jnp.asarray(gen.standard_normal(shape), jnp.float64)  # noqa: E731
    params = {"w": f64((N_IN, N_OUT))}
    x, g = f64((3, 5, N_IN)), f64((3, 5, N_OUT))
    cfg = lj.LoraConfig(rank=RANK, alpha=3.0, targets="w", dtype=jnp.float64)
    node = lj.init(params, cfg, key=rng)["w"]
    ad = {"w": node._replace(b=B_STD * f64(node.b.shape))}
    assert ad["w"].a.dtype == ad["w"].b.dtype == jnp.float64
    return params, ad, cfg, x, g


def _numpy_reference(params, ad, cfg, x, g):
    """y = x @ (W + s a b) and its VJP with g, by hand in numpy float64."""
    w, a, b = (np.asarray(v, np.float64) for v in (params["w"], ad["w"].a, ad["w"].b))
    s = float(ad["w"].scale)
    assert s == cfg.scale_for("w") == 3.0 / RANK
    xf = np.asarray(x, np.float64).reshape(-1, N_IN)
    gf = np.asarray(g, np.float64).reshape(-1, N_OUT)
    dense = w + s * a @ b
    return {"y": (xf @ dense).reshape(*x.shape[:-1], N_OUT),
            "dx": (gf @ dense.T).reshape(x.shape), "dW": xf.T @ gf,
            "da": s * xf.T @ gf @ b.T, "db": s * (xf @ a).T @ gf}


def _check_float64_apply(rng, custom_grad):
    with jax.enable_x64(True):
        params, ad, cfg, x, g = _float64_case(rng)
        want = _numpy_reference(params, ad, cfg, x, g)
        f = lj.apply(_linear, cfg, custom_grad=custom_grad)
        grad = jax.grad(lambda p, a, x: jnp.vdot(f(p, a, x), g), argnums=(0, 1, 2))
        for jit in (False, True):
            y = (jax.jit(f) if jit else f)(params, ad, x)
            dp, dad, dx = (jax.jit(grad) if jit else grad)(params, ad, x)
            got = {"y": y, "dx": dx, "dW": dp["w"], "da": dad["w"].a, "db": dad["w"].b}
            for what, value in got.items():
                assert value.dtype == jnp.float64, (what, jit, value.dtype)
                err = rel_err64(value, want[what])
                assert err <= 1e-12, f"{what} (jit={jit}): relative error {err:.3g} > 1e-12"


@pytest.mark.parametrize("custom_grad", [pytest.param(True),
                                         pytest.param(False, marks=_SLOW)],
                         ids=["custom_grad", "autodiff"])
def test_float64_apply_and_grads_match_numpy(rng, custom_grad):
    """float64 end to end: y, d/dx, d/dW, d/da, d/db == numpy float64 to 1e-12."""
    _check_float64_apply(rng, custom_grad)


@pytest.mark.standard_promotion
def test_float64_custom_grad_values_under_standard_promotion(rng):
    """The same float64 check under JAX's standard promotion (what most users run)."""
    _check_float64_apply(rng, True)


def test_float64_merge_keeps_the_dtype_but_float32_precision(rng):
    """`lj.merge` sums W + s a b in float32 by design (its docstring) and casts back:
    the merged weight is float64 but only float32-accurate. So `lj.apply`, exact in
    float64, is compared with numpy above, and with merge only to float32's precision."""
    with jax.enable_x64(True):
        params, ad, cfg, x, g = _float64_case(rng)
        want = _numpy_reference(params, ad, cfg, x, g)["y"]
        merged = lj.merge(params, ad, cfg)
        assert merged["w"].dtype == jnp.float64
        y_merged = _linear(merged, x)
        assert y_merged.dtype == jnp.float64
        assert rel_err64(y_merged, want) <= 1e-6
        y_apply = lj.apply(_linear, cfg, custom_grad=False)(params, ad, x)
        assert rel_err64(y_merged, y_apply) <= 1e-6
