"""lj.apply: agreement with lj.merge (outputs and adapter grads), explain,
fallbacks, strict mode, dropout, recompilation, errors."""

from __future__ import annotations

import inspect
import pathlib
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import lora_jax as lj
from examples import gpt
from tests._asserts import CompileCounter, assert_trees_close, random_adapters, rel_err
from tests.conftest import SMALL

OUT_RTOL, GRAD_RTOL = 1e-5, 1e-4


# ----------------------------------------------------------------------------- helpers


def _gen(key):
    """A numpy Generator seeded from the test's PRNG key (no per-shape compiles)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())


def _normal(gen, shape, dtype=jnp.float32, std=1.0, mean=0.0):
    return jnp.asarray((mean + std * gen.standard_normal(shape)).astype(np.float32), dtype)


def _ints(gen, shape, high):
    return jnp.asarray(gen.integers(0, high, shape), jnp.int32)


def _adapters(params, config, gen, b_std=0.2):
    return random_adapters(params, config, seed=int(gen.integers(2 ** 31)), b_std=b_std)


def _init(init_fn, *args, gen):
    """Params from ``jax.eval_shape(init_fn, *args)`` filled from numpy.

    Kernels and embeddings ~ N(0, 1/fan_in), norm scales ~ 1, biases small.
    """
    shapes = jax.eval_shape(init_fn, *args)

    def fill(keypath, x):
        name = lj.path_str(keypath).rsplit("/", 1)[-1]
        if name == "scale":
            return _normal(gen, x.shape, x.dtype, 0.1, mean=1.0)
        if name == "bias":
            return _normal(gen, x.shape, x.dtype, 0.1)
        fan_in = x.shape[-2] if len(x.shape) >= 2 else 1
        return _normal(gen, x.shape, x.dtype, 1.0 / np.sqrt(fan_in))

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _cotangents(out, gen):
    return [_normal(gen, x.shape) for x in jax.tree.leaves(out)]


def _contract(out, cts):
    return sum(jnp.vdot(jnp.asarray(o, jnp.float32), c) for o, c in zip(jax.tree.leaves(out), cts))


def check_against_merge(fn, config, params, adapters, *args, gen, jit=True,
                        custom_grad=True, grads=True, fallbacks=0, **kwargs):
    """apply == fn(merge(...)) for outputs and adapter grads; no fallbacks (or as many
    as given).

    Each side is one program returning outputs and grads (one compile each);
    with ``jit=False`` the apply side runs eagerly.
    """
    f = lj.apply(fn, config, custom_grad=custom_grad)
    g = lambda ad: fn(lj.merge(params, ad, config), *args, **kwargs)  # noqa: E731
    cts = _cotangents(jax.eval_shape(g, adapters), gen)

    def out_and_grads(h):
        def run(ad):
            out, vjp = jax.vjp(h, ad)
            return out, (vjp(jax.tree.unflatten(jax.tree.structure(out), cts))[0]
                         if grads else None)
        return run

    apply_side = out_and_grads(lambda ad: f(params, ad, *args, **kwargs))
    out, g1 = (jax.jit(apply_side) if jit else apply_side)(adapters)
    ref, g2 = jax.jit(out_and_grads(g))(adapters)
    assert_trees_close(out, ref, rtol=OUT_RTOL)
    if grads:
        assert_trees_close(g1, g2, rtol=GRAD_RTOL)
    explanation = lj.explain(fn, config, params, adapters, *args, **kwargs)
    assert explanation.n_fallbacks == fallbacks, str(explanation)
    return explanation


def _rules(explanation):
    return {p: set(r) for p, r in explanation.rules.items()}


# ----------------------------------------------------------------------------- hygiene


def test_no_private_jax_imports():
    root = pathlib.Path(lj.__file__).parent
    offenders = [f"{p.name}:{i + 1}" for p in root.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines()) if "jax._src" in line]
    assert not offenders, f"jax._src used in {offenders}; use jax.extend.core instead"


def test_documented_arguments_match_signature():
    for fn in (lj.explain, lj.apply):
        doc = inspect.getdoc(fn)
        args = re.search(r"Args:\n(.*?)(\n\n|\Z)", doc, re.S)
        params = set(inspect.signature(fn).parameters)
        if args:
            documented = set(re.findall(r"^  \**(\w+)", args.group(1), re.M))
            assert documented == params, (fn.__name__, documented, params)


# ----------------------------------------------------------------------------- Linen layers


@pytest.mark.parametrize("custom_grad", [True, False], ids=["custom_grad", "autodiff"])
def test_dense(rng, maybe_jit, custom_grad):
    gen = _gen(rng)
    model = nn.Sequential([nn.Dense(32), nn.gelu, nn.Dense(8)])
    x = _normal(gen, (3, 5, 16))
    variables = _init(model.init, jax.random.key(0), x, gen=gen)
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*/kernel")
    ad = _adapters(variables, cfg, gen)
    e = check_against_merge(model.apply, cfg, variables, ad, x, gen=gen,
                            jit=maybe_jit is jax.jit, custom_grad=custom_grad)
    assert all(r == {"lowrank_dot"} for r in _rules(e).values())


class _MultiHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((4, 8), axis=-1, name="proj_in")(x)       # (d, heads, hd)
        return nn.DenseGeneral(16, axis=(-2, -1), name="proj_out")(jnp.tanh(q))  # (heads, hd, d)


@pytest.mark.parametrize("custom_grad", [True, False], ids=["custom_grad", "autodiff"])
def test_dense_general_multihead_both_directions(rng, custom_grad):
    gen = _gen(rng)
    x = _normal(gen, (2, 6, 16))
    variables = _init(_MultiHead().init, jax.random.key(0), x, gen=gen)
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*/kernel",
                        layouts={r".*/proj_in/kernel": lj.Layout(0, 1, 2),
                                 r".*/proj_out/kernel": lj.Layout(0, 2, 1)})
    ad = _adapters(variables, cfg, gen)
    assert ad["params"]["proj_in"]["kernel"].b.shape == (4, 32)
    assert ad["params"]["proj_out"]["kernel"].a.shape == (32, 4)
    e = check_against_merge(_MultiHead().apply, cfg, variables, ad, x, gen=gen,
                            custom_grad=custom_grad)
    assert all(r == {"lowrank_dot"} for r in _rules(e).values())


class _Einsums(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((16, 4, 8), "btd,dhk->bthk", name="up")(x)
        return nn.Einsum((4, 8, 16), "bthk,hkd->btd", name="down")(jax.nn.relu(h))


def test_einsum(rng):
    gen = _gen(rng)
    x = _normal(gen, (2, 5, 16))
    variables = _init(_Einsums().init, jax.random.key(0), x, gen=gen)
    cfg = lj.LoraConfig(rank=3, alpha=6, targets=r".*/kernel",
                        layouts={r".*/up/kernel": lj.Layout(0, 1, 2)})
    ad = _adapters(variables, cfg, gen)
    e = check_against_merge(_Einsums().apply, cfg, variables, ad, x, gen=gen)
    assert all(r == {"lowrank_dot"} for r in _rules(e).values())


def test_conv(rng):
    gen = _gen(rng)
    model = nn.Sequential([nn.Conv(6, (3, 3)), nn.relu, nn.Conv(5, (3, 3), strides=2)])
    x = _normal(gen, (2, 9, 9, 4))
    variables = _init(model.init, jax.random.key(0), x, gen=gen)
    cfg = lj.LoraConfig(rank=2, alpha=4, targets=r".*/kernel")
    ad = _adapters(variables, cfg, gen)
    e = check_against_merge(model.apply, cfg, variables, ad, x, gen=gen)
    assert all(r == {"lowrank_conv"} for r in _rules(e).values())


class _Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(40, 16, name="embed")
        return embed.attend(jnp.tanh(embed(ids)))


@pytest.mark.parametrize("custom_grad", [True, False], ids=["custom_grad", "autodiff"])
def test_embed_and_tied_output_projection(rng, maybe_jit, custom_grad):
    gen = _gen(rng)
    ids = _ints(gen, (3, 7), 40)
    variables = _init(_Tied().init, jax.random.key(0), ids, gen=gen)
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*/embedding")
    ad = _adapters(variables, cfg, gen)
    e = check_against_merge(_Tied().apply, cfg, variables, ad, ids, gen=gen,
                            jit=maybe_jit is jax.jit, custom_grad=custom_grad)
    assert e.rules["params/embed/embedding"] == {"lowrank_gather": 1, "lowrank_dot": 1}


# ----------------------------------------------------------------------------- the reference decoder


def _gpt(gen, **kw):
    c = gpt.GPTConfig(**{**SMALL.__dict__, **kw})
    model = gpt.GPT(c)
    tokens = jnp.zeros((1, 8), jnp.int32)
    return c, model, _init(model.init, jax.random.key(0), tokens, gen=gen)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tied", "remat", "scan_remat"])
def test_reference_decoder(rng, variant):
    """Dense, Embed and a tied output projection; nn.remat; nn.scan(nn.remat(...))."""
    kw = {"tied": dict(tied=True, n_layers=1), "remat": dict(remat=True, n_layers=1),
          "scan_remat": dict(scan=True, remat=True)}[variant]
    gen = _gen(rng)
    c, model, variables = _gpt(gen, **kw)
    layouts = {r"params/blocks/.*": lj.Layout(1, 1, 1)} if c.scan else {}
    targets = (gpt.TARGETS, r".*/wte/embedding") if c.tied else gpt.TARGETS
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=targets, layouts=layouts)
    ad = _adapters(variables, cfg, gen)
    tokens = _ints(gen, (2, c.max_len), c.vocab)
    e = check_against_merge(model.apply, cfg, variables, ad, tokens, gen=gen)
    n_sites = 6 if c.scan else 6 * c.n_layers
    assert sum(r.get("lowrank_dot", 0) for r in e.rules.values()) == n_sites + c.tied


@pytest.mark.slow
def test_reference_decoder_without_jit(rng):
    gen = _gen(rng)
    c, model, variables = _gpt(gen, n_layers=1)
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=gpt.TARGETS)
    ad = _adapters(variables, cfg, gen)
    tokens = _ints(gen, (2, 8), c.vocab)
    check_against_merge(model.apply, cfg, variables, ad, tokens, gen=gen, jit=False)


@pytest.mark.slow
def test_nnx_reference_model_state_and_pure_dict(rng):
    gen = _gen(rng)
    c = gpt.GPTConfig(**{**SMALL.__dict__, "n_layers": 1})
    abstract = nnx.eval_shape(lambda: gpt.NNXGPT(c, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    state = jax.tree.map(lambda x: _normal(gen, x.shape, x.dtype, 0.2), abstract_state)
    tokens = _ints(gen, (2, 8), c.vocab)
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=gpt.TARGETS)

    def forward(state, tokens):  # split/merge inside the traced function
        return nnx.merge(graphdef, state)(tokens)

    ad = _adapters(state, cfg, gen)
    check_against_merge(forward, cfg, state, ad, tokens, gen=gen)

    def forward_pure(pure, tokens):
        s = jax.tree.map(lambda x: x, abstract_state)
        nnx.replace_by_pure_dict(s, pure)
        return nnx.merge(graphdef, s)(tokens)

    pure = nnx.to_pure_dict(state)
    ad_pure = _adapters(pure, cfg, gen)
    check_against_merge(forward_pure, cfg, pure, ad_pure, tokens, gen=gen)


@pytest.mark.standard_promotion
def test_bf16_compute_with_f32_adapters(rng):
    gen = _gen(rng)
    c, model, variables = _gpt(gen, n_layers=1, dtype=jnp.bfloat16)
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=gpt.TARGETS)
    ad = _adapters(variables, cfg, gen)
    tokens = _ints(gen, (2, 8), c.vocab)
    out = jax.jit(lj.apply(model.apply, cfg))(variables, ad, tokens)
    ref = jax.jit(lambda v, ad: model.apply(lj.merge(v, ad, cfg), tokens))(variables, ad)
    assert out.dtype == ref.dtype == jnp.bfloat16
    assert rel_err(out, ref) < 5e-2
    assert lj.explain(model.apply, cfg, variables, ad, tokens).n_fallbacks == 0


@pytest.mark.parametrize("custom_grad", [True, False], ids=["custom_grad", "autodiff"])
def test_bf16_delta_is_added_in_f32_before_the_cast(rng, custom_grad):
    """One bf16 matmul: y == bf16(x @ W [f32 accumulation] + s (x a) b [f32])."""
    gen = _gen(rng)
    params = {"w": _normal(gen, (32, 24))}
    x = _normal(gen, (5, 32), jnp.bfloat16)

    def fn(p, x):
        return x @ p["w"].astype(jnp.bfloat16)

    cfg = lj.LoraConfig(rank=4, alpha=8, targets="w")
    ad = _adapters(params, cfg, gen)
    y = jax.jit(lj.apply(fn, cfg, custom_grad=custom_grad))(params, ad, x)

    @jax.jit
    def expected(params, w, x):
        base = lax.dot_general(x, params["w"].astype(jnp.bfloat16), (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
        return (base + w.scale * (x.astype(jnp.float32) @ w.a) @ w.b).astype(jnp.bfloat16)

    assert y.dtype == jnp.bfloat16
    assert rel_err(y, expected(params, ad["w"], x)) <= 2 ** -7  # one bf16 rounding at most


# ----------------------------------------------------------------------------- plain functions


def _mlp(p, x):
    h = jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"][None])
    return h @ p["l2"]["w"] + p["l2"]["b"][None]


def _mlp_params(gen):
    return {"l1": {"w": _normal(gen, (12, 20), std=0.3), "b": _normal(gen, (20,), std=0.1)},
            "l2": {"w": _normal(gen, (20, 6), std=0.3), "b": _normal(gen, (6,), std=0.1)}}


def test_plain_function_mlp(rng, maybe_jit):
    gen = _gen(rng)
    params = _mlp_params(gen)
    cfg = lj.LoraConfig(rank=3, alpha=6, targets=r".*/w")
    ad = _adapters(params, cfg, gen)
    check_against_merge(_mlp, cfg, params, ad, _normal(gen, (7, 12)), gen=gen,
                        jit=maybe_jit is jax.jit)


def test_nested_jit(rng, maybe_jit):
    gen = _gen(rng)
    params = _mlp_params(gen)

    @jax.jit
    def layer(w, b, x):
        return jax.jit(lambda w, x: x @ w)(w, x) + b[None]

    def fn(p, x):
        return jax.jit(lambda p, x: layer(p["l2"]["w"], p["l2"]["b"],
                                          jnp.tanh(layer(p["l1"]["w"], p["l1"]["b"], x))))(p, x)

    cfg = lj.LoraConfig(rank=3, alpha=6, targets=r".*/w")
    ad = _adapters(params, cfg, gen)
    check_against_merge(fn, cfg, params, ad, _normal(gen, (7, 12)), gen=gen,
                        jit=maybe_jit is jax.jit)


def test_shape_ops_before_the_matmul(rng):
    """transpose, reshape, slices, split, broadcast, stacked indexing, casts."""
    gen = _gen(rng)
    params = {"w": _normal(gen, (16, 24), std=0.25), "qkv": _normal(gen, (16, 48), std=0.25),
              "stack": _normal(gen, (3, 16, 8), std=0.25)}

    def fn(p, x, i):
        w = p["w"]
        y = x @ w.T.T
        y = y + jnp.einsum("nd,dhk->nhk", x, w.reshape(16, 4, 6)).reshape(-1, 24)
        y = y + jnp.pad(x @ w[:, :12], ((0, 0), (0, 12)))
        y = y + (x[:, :8] @ w[8:]) + (x @ w.astype(jnp.float32).copy())
        y = y + jnp.squeeze(x[None] @ w[None], 0)
        q, kk, v = jnp.split(p["qkv"], 3, axis=1)
        att = (x @ q) * (x @ kk) + x @ v
        s = p["stack"]
        return y.sum(-1) + att.sum(-1) + (x @ s[0]).sum(-1) + (x @ s[i]).sum(-1)

    cfg = lj.LoraConfig(rank=4, alpha=8, targets=("w", "qkv", "stack"),
                        layouts={"stack": lj.Layout(1, 1, 1)})
    ad = _adapters(params, cfg, gen)
    e = check_against_merge(fn, cfg, params, ad, _normal(gen, (5, 16)), jnp.int32(2), gen=gen)
    assert e.rules == {"w": {"lowrank_dot": 6}, "qkv": {"lowrank_dot": 3},
                       "stack": {"lowrank_dot": 2}}


def test_tied_transposed_use_and_weight_on_the_left(rng):
    gen = _gen(rng)
    params = {"e": _normal(gen, (30, 12), std=0.3)}

    def fn(p, x):
        h = x @ p["e"]                       # (n, 30) @ (30, 12): the input side
        logits = h @ p["e"].T                # contracts the output axis
        return logits + (p["e"] @ h.T).T     # the weight as the left operand

    cfg = lj.LoraConfig(rank=3, alpha=6, targets="e")
    ad = _adapters(params, cfg, gen)
    for custom_grad in (True, False):
        e = check_against_merge(fn, cfg, params, ad, _normal(gen, (4, 30)), gen=gen,
                                custom_grad=custom_grad)
        assert e.rules["e"] == {"lowrank_dot": 3}


def test_cond_rewrites_each_branch(rng):
    gen = _gen(rng)
    params = _mlp_params(gen)

    def fn(p, x, flag):
        return lax.cond(flag, lambda x: _mlp(p, x), lambda x: -_mlp(p, jnp.tanh(x)), x)

    cfg = lj.LoraConfig(rank=3, alpha=6, targets=r".*/w")
    ad = _adapters(params, cfg, gen)
    x = _normal(gen, (7, 12))
    for flag in (True, False):
        e = check_against_merge(fn, cfg, params, ad, x, jnp.asarray(flag), gen=gen)
        assert e.rules["l1/w"] == {"lowrank_dot": 2}


def test_scan_over_a_stacked_weight_and_a_closed_over_one(rng):
    gen = _gen(rng)
    params = {"stack": _normal(gen, (3, 8, 8), std=0.3), "w": _normal(gen, (8, 8), std=0.3)}

    def fn(p, x):
        def body(h, w):
            return jnp.tanh(h @ w + h @ p["w"]), h.sum()
        return lax.scan(body, x, p["stack"])

    cfg = lj.LoraConfig(rank=2, alpha=4, targets=("stack", "w"),
                        layouts={"stack": lj.Layout(1, 1, 1)})
    ad = _adapters(params, cfg, gen)
    e = check_against_merge(fn, cfg, params, ad, _normal(gen, (4, 8)), gen=gen)
    assert e.rules == {"stack": {"lowrank_dot": 1}, "w": {"lowrank_dot": 1}}


def test_train_leaves_replace_params(rng, maybe_jit):
    gen = _gen(rng)
    params = _mlp_params(gen)
    cfg = lj.LoraConfig(rank=3, alpha=6, targets=r"l1/w", train=(r"l2/w", r".*/b"))
    ad = _adapters(params, cfg, gen)    # train leaves: the base value plus noise
    x = _normal(gen, (7, 12))
    out = (maybe_jit(lj.apply(_mlp, cfg)))(params, ad, x)
    assert rel_err(out, _mlp(lj.merge(params, ad, cfg), x)) <= OUT_RTOL
    assert rel_err(out, _mlp(params, x)) > 1e-2
    check_against_merge(_mlp, cfg, params, ad, x, gen=gen, jit=maybe_jit is jax.jit)


def test_zero_b_is_the_base_model(rng):
    gen = _gen(rng)
    params = _mlp_params(gen)
    cfg = lj.LoraConfig(rank=3, targets=r".*/w")
    ad = _adapters(params, cfg, gen, b_std=0.0)
    x = _normal(gen, (7, 12))
    assert rel_err(jax.jit(lj.apply(_mlp, cfg))(params, ad, x), _mlp(params, x)) <= OUT_RTOL


def test_custom_grad_false_supports_forward_mode(rng):
    gen = _gen(rng)
    params = _mlp_params(gen)
    cfg = lj.LoraConfig(rank=3, targets=r".*/w")
    ad = _adapters(params, cfg, gen)
    x, dx = _normal(gen, (7, 12)), _normal(gen, (7, 12))
    f = lj.apply(_mlp, cfg, custom_grad=False)
    _, t1 = jax.jvp(lambda x: f(params, ad, x), (x,), (dx,))
    _, t2 = jax.jvp(lambda x: _mlp(lj.merge(params, ad, cfg), x), (x,), (dx,))
    assert rel_err(t1, t2) <= OUT_RTOL


def test_quantized_base(rng):
    gen = _gen(rng)
    params = {"l1": {"w": _normal(gen, (64, 32), std=0.2), "b": jnp.zeros(32)},
              "l2": {"w": _normal(gen, (32, 64), std=0.2), "b": jnp.zeros(64)}}
    q = lj.quantize(params, targets=r".*/w")
    cfg = lj.LoraConfig(rank=3, alpha=6, targets=r"l1/w")     # l2/w: quantized and frozen
    ad = _adapters(q, cfg, gen)
    x = _normal(gen, (5, 64))
    out = jax.jit(lj.apply(_mlp, cfg, strict=True))(q, ad, x)
    assert rel_err(out, _mlp(lj.merge(lj.dequantize(q), ad, cfg), x)) <= OUT_RTOL
    assert lj.explain(_mlp, cfg, q, ad, x).rules == {"l1/w": {"lowrank_dot": 1}}


# ----------------------------------------------------------------------------- fallbacks


@jax.custom_vjp
def _opaque_matmul(x, w):
    return x @ w


_opaque_matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))


def _uses_custom_vjp(p, x):
    return _opaque_matmul(x, p["l1"]["w"]) @ p["l2"]["w"]


def test_fallback_custom_vjp_is_correct_and_reported(rng):
    gen = _gen(rng)
    params = _mlp_params(gen)
    cfg = lj.LoraConfig(rank=3, alpha=6, targets=r".*/w")
    ad = _adapters(params, cfg, gen)
    x = _normal(gen, (7, 12))
    with pytest.warns(lj.LoraWarning, match=r"l1/w: .*custom_vjp_call"):
        check_against_merge(_uses_custom_vjp, cfg, params, ad, x, gen=gen, fallbacks=1)
    e = lj.explain(_uses_custom_vjp, cfg, params, ad, x)
    assert e.rules == {"l1/w": {"materialized": 1}, "l2/w": {"lowrank_dot": 1}}
    assert e.fallbacks["l1/w"][0][0] == "custom_vjp_call"
    assert "custom_vjp" in e.fallbacks["l1/w"][0][1]
    assert "materialized at `custom_vjp_call`" in str(e)


def test_fallback_while_loop(rng):
    gen = _gen(rng)
    params = {"w": _normal(gen, (8, 8), std=0.3)}

    def fn(p, x):
        def body(c):
            return c[0] + 1, jnp.tanh(c[1] @ p["w"])
        return lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    cfg = lj.LoraConfig(rank=2, alpha=4, targets="w")
    ad = _adapters(params, cfg, gen)
    x = _normal(gen, (4, 8))
    with pytest.warns(lj.LoraWarning, match=r"w: .*`while`"):
        check_against_merge(fn, cfg, params, ad, x, gen=gen, grads=False, fallbacks=1)
    e = lj.explain(fn, cfg, params, ad, x)
    assert e.rules["w"] == {"materialized": 1} and e.fallbacks["w"][0][0] == "while"


def test_fallback_non_matmul_use_and_one_warning_per_path_per_trace(rng):
    gen = _gen(rng)
    params = {"w": _normal(gen, (8, 8))}

    def fn(p, x):  # two non-matmul uses and one matmul
        return x @ p["w"] + jnp.sin(p["w"]).sum() + jnp.abs(p["w"]).max()

    cfg = lj.LoraConfig(rank=2, alpha=4, targets="w")
    ad = _adapters(params, cfg, gen)
    x = _normal(gen, (4, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = jax.jit(lj.apply(fn, cfg))(params, ad, x)
    lora_warnings = [w for w in caught if issubclass(w.category, lj.LoraWarning)]
    assert len(lora_warnings) == 1 and str(lora_warnings[0].message).startswith("w: ")
    assert rel_err(out, fn(lj.merge(params, ad, cfg), x)) <= OUT_RTOL
    e = lj.explain(fn, cfg, params, ad, x)
    assert e.rules["w"] == {"lowrank_dot": 1, "materialized": 2}
    assert e.n_fallbacks == 2


def test_strict_raises_naming_path_and_primitive(rng):
    gen = _gen(rng)
    params = _mlp_params(gen)
    cfg = lj.LoraConfig(rank=3, targets=r".*/w")
    ad = _adapters(params, cfg, gen)
    x = _normal(gen, (2, 12))
    with pytest.raises(ValueError, match=r"l1/w: .*strict=True.*`custom_vjp_call`"):
        lj.apply(_uses_custom_vjp, cfg, strict=True)(params, ad, x)
    jax.jit(lj.apply(_mlp, cfg, strict=True))(params, ad, x)   # all low-rank: no error


def test_unused_target_is_reported(rng):
    gen = _gen(rng)
    params = _mlp_params(gen)
    cfg = lj.LoraConfig(rank=3, targets=r".*/w")
    ad = _adapters(params, cfg, gen)
    e = lj.explain(lambda p, x: x @ p["l1"]["w"], cfg, params, ad, _normal(gen, (2, 12)))
    assert e.rules == {"l1/w": {"lowrank_dot": 1}, "l2/w": {"unused": 1}}
    assert "2 targets, 0 fallbacks" in str(e)


# ----------------------------------------------------------------------------- dropout


def _dropout_setup(gen, rate=0.5, n=4096, d=16):
    """W = 0 and y = dropout(x)[:, 0] on every output (a picks input 0, b copies it)."""
    params = {"w": jnp.zeros((d, d))}
    cfg = lj.LoraConfig(rank=1, alpha=1, targets="w", dropout=rate)
    a = np.zeros((d, 1), np.float32)
    a[0, 0] = 1.0
    ad = {"w": lj.LoraWeights(jnp.asarray(a), jnp.ones((1, d)), jnp.float32(1.0))}
    x = jnp.asarray(1.0 + gen.uniform(size=(n, d)), jnp.float32)
    return params, cfg, ad, x


@pytest.mark.parametrize("custom_grad", [True, False], ids=["custom_grad", "autodiff"])
def test_dropout_statistics(rng, custom_grad):
    params, cfg, ad, x = _dropout_setup(_gen(rng))
    f = jax.jit(lj.apply(lambda p, x: x @ p["w"], cfg, custom_grad=custom_grad))
    y = np.asarray(f(params, ad, x, lora_rng=rng))
    x0 = np.asarray(x[:, 0])
    kept = y[:, 0] != 0
    # every entry is dropped or x / (1 - rate), the same on every output
    np.testing.assert_allclose(y[kept, 0], 2 * x0[kept], rtol=1e-6)
    np.testing.assert_array_equal(y, np.repeat(y[:, :1], y.shape[1], axis=1))
    assert abs(kept.mean() - 0.5) < 0.05, kept.mean()        # ~6 sigma at n = 4096
    assert abs(y[:, 0].sum() / x0.sum() - 1.0) < 0.1          # unbiased: E[y] = x
    var = y[:, 0].var() / (x0 ** 2).mean()                    # Var = x^2 p/(1-p) = x^2
    assert 0.85 < var < 1.15, var
    # the frozen path never sees dropout; without a key the result is exact
    y_eye = np.asarray(f({"w": jnp.eye(16)}, ad, x, lora_rng=rng))
    np.testing.assert_allclose(y_eye - y, np.asarray(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(f(params, ad, x))[:, 0], x0)


def test_dropout_keys(rng):
    params, cfg, ad, x = _dropout_setup(_gen(rng), n=256)
    k1, k2 = jax.random.split(rng)
    f = jax.jit(lj.apply(lambda p, x: x @ p["w"], cfg))
    a, b, c = (np.asarray(f(params, ad, x, lora_rng=k)) for k in (k1, k1, k2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    f0 = jax.jit(lj.apply(lambda p, x: x @ p["w"], cfg.replace(dropout=0.0)))
    np.testing.assert_array_equal(np.asarray(f0(params, ad, x, lora_rng=k1)),
                                  np.asarray(f0(params, ad, x)))


def test_dropout_differs_per_layer_in_a_scan(rng):
    d, n_layers = 8, 3
    params = {"stack": jnp.zeros((n_layers, d, d))}
    a = np.zeros((n_layers, d, 1), np.float32)
    a[:, 0, 0] = 1.0
    ad = {"stack": lj.LoraWeights(jnp.asarray(a), jnp.ones((n_layers, 1, d)), jnp.float32(1.0))}
    cfg = lj.LoraConfig(rank=1, alpha=1, targets="stack", dropout=0.5,
                        layouts={"stack": lj.Layout(1, 1, 1)})

    def fn(p, x):
        return lax.scan(lambda c, w: (c, x @ w), 0.0, p["stack"])[1]

    x = jnp.ones((64, d))
    ys = np.asarray(jax.jit(lj.apply(fn, cfg))(params, ad, x, lora_rng=rng))
    masks = [ys[i, :, 0] != 0 for i in range(n_layers)]
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])
    # the gradient is that of the dropped-out model: d sum(y) / d a[l, 0, 0] = 2 * kept * 8
    g = jax.jit(jax.grad(lambda ad: lj.apply(fn, cfg)(params, ad, x, lora_rng=rng).sum()))(ad)
    np.testing.assert_allclose(np.asarray(g["stack"].a[:, 0, 0]),
                               [2.0 * d * m.sum() for m in masks], rtol=1e-6)


# ----------------------------------------------------------------------------- recompiles


@pytest.mark.standard_promotion
def test_no_recompile_on_second_step_adapter_swap_or_alpha_change(rng):
    import optax

    gen = _gen(rng)
    params = _mlp_params(gen)
    cfg = lj.LoraConfig(rank=3, alpha=6, targets=r".*/w")
    f = lj.apply(_mlp, cfg)
    x = _normal(gen, (7, 12))

    def loss(params, adapters, x):
        return jnp.mean(f(params, adapters, x) ** 2)

    tx = lj.optimizer(optax.adam(1e-2))
    step = lj.make_train_step(loss, tx, donate=False)
    ad, other = _adapters(params, cfg, gen), _adapters(params, cfg, gen)
    realpha = _adapters(params, cfg.replace(alpha=32.0), gen)
    opt = tx.init(ad)
    fwd = jax.jit(f)
    jax.block_until_ready(step(params, ad, opt, x))
    jax.block_until_ready(fwd(params, ad, x))
    with CompileCounter() as cc:
        ad2, opt2, _ = step(params, ad, opt, x)          # second step
        step(params, ad2, opt2, x)
        step(params, other, opt, x)                      # swapped adapters
        step(params, realpha, opt, x)                    # another alpha
        out = jax.block_until_ready(fwd(params, realpha, x))
    assert cc.count == 0
    assert float(realpha["l1"]["w"].scale) == pytest.approx(32.0 / 3)
    # Outside jit the scale is checked against the config: merge with the adapters' own.
    assert rel_err(out, _mlp(lj.merge(params, realpha, cfg.replace(alpha=32.0)), x)) <= OUT_RTOL


# ----------------------------------------------------------------------------- errors


def test_errors(rng):
    gen = _gen(rng)
    params = _mlp_params(gen)
    cfg = lj.LoraConfig(rank=3, targets=r".*/w")
    ad = _adapters(params, cfg, gen)
    x = jnp.ones((2, 12))
    with pytest.raises(TypeError, match="fn must be callable"):
        lj.apply("model.apply", cfg)
    with pytest.raises(TypeError, match="config must be a lj.LoraConfig"):
        lj.apply(_mlp, {"rank": 3})
    with pytest.raises(TypeError, match="config must be a lj.LoraConfig"):
        lj.explain(_mlp, None, params, ad, x)
    with pytest.raises(TypeError, match="strict must be a bool"):
        lj.apply(_mlp, cfg, strict="yes")
    with pytest.raises(TypeError, match="custom_grad must be a bool"):
        lj.apply(_mlp, cfg, custom_grad=1)
    adapter_set = jax.tree.map(lambda n: jax.tree.map(lambda v: jnp.stack([v, v]), n), ad,
                               is_leaf=lj.is_lora)
    with pytest.raises(ValueError, match=r"l1/w: adapters hold a set of 2 adapters"):
        lj.apply(_mlp, cfg)(params, adapter_set, x)
    with pytest.raises(ValueError, match="the adapter tree does not mirror params"):
        lj.apply(_mlp, cfg)(params, {"l1": ad["l1"]}, x)
    with pytest.raises(ValueError, match=r"l2/w: the config targets this leaf"):
        lj.apply(_mlp, cfg)(params, {"l1": ad["l1"], "l2": {"w": None, "b": None}}, x)
