"""Mixture of LoRAs (`lj.apply_mixture`, `lj.init_router`, `lj.Router`): per-token
routing over an adapter set against an independent float64 numpy reference of
``y = x W + sum_i g_i(x) s_i (x a_i) b_i`` (softmax and top-k gates; an MLP, an
attention block with DenseGeneral heads, nn.scan layers, sliced and reshaped
weights, an NF4 base), its properties (top-k = n is the softmax, top-1 is the
chosen adapter alone, zero B is the base, zero routers are the mean adapter),
router gradients against jax.grad of a float64 reference, router-only and joint
training, no recompilation, and every error branch.

Tolerances: float32 outputs within 1e-5 relative (max-abs over max-abs) of the
float64 reference; float64 gradients within 1e-9. Top-k gates jump where two
logits tie at the k-th place, so a float32 run and the float64 reference may
pick differently on tokens whose logits nearly tie there: outputs are compared
on tokens whose top-k margin (k-th minus (k+1)-th logit) is at least 1e-3 at
every site, and a test fails unless most tokens qualify."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import lora_jax as lj
from tests._asserts import CompileCounter, assert_close, random_adapters, rel_err

OUT_RTOL = 1e-5       # float32 output vs the float64 reference
GRAD_RTOL = 1e-9      # float64 gradients vs jax.grad of the float64 reference
MARGIN = 1e-3         # top-k: tokens whose k-th/(k+1)-th logits are closer are not compared


def _gen(rng):
    return np.random.default_rng(int(np.asarray(jax.random.key_data(rng)).ravel()[-1])
                                 & 0x7FFFFFFF)


def _set(params, configs, gen, b_std=0.3):
    """An adapter set of random adapters with non-zero B, one per config."""
    return lj.adapter_set({name: (random_adapters(params, cfg, seed=int(gen.integers(2**31)),
                                                  b_std=b_std), cfg)
                           for name, cfg in configs.items()})


def _router(aset, gen, *, top_k=None, temperature=1.0, std=1.0):
    """Routers with logits of a few units (so gates differ between tokens)."""
    r = lj.init_router(aset, key=jax.random.key(int(gen.integers(2**31))), top_k=top_k,
                       temperature=temperature, std=std)
    return r


def _np(x):
    return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------- the reference


def _gates_np(z, top_k):
    """float64 gates over the last axis, and each token's top-k margin (inf for softmax)."""
    n = z.shape[-1]
    if top_k is None or top_k >= n:
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True), np.full(z.shape[:-1], np.inf)
    order = np.argsort(-z, axis=-1, kind="stable")
    zs = np.take_along_axis(z, order, -1)
    margin = zs[..., top_k - 1] - zs[..., top_k]
    keep = np.zeros(z.shape, bool)
    np.put_along_axis(keep, order[..., :top_k], True, -1)
    e = np.where(keep, np.exp(z - z.max(-1, keepdims=True)), 0.0)
    return e / e.sum(-1, keepdims=True), margin


class _Ref:
    """The formula per site in float64; records each token's smallest top-k margin."""

    def __init__(self, aset, router):
        self.nodes = {p: n for p, n in _paths(aset.adapters) if n is not None}
        self.routers = dict(_paths(router.weights))
        self.top_k, self.temperature = router.top_k, router.temperature
        self.margin = None

    def site(self, path, x, w, layer=None):
        """``x (..., in) @ w (in, out)`` gated: the set's node at ``path`` (layer ``layer``)."""
        node, r = self.nodes[path], _np(self.routers[path])
        a, b, s = _np(node.a), _np(node.b), _np(node.scale)
        if layer is not None:
            a, b, r = a[:, layer], b[:, layer], r[layer]
        g, margin = _gates_np((x @ r) / self.temperature, self.top_k)
        self.margin = margin if self.margin is None else np.minimum(self.margin, margin)
        y = x @ w
        for i in range(a.shape[0]):
            y = y + g[..., i:i + 1] * s[i] * ((x @ a[i]) @ b[i])
        return y


def _paths(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is None or lj.is_lora(x))
    return [(lj.path_str(p), n) for p, n in flat]


def _compare(got, want, margin, what, *, min_frac=0.5):
    """``got`` vs ``want`` on the tokens (leading axes) whose top-k margin is >= MARGIN."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    ok = np.ones(want.shape[:1], bool) if margin is None else margin >= MARGIN
    assert ok.mean() >= min_frac, f"{what}: only {ok.mean():.2f} of the tokens compared"
    err = np.abs(got - want)[ok].max() / np.abs(want[ok]).max()
    assert err <= OUT_RTOL, f"{what}: relative error {err:.3g} > {OUT_RTOL:g}"


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(24, name="fc1")(x))
        return nn.Dense(10, name="fc2")(h)


def _mlp_ref(ref, p, x):
    p = p["params"]
    h = np.tanh(ref.site("params/fc1/kernel", x, _np(p["fc1"]["kernel"])) + _np(p["fc1"]["bias"]))
    return ref.site("params/fc2/kernel", h, _np(p["fc2"]["kernel"])) + _np(p["fc2"]["bias"])


H, DH, D, F = 2, 4, 8, 16


class Block(nn.Module):
    """Attention with DenseGeneral heads (q, k, v, o) and an MLP."""

    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.DenseGeneral((H, DH), name=n)(x) for n in ("q", "k", "v"))
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(DH), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v)
        y = x + nn.DenseGeneral(D, axis=(-2, -1), name="o")(o)
        return y + nn.Dense(D, name="fc2")(jnp.tanh(nn.Dense(F, name="fc1")(y)))


_BLOCK_LAYOUTS = {r".*/(q|k|v)/kernel": lj.Layout(0, 1, 2), r".*/o/kernel": lj.Layout(0, 2, 1)}


def _block_ref(ref, p, x):
    p = {k: {n: _np(v) for n, v in d.items()} for k, d in p["params"].items()}
    bt = x.shape[:2]

    def proj(name):
        w = p[name]["kernel"].reshape(D, H * DH)
        return (ref.site(f"params/{name}/kernel", x, w) + p[name]["bias"].reshape(-1)).reshape(
            *bt, H, DH)

    q, k, v = proj("q"), proj("k"), proj("v")
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(DH)
    att = np.exp(s - s.max(-1, keepdims=True))
    att = att / att.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(*bt, H * DH)
    y = x + ref.site("params/o/kernel", o, p["o"]["kernel"].reshape(H * DH, D)) + p["o"]["bias"]
    h = np.tanh(ref.site("params/fc1/kernel", y, p["fc1"]["kernel"]) + p["fc1"]["bias"])
    return y + ref.site("params/fc2/kernel", h, p["fc2"]["kernel"]) + p["fc2"]["bias"]


L_LAYERS = 3


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(D, name="dense")(h)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=L_LAYERS)
        return stack(name="layers")(x, None)[0]


def _scanned_ref(ref, p, x):
    dense = p["params"]["layers"]["dense"]
    k, bias = _np(dense["kernel"]), _np(dense["bias"])
    for layer in range(L_LAYERS):
        x = np.tanh(ref.site("params/layers/dense/kernel", x, k[layer], layer) + bias[layer])
    return x


def _linen(model, gen, x):
    variables = model.init(jax.random.key(int(gen.integers(2**31))), x)
    return jax.tree.map(lambda v: v * 1.0, variables)


# ----------------------------------------------------------------------------- vs the reference


@pytest.mark.parametrize("top_k", [None, 2])
def test_mlp_matches_the_formula_per_token(rng, maybe_jit, top_k):
    gen = _gen(rng)
    x = jnp.asarray(gen.standard_normal((4, 6, 16)), jnp.float32)
    params = _linen(MLP(), gen, x)
    c2 = lj.LoraConfig(rank=2, alpha=4, targets=r".*/kernel")
    c4 = lj.LoraConfig(rank=4, alpha=4, targets=r".*/kernel", use_rslora=True)
    c3 = lj.LoraConfig(rank=3, alpha=6, targets=r".*fc1/kernel")    # leaves fc2 alone
    aset = _set(params, {"a": c2, "b": c4, "c": c3, "d": c2}, gen)
    router = _router(aset, gen, top_k=top_k, temperature=0.7)
    got = maybe_jit(lj.apply_mixture(MLP().apply))(params, aset, router, x)
    ref = _Ref(aset, router)
    want = _mlp_ref(ref, params, _np(x))
    _compare(got, want, ref.margin, f"mlp top_k={top_k}")


@pytest.mark.slow
def test_attention_block_matches_the_formula(rng):
    """Softmax gates on q, k, v ((D) -> (H, DH)), o ((H, DH) -> D: a 2-axis input, so a
    2-axis router) and the MLP; q, k and v read one input, each with its own router."""
    gen = _gen(rng)
    x = jnp.asarray(gen.standard_normal((2, 5, D)), jnp.float32)
    params = _linen(Block(), gen, x)
    cfg = lj.LoraConfig(rank=2, alpha=4, targets=r".*/kernel", layouts=_BLOCK_LAYOUTS)
    aset = _set(params, {"a": cfg, "b": cfg.replace(rank=3), "c": cfg}, gen)
    router = _router(aset, gen)
    assert router.weights["params"]["o"]["kernel"].shape == (H * DH, 3)
    got = jax.jit(lj.apply_mixture(Block().apply))(params, aset, router, x)
    _compare(got, _block_ref(_Ref(aset, router), params, _np(x)), None, "attention block")


@pytest.mark.parametrize("top_k", [None, 1])
def test_scanned_layers_route_per_layer(rng, maybe_jit, top_k):
    """nn.scan over stacked kernels (L, D, D), Layout(1, 1, 1): routers (L, D, n), layer l
    gated by its own slice."""
    gen = _gen(rng)
    x = jnp.asarray(gen.standard_normal((3, 4, D)), jnp.float32)
    params = _linen(Scanned(), gen, x)
    cfg = lj.LoraConfig(rank=2, targets=r".*/kernel", layouts={r".*": lj.Layout(1, 1, 1)})
    aset = _set(params, {"a": cfg, "b": cfg.replace(rank=4), "c": cfg}, gen)
    router = _router(aset, gen, top_k=top_k)
    assert router.weights["params"]["layers"]["dense"]["kernel"].shape == (L_LAYERS, D, 3)
    got = maybe_jit(lj.apply_mixture(Scanned().apply))(params, aset, router, x)
    ref = _Ref(aset, router)
    _compare(got, _scanned_ref(ref, params, _np(x)), ref.margin, f"scan top_k={top_k}")


def _sliced_fn(p, x):
    """A fused projection split by slices, a 3-D weight reshaped to a matrix, a transpose."""
    qkv = x @ p["qkv"]
    q, v = qkv[..., :6], qkv[..., 6:]
    u = v @ p["w3"].reshape(6, 8)
    return jnp.tanh(q).sum(-1, keepdims=True) + u @ p["wt"].T.T


def test_sliced_reshaped_and_transposed_weights(rng, maybe_jit):
    gen = _gen(rng)
    params = {"qkv": jnp.asarray(gen.standard_normal((8, 12)), jnp.float32),
              "w3": jnp.asarray(gen.standard_normal((6, 2, 4)), jnp.float32),
              "wt": jnp.asarray(gen.standard_normal((8, 5)), jnp.float32)}
    cfg = lj.LoraConfig(rank=2, targets=".*", layouts={"w3": lj.Layout(0, 1, 2)})
    aset = _set(params, {"a": cfg, "b": cfg.replace(rank=3), "c": cfg}, gen)
    router = _router(aset, gen, top_k=2)
    x = jnp.asarray(gen.standard_normal((20, 8)), jnp.float32)
    got = maybe_jit(lj.apply_mixture(_sliced_fn))(params, aset, router, x)
    ref = _Ref(aset, router)
    xn = _np(x)
    qkv = ref.site("qkv", xn, _np(params["qkv"]))
    u = ref.site("w3", qkv[..., 6:], _np(params["w3"]).reshape(6, 8))
    want = np.tanh(qkv[..., :6]).sum(-1, keepdims=True) + ref.site("wt", u, _np(params["wt"]))
    _compare(got, want, ref.margin, "sliced")


def _views_fn(p, x, i):
    """A reversed input axis, a dynamic slice of the outputs, a broadcast copy."""
    flipped = x @ jnp.flip(p["w"], 0)
    window = x @ lax.dynamic_slice_in_dim(p["w"], i, 3, axis=1)
    copies = jnp.einsum("ti,kio->tko", x, jnp.broadcast_to(p["w"], (2, *p["w"].shape)))
    return flipped, window, copies


def test_reversed_dynamic_sliced_and_broadcast_views(rng):
    gen = _gen(rng)
    params, aset = _single(gen)
    router = _router(aset, gen, top_k=2)
    x = jnp.asarray(gen.standard_normal((11, 12)), jnp.float32)
    i = int(gen.integers(0, 8))
    got = jax.jit(lj.apply_mixture(_views_fn))(params, aset, router, x, jnp.int32(i))
    ref = _Ref(aset, router)
    w = _np(params["w"])
    full = ref.site("w", _np(x), w)
    flipped = ref.site("w", _np(x)[:, ::-1], w)       # x @ flip(W, 0) == flip(x) @ W
    _compare(got[0], flipped, ref.margin, "reversed")
    _compare(got[1], full[:, i:i + 3], ref.margin, "dynamic slice")
    _compare(got[2], np.stack([full, full], 1), ref.margin, "broadcast")


class _NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(16, 24, rngs=rngs)
        self.fc2 = nnx.Linear(24, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


def test_nnx_pure_state(rng):
    """An NNX model: its pure-dict state as params, split/merge inside the function."""
    gen = _gen(rng)
    graphdef, state = nnx.split(_NNXMLP(nnx.Rngs(int(gen.integers(2**31)))))
    pure = nnx.to_pure_dict(state)

    def forward(pure, x):
        s = jax.tree.map(lambda v: v, state)
        nnx.replace_by_pure_dict(s, pure)
        return nnx.merge(graphdef, s)(x)

    cfg = lj.LoraConfig(rank=2, targets=r".*/kernel")
    aset = _set(pure, {"a": cfg, "b": cfg.replace(rank=4), "c": cfg}, gen)
    router = _router(aset, gen, top_k=2)
    x = jnp.asarray(gen.standard_normal((3, 5, 16)), jnp.float32)
    got = jax.jit(lj.apply_mixture(forward))(pure, aset, router, x)
    ref = _Ref(aset, router)
    p = {k: {n: _np(v) for n, v in d.items()} for k, d in pure.items()}
    h = np.tanh(ref.site("fc1/kernel", _np(x), p["fc1"]["kernel"]) + p["fc1"]["bias"])
    want = ref.site("fc2/kernel", h, p["fc2"]["kernel"]) + p["fc2"]["bias"]
    _compare(got, want, ref.margin, "nnx")


def _remat_cond_fn(p, x):
    def body(p, x):
        return lax.cond(jnp.sum(x) > 0, lambda: x @ p["w"], lambda: -(x @ p["w"]))
    return jax.checkpoint(body)(p, x)


def test_remat_cond_and_dropout(rng):
    """The mixture through remat and cond (its router travels with the factors);
    LoRA dropout: no key is the exact formula, a key draws masks on the LoRA
    branch only (the same key, the same masks)."""
    gen = _gen(rng)
    params = {"w": jnp.asarray(gen.standard_normal((12, 10)), jnp.float32)}
    cfg = lj.LoraConfig(rank=2, targets="w", dropout=0.5)
    aset = _set(params, {"a": cfg, "b": cfg.replace(rank=3), "c": cfg}, gen)
    router = _router(aset, gen)
    f = jax.jit(lj.apply_mixture(_remat_cond_fn))
    for sign in (1.0, -1.0):
        x = sign * jnp.abs(jnp.asarray(gen.standard_normal((7, 12)), jnp.float32))
        want = sign * _Ref(aset, router).site("w", _np(x), _np(params["w"]))
        _compare(f(params, aset, router, x), want, None, f"remat/cond sign {sign}")
    key = jax.random.key(int(gen.integers(2**31)))
    y1 = f(params, aset, router, x, lora_rng=key)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(f(params, aset, router, x,
                                                                lora_rng=key)))
    assert rel_err(y1, want) > 1e-3 and bool(jnp.isfinite(y1).all())


@pytest.mark.slow
def test_quantized_base(rng):
    """An NF4 frozen base: dequantized at each use, gated as a float one."""
    gen = _gen(rng)
    params = {"l1": {"kernel": jnp.asarray(gen.standard_normal((64, 32)) / 8, jnp.float32)},
              "l2": {"kernel": jnp.asarray(gen.standard_normal((32, 16)) / 8, jnp.float32)}}
    cfg = lj.LoraConfig(rank=2, alpha=4, targets=r".*kernel")
    quantized = lj.quantize(params, config=cfg)
    aset = _set(params, {"a": cfg, "b": cfg, "c": cfg.replace(rank=4)}, gen)
    router = _router(aset, gen)
    fn = lambda p, x: jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]  # noqa: E731
    x = jnp.asarray(gen.standard_normal((6, 64)), jnp.float32)
    got = jax.jit(lj.apply_mixture(fn))(quantized, aset, router, x)
    dense = lj.dequantize(quantized)
    ref = _Ref(aset, router)
    h = np.tanh(ref.site("l1/kernel", _np(x), _np(dense["l1"]["kernel"])))
    _compare(got, ref.site("l2/kernel", h, _np(dense["l2"]["kernel"])), None, "nf4")


# ----------------------------------------------------------------------------- properties


def _single_fn(p, x):
    return x @ p["w"]


def _single(gen, n=3, d_in=12, d_out=10):
    params = {"w": jnp.asarray(gen.standard_normal((d_in, d_out)), jnp.float32)}
    cfg = lj.LoraConfig(rank=2, alpha=4, targets="w")
    cfgs = {f"m{i}": cfg.replace(rank=2 + i % 3) for i in range(n)}
    return params, _set(params, cfgs, gen)


def test_top_k_n_is_the_softmax_and_zero_b_is_the_base(rng):
    gen = _gen(rng)
    x = jnp.asarray(gen.standard_normal((3, 7, 16)), jnp.float32)
    params = _linen(MLP(), gen, x)
    cfg = lj.LoraConfig(rank=3, targets=r".*/kernel")
    aset = _set(params, {"a": cfg, "b": cfg, "c": cfg}, gen)
    soft = _router(aset, gen, temperature=2.0)
    f = jax.jit(lj.apply_mixture(MLP().apply))
    assert_close(f(params, aset, dataclasses.replace(soft, top_k=3), x),
                 f(params, aset, soft, x), rtol=1e-6, what="top_k=n vs softmax")
    zero_b = dataclasses.replace(aset, adapters=jax.tree.map(
        lambda n: None if n is None else n._replace(b=jnp.zeros_like(n.b)), aset.adapters,
        is_leaf=lambda n: n is None or lj.is_lora(n)))
    for router in (soft, dataclasses.replace(soft, top_k=1)):
        assert_close(f(params, zero_b, router, x), MLP().apply(params, x), rtol=1e-6,
                     what="zero B vs base")


def test_zero_routers_give_the_mean_adapter(rng):
    """std=0: every logit 0, every gate 1/n: merge_weighted with weights 1/n."""
    gen = _gen(rng)
    params, aset = _single(gen, n=4)
    router = lj.init_router(aset, std=0.0)
    x = jnp.asarray(gen.standard_normal((9, 12)), jnp.float32)
    got = lj.apply_mixture(_single_fn)(params, aset, router, x)
    mean = lj.merge_weighted(params, aset, [1 / aset.n] * aset.n)
    assert_close(got, _single_fn(mean, x), rtol=OUT_RTOL, what="zero routers")


def test_top_1_is_the_chosen_adapter_alone(rng):
    """k=1: each token's output is lj.apply with its argmax adapter alone. The inputs put
    every token near one router column (margin >= 2 for every seed)."""
    gen = _gen(rng)
    n, d_in = 3, 12
    params, aset = _single(gen, n=n, d_in=d_in)
    r = np.zeros((d_in, n), np.float32)
    r[np.arange(n), np.arange(n)] = 1.0
    router = lj.Router({"w": jnp.asarray(r)}, aset.names, top_k=1)
    want_pick = gen.integers(0, n, 30)
    x = 0.3 * gen.standard_normal((30, d_in))
    x[:, :n] = np.clip(x[:, :n], -0.5, 0.5) + 3.0 * np.eye(n)[want_pick]
    x = jnp.asarray(x, jnp.float32)
    got = jax.jit(lj.apply_mixture(_single_fn))(params, aset, router, x)
    alone = np.stack([np.asarray(lj.apply(_single_fn, aset.config)(
        params, lj.select_adapter(aset, i), x)) for i in range(n)])
    assert_close(got, alone[want_pick, np.arange(30)], rtol=OUT_RTOL, what="top-1")


def test_gates_are_top_k_exactly_even_when_logits_tie():
    from lora_jax._apply.gating import Gating, gates
    g = gates(jnp.zeros((2, 4)), Gating(top_k=2))
    np.testing.assert_array_equal(np.asarray(g), [[0.5, 0.5, 0, 0]] * 2)
    g = gates(jnp.array([[1.0, 3.0, 2.0, 3.0]]), Gating(top_k=3, temperature=0.5))
    e = np.exp(np.array([3.0, 2.0, 3.0]) / 0.5)
    np.testing.assert_allclose(np.asarray(g[0]), [0, e[0] / e.sum(), e[1] / e.sum(),
                                                  e[2] / e.sum()], rtol=1e-6)


# ----------------------------------------------------------------------------- gradients


def _mlp_fn(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def _close64(got, want, rtol, what):
    """max|got - want| / max|want| in float64 (`rel_err` rounds to float32 first)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype == np.float64, (what, got.dtype, want.dtype)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def _jnp_site(x, w, node, r, top_k):
    """The formula in jnp, written independently of lora_jax (for jax.grad)."""
    z = x @ r
    if top_k is not None:
        kth = -jnp.sort(-z, axis=-1)[..., top_k - 1:top_k]
        z = jnp.where(z >= kth, z, -jnp.inf)
    g = jax.nn.softmax(z, axis=-1)
    y = x @ w
    for i in range(node.a.shape[0]):
        y = y + g[..., i:i + 1] * node.scale[i].astype(y.dtype) * ((x @ node.a[i]) @ node.b[i])
    return y


@pytest.mark.parametrize("top_k", [None, 2])
def test_gradients_match_jax_grad_of_the_reference_float64(rng, top_k):
    """Router and adapter gradients in float64 against jax.grad of `_jnp_site`; tokens whose
    top-k logits nearly tie carry no loss (the gradient jumps there)."""
    gen = _gen(rng)
    with jax.enable_x64(True):
        f64 = lambda *s: jnp.asarray(gen.standard_normal(s), jnp.float64)  # noqa: E731
        params = {"w1": f64(10, 12), "w2": f64(12, 6)}
        cfg = lj.LoraConfig(rank=2, alpha=4, targets=".*", dtype=jnp.float64)
        aset = _set(params, {"a": cfg, "b": cfg.replace(rank=3), "c": cfg}, gen)
        router = lj.init_router(aset, key=jax.random.key(int(gen.integers(2**31))),
                                top_k=top_k, std=1.0, dtype=jnp.float64)
        x, ct = f64(15, 10), f64(15, 6)
        ref = _Ref(aset, router)
        ref.site("w2", np.tanh(ref.site("w1", _np(x), _np(params["w1"]))), _np(params["w2"]))
        weight = jnp.asarray(ref.margin >= MARGIN, jnp.float64)[:, None]
        assert float(weight.mean()) >= 0.5

        def loss(ad, rw):
            r = dataclasses.replace(router, weights=rw)
            y = lj.apply_mixture(_mlp_fn)(params, dataclasses.replace(aset, adapters=ad), r, x)
            return jnp.sum(weight * ct * y)

        def loss_ref(ad, rw):
            h = jnp.tanh(_jnp_site(x, params["w1"], ad["w1"], rw["w1"], top_k))
            return jnp.sum(weight * ct * _jnp_site(h, params["w2"], ad["w2"], rw["w2"], top_k))

        got = jax.jit(jax.grad(loss, argnums=(0, 1)))(aset.adapters, router.weights)
        want = jax.jit(jax.grad(loss_ref, argnums=(0, 1)))(aset.adapters, router.weights)
        assert got[1]["w1"].dtype == jnp.float64
        for path in ("w1", "w2"):
            _close64(got[1][path], want[1][path], GRAD_RTOL, f"router {path}")
            for f in ("a", "b"):
                _close64(getattr(got[0][path], f), getattr(want[0][path], f), GRAD_RTOL,
                         f"{path}.{f}")
        _close64(jax.jit(loss)(aset.adapters, router.weights),
                 loss_ref(aset.adapters, router.weights), 1e-12, "loss")


# ----------------------------------------------------------------------------- training


def _routing_task(gen, n=3, d_in=12, tokens=96):
    """Tokens from n clusters; cluster c's target is adapter c alone (so the right routing
    per token is known)."""
    params, aset = _single(gen, n=n, d_in=d_in)
    cluster = gen.integers(0, n, tokens)
    x = 0.5 * gen.standard_normal((tokens, d_in))
    x[:, :n] += 2.0 * np.eye(n)[cluster]
    x = jnp.asarray(x, jnp.float32)
    alone = np.stack([np.asarray(lj.apply(_single_fn, aset.config)(
        params, lj.select_adapter(aset, i), x)) for i in range(n)])
    return params, aset, x, jnp.asarray(alone[cluster, np.arange(tokens)]), cluster


@pytest.mark.standard_promotion     # optax's adam
def test_training_the_router_alone_learns_the_routing(rng):
    gen = _gen(rng)
    params, aset, x, target, cluster = _routing_task(gen)
    router = lj.init_router(aset, std=0.0)
    mix = lj.apply_mixture(_single_fn)

    def loss(r):
        return jnp.mean((mix(params, aset, r, x) - target) ** 2)

    tx = optax.adam(0.1)

    @jax.jit
    def step(r, state):
        value, g = jax.value_and_grad(loss)(r)
        u, state = tx.update(g, state, r)
        return optax.apply_updates(r, u), state, value

    before = jax.tree.map(np.asarray, aset.adapters)
    state, first = tx.init(router), float(loss(router))
    for _ in range(150):
        router, state, _ = step(router, state)
    assert isinstance(router, lj.Router) and router.names == aset.names
    assert float(loss(router)) < 0.05 * first, (float(loss(router)), first)
    picked = np.argmax(np.asarray(x @ router.weights["w"]), axis=-1)
    assert (picked == cluster).mean() >= 0.9
    for (p, a), (_, b) in zip(_paths(before), _paths(aset.adapters), strict=True):  # untouched
        for f in ("a", "b", "scale"):
            np.testing.assert_array_equal(getattr(a, f), np.asarray(getattr(b, f)), err_msg=p)


@pytest.mark.standard_promotion     # optax's adam
def test_joint_training_keeps_scales_frozen(rng):
    gen = _gen(rng)
    params, aset, x, target, _ = _routing_task(gen)
    # the adapters start away from their targets: joint training moves both
    aset0 = dataclasses.replace(aset, adapters=jax.tree.map(
        lambda n: None if n is None else n._replace(b=0.5 * n.b), aset.adapters,
        is_leaf=lambda n: n is None or lj.is_lora(n)))
    router = lj.init_router(aset0, key=jax.random.key(int(gen.integers(2**31))), std=0.1)
    mix = lj.apply_mixture(_single_fn)
    tx = lj.optimizer(optax.adam(0.05))

    def loss(trainable):
        s, r = trainable
        return jnp.mean((mix(params, s, r, x) - target) ** 2)

    @jax.jit
    def step(trainable, state):
        value, g = jax.value_and_grad(loss)(trainable)
        u, state = tx.update(g, state, trainable)
        return optax.apply_updates(trainable, u), state, value

    trainable = (aset0, router)
    state, first = tx.init(trainable), float(loss(trainable))
    for _ in range(100):
        trainable, state, _ = step(trainable, state)
    s, r = trainable
    assert float(loss(trainable)) < 0.2 * first, (float(loss(trainable)), first)
    np.testing.assert_array_equal(np.asarray(s.adapters["w"].scale),
                                  np.asarray(aset0.adapters["w"].scale))
    assert rel_err(s.adapters["w"].b, aset0.adapters["w"].b) > 1e-3     # the adapters moved
    assert r.top_k is None and s.names == aset.names


def test_swapping_router_and_adapter_values_never_recompiles(rng):
    gen = _gen(rng)
    params, aset = _single(gen)
    f = jax.jit(lj.apply_mixture(_single_fn))
    x = jnp.asarray(gen.standard_normal((5, 12)), jnp.float32)
    r1, r2 = _router(aset, gen, top_k=2), _router(aset, gen, top_k=2)
    f(params, aset, r1, x).block_until_ready()
    other = dataclasses.replace(aset, adapters=jax.tree.map(lambda v: v * 2, aset.adapters))
    with CompileCounter() as cc:
        f(params, aset, r2, x).block_until_ready()
        f(params, other, r1, x).block_until_ready()
    assert cc.count == 0


# ----------------------------------------------------------------------------- errors


def _err_inputs():
    gen = np.random.default_rng(0)
    params = {"w": jnp.asarray(gen.standard_normal((6, 5)), jnp.float32),
              "v": jnp.asarray(gen.standard_normal((6, 5)), jnp.float32)}
    cfg = lj.LoraConfig(rank=2, targets="w")
    aset = _set(params, {"a": cfg, "b": cfg}, gen)
    return params, cfg, aset, lj.init_router(aset, std=0.0), jnp.ones((3, 6))


def _other_names(e):
    params, cfg, aset, router, x = e
    other = lj.adapter_set({"a": (lj.select_adapter(aset, "a", trim=True), cfg),
                            "c": (lj.select_adapter(aset, "b", trim=True), cfg)})
    return lj.apply_mixture(_single_fn)(params, other, router, x)


def _dora(e):
    params, _, _, _, x = e
    cfg = lj.LoraConfig(rank=2, targets="w", use_dora=True)
    aset = lj.adapter_set({n: (lj.init(params, cfg, key=jax.random.key(i)), cfg)
                           for i, n in enumerate("ab")})
    return lj.apply_mixture(_single_fn)(params, aset, lj.init_router(aset, std=0.0), x)


def _with_router(e, weights):
    params, _, aset, router, x = e
    return lj.apply_mixture(_single_fn)(params, aset, dataclasses.replace(router, weights=weights),
                                        x)


def _fully_trained(e):
    params, _, aset, router, x = e
    bad = dataclasses.replace(aset, adapters={**aset.adapters, "v": jnp.zeros((6, 5))})
    return lj.apply_mixture(_single_fn)(params, bad, dataclasses.replace(
        router, weights={**router.weights, "v": jnp.zeros((6, 2))}), x)


def _use(fn, params=None, targets="w", x=None, layouts=None):
    """The mixture of a two-adapter set on ``params`` used by ``fn``."""
    gen = np.random.default_rng(1)
    params = params or {"w": jnp.asarray(gen.standard_normal((6, 5)), jnp.float32)}
    cfg = lj.LoraConfig(rank=1, targets=targets, layouts=layouts or {})
    aset = _set(params, {"a": cfg, "b": cfg}, gen)
    x = jnp.ones((3, 6)) if x is None else x
    return lj.apply_mixture(fn)(params, aset, lj.init_router(aset, std=0.0), x)


def _conv(p, x):
    return lax.conv_general_dilated(x, p["k"], (1,), "SAME", dimension_numbers=("NWC", "WIO",
                                                                                "NWC"))


def _ragged(p, x):
    return lax.ragged_dot(x, p["e"], jnp.asarray([2, 1], jnp.int32))


def _loop(p, x):     # a traced trip count: a while loop (a static one would be a scan)
    n = jnp.sum(x > 0).astype(jnp.int32)
    return lax.fori_loop(0, n, lambda i, h: h + x @ p["w"], jnp.zeros((3, 5)))


_EXPERTS = {"e": lj.Layout(1, 1, 1)}
_USES = "gates a weight per token in matmuls of its input only; the model uses this one in"
_DENSE = "would need this weight dense here"

ERROR_CASES = [
    ("fn-not-callable", TypeError, "fn must be callable; got str",
     lambda e: lj.apply_mixture("model")),
    ("not-a-set", TypeError, r"lj.apply_mixture: expected an lj.AdapterSet, got dict",
     lambda e: lj.apply_mixture(_single_fn)(e[0], e[2].adapters, e[3], e[4])),
    ("not-a-router", TypeError, "expected an lj.Router, got dict",
     lambda e: lj.apply_mixture(_single_fn)(e[0], e[2], e[3].weights, e[4])),
    ("router-for-other-names", ValueError,
     r"the router was built for adapters \['a', 'b'\] but the set holds \['a', 'c'\]",
     _other_names),
    ("dora-set", ValueError, "holds DoRA adapters", _dora),
    ("router-shape", ValueError, r"w: the router has shape \(6, 3\), the set needs \(6, 2\)",
     lambda e: _with_router(e, {"w": jnp.zeros((6, 3)), "v": None})),
    ("router-missing-path", ValueError, r"w: the router has shape None",
     lambda e: _with_router(e, {"w": None, "v": None})),
    ("router-extra-path", ValueError, "v: the router has a weight here but the set adapts",
     lambda e: _with_router(e, {"w": jnp.zeros((6, 2)), "v": jnp.zeros((6, 2))})),
    ("router-tree", ValueError, "do not mirror the set's adapter tree",
     lambda e: _with_router(e, {"w": jnp.zeros((6, 2))})),
    ("router-int-dtype", TypeError, "w: the router has dtype int32",
     lambda e: _with_router(e, {"w": jnp.zeros((6, 2), jnp.int32), "v": None})),
    ("fully-trained-leaf", ValueError, "v: the set holds a fully-trained leaf", _fully_trained),
    ("Router-top_k-too-large", ValueError, r"top_k=3 must be None .* in \[1, 2\]",
     lambda e: dataclasses.replace(e[3], top_k=3)),
    ("Router-temperature", ValueError, "temperature=0.0 must be a finite number > 0",
     lambda e: dataclasses.replace(e[3], temperature=0.0)),
    ("Router-names", TypeError, "names must be a non-empty tuple of adapter names",
     lambda e: lj.Router(e[3].weights, ["a", "b"])),
    ("init-no-key", ValueError, "random routers need a PRNG key",
     lambda e: lj.init_router(e[2])),
    ("init-top_k-zero", ValueError, r"top_k=0 must be None", lambda e: lj.init_router(
        e[2], std=0.0, top_k=0)),
    ("init-top_k-bool", ValueError, r"top_k=True must be None", lambda e: lj.init_router(
        e[2], std=0.0, top_k=True)),
    ("init-temperature", ValueError, "temperature=inf must be a finite", lambda e: lj.init_router(
        e[2], std=0.0, temperature=float("inf"))),
    ("init-std", ValueError, r"std=-1.0 must be a finite number >= 0",
     lambda e: lj.init_router(e[2], std=-1.0)),
    ("init-dtype", TypeError, "dtype=int32 is not a float type",
     lambda e: lj.init_router(e[2], std=0.0, dtype=jnp.int32)),
    ("init-not-a-set", TypeError, "lj.init_router: expected an lj.AdapterSet",
     lambda e: lj.init_router(e[2].adapters, std=0.0)),
    # uses with no gated form
    ("use-elementwise", ValueError, rf"w: lj.apply_mixture {_DENSE}",
     lambda e: _use(lambda p, x: x @ jnp.sin(p["w"]))),
    ("use-weight-as-output", ValueError, rf"w: lj.apply_mixture {_DENSE}",
     lambda e: _use(lambda p, x: (x @ p["w"], p["w"]))),
    ("use-loop", ValueError, rf"w: lj.apply_mixture {_DENSE}", lambda e: _use(_loop)),
    ("use-transposed", ValueError, rf"w: lj.apply_mixture {_USES} a matmul that contracts the "
     r"weight's output axes \(x @ W.T", lambda e: _use(lambda p, x: (x @ p["w"]) @ p["w"].T)),
    ("use-conv", ValueError, rf"k: lj.apply_mixture {_USES} a convolution",
     lambda e: _use(_conv, {"k": jnp.ones((3, 6, 4))}, "k", jnp.ones((2, 7, 6)))),
    ("use-embedding", ValueError, rf"emb: lj.apply_mixture {_USES} a row lookup",
     lambda e: _use(lambda p, ids: p["emb"][ids], {"emb": jnp.ones((6, 5))}, "emb",
                    jnp.asarray([1, 2], jnp.int32))),
    ("use-ragged-dot", ValueError, rf"e: lj.apply_mixture {_USES} a grouped matmul",
     lambda e: _use(_ragged, {"e": jnp.ones((2, 6, 5))}, "e", layouts=_EXPERTS)),
    ("use-expert-gather", ValueError, rf"e: lj.apply_mixture {_DENSE}",
     lambda e: _use(lambda p, x: jnp.einsum("ti,tio->to", x, p["e"][jnp.asarray([0, 1, 1])]),
                    {"e": jnp.ones((2, 6, 5))}, "e", layouts=_EXPERTS)),
]


@pytest.fixture(scope="module")
def err():
    return _err_inputs()


@pytest.mark.parametrize("exc, match, call", [pytest.param(*c[1:], id=c[0])
                                              for c in ERROR_CASES])
def test_errors(err, exc, match, call):
    with pytest.raises(exc, match=match):
        call(err)
