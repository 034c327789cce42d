"""Layouts read from the program (`lj.infer_layouts`, `lj.configure`), and the
errors for adapters the program contradicts or never reads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from tests._asserts import perturb_b, rel_err

L = lj.Layout


def _sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _layouts(fn, params, *args, **kw):
    return lj.infer_layouts(fn, params, *args, **kw).layouts


# ----------------------------------------------------------------------------- reading


def test_dense_conv_embedding_and_tied_head():
    params = {"w": _sds((16, 8)), "conv": _sds((3, 3, 4, 6)), "emb": _sds((50, 16))}

    def fn(p, x, img, ids):
        h = p["emb"][ids] + x @ p["w"] @ p["w"].T
        y = jax.lax.conv_general_dilated(img, p["conv"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (h @ p["emb"].T).sum() + y.sum()

    got = _layouts(fn, params, _sds((2, 16)), _sds((1, 5, 5, 4)), _sds((2,), jnp.int32))
    assert got == {"w": L(0, 1, 1), "conv": L(0, 3, 1), "emb": L(0, 1, 1)}


def test_scan_stacked_layers_and_remat():
    params = {"layers": {"w": _sds((4, 16, 16)), "v": _sds((4, 16, 32))}}

    def fn(p, x):
        def body(h, lw):
            w, v = lw
            return jax.checkpoint(lambda h: jnp.tanh(h @ w) @ v[:, :16])(h), None
        return jax.lax.scan(body, x, (p["layers"]["w"], p["layers"]["v"]))[0]

    assert _layouts(fn, params, _sds((2, 16))) == {"layers/w": L(1, 1, 1),
                                                   "layers/v": L(1, 1, 1)}


@pytest.mark.parametrize("spec,shape,want", [
    ("bd,dhk->bhk", (16, 4, 8), L(0, 1, 2)),                    # DenseGeneral q (D, H, hd)
    ("bhk,hkd->bd", (4, 8, 16), L(0, 2, 1)),                    # out projection (H, hd, D)
    ("btd,ndh->btnh", (4, 16, 8), L(0, 1, 2, order=(1, 0, 2))),  # Gemma q (N, D, H)
    ("btd,skdh->sbtkh", (2, 1, 16, 8), L(0, 1, 3, order=(2, 0, 1, 3))),  # Gemma kv
    ("bd,fd->bf", (32, 16), L(0, 1, 1, order=(1, 0))),          # Equinox Linear (out, in)
    ("ebd,edo->ebo", (3, 16, 8), L(1, 1, 1)),                   # vmap ensemble, own inputs
])
def test_einsum_kernels_any_axis_order(spec, shape, want):
    x_shape = {"bd": (2, 16), "bhk": (2, 4, 8), "btd": (2, 5, 16), "ebd": (3, 2, 16)}[
        spec.split(",")[0]]
    got = _layouts(lambda p, x: jnp.einsum(spec, x, p["w"]), {"w": _sds(shape)},
                   _sds(x_shape))
    assert got == {"w": want}


def test_equinox_style_vmapped_linear_and_embedding():
    params = {"lin": _sds((32, 16)), "emb": _sds((50, 16))}

    def fn(p, ids):
        def one(i):      # Equinox: weight[i], then weight @ x, per example under vmap
            return p["lin"] @ p["emb"][i]
        return jax.vmap(one)(ids)

    got = _layouts(fn, params, _sds((3,), jnp.int32))
    assert got == {"lin": L(0, 1, 1, order=(1, 0)), "emb": L(0, 1, 1)}


def test_what_a_layout_was_read_from_and_unknown_weights():
    params = {"w": _sds((4, 16, 8)), "scale": _sds((16, 16))}
    fn = lambda p, x: jax.lax.scan(lambda h, w: (h + (x @ w).sum(), None), 0.0,  # noqa: E731
                                   p["w"])[0] * jnp.sin(p["scale"]).sum()
    rep = lj.infer_layouts(fn, params, _sds((2, 16)))
    assert rep.layouts == {"w": L(1, 1, 1)}
    assert "`scan` over axis 0" in rep.sources["w"] and "`dot_general`" in rep.sources["w"]
    assert "sin" in rep.unknown["scale"]
    text = str(rep)
    assert "lj.Layout(1, 1, 1) (axes: stacked 4, in 16, out 8)" in text and "unknown" in text


def test_contradicting_uses_name_the_path_and_both_uses():
    params = {"w": _sds((4, 16))}
    fn = lambda p, x: (jax.lax.scan(lambda c, row: (c + row.sum(), None), 0.0,  # noqa: E731
                                    p["w"])[0] + (x @ p["w"]).sum())
    with pytest.raises(ValueError, match=r"(?s)^w: the program uses this \(4, 16\) weight in "
                                         r"ways no single layout expresses: axis 0 is a "
                                         r"stacked axis for `scan`.*but `dot_general`.*"
                                         r"Fix: declare the layout"):
        lj.infer_layouts(fn, params, _sds((2, 4)))


def test_split_axis_is_reported():
    params = {"w": _sds((8, 16))}
    fn = lambda p, x: jnp.einsum("bi,ijk->bjk", x, p["w"].reshape(2, 4, 16))  # noqa: E731
    with pytest.raises(ValueError, match="a reshape splits it"):
        lj.infer_layouts(fn, params, _sds((3, 2)))


# ----------------------------------------------------------------------------- configure


class _ScanDecoder(nn.Module):
    """nn.scan + nn.remat stack of q/k/v/o/mlp blocks with a tied embedding head."""
    vocab: int = 61
    d: int = 32
    heads: int = 4
    kv_heads: int = 1
    layers: int = 3

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(self.vocab, self.d, name="embed")
        h = emb(ids)

        class Block(nn.Module):
            d: int
            heads: int
            kv_heads: int

            @nn.compact
            def __call__(self, h, _):
                hd = self.d // self.heads
                q = nn.Dense(self.heads * hd, use_bias=False, name="q")(h)
                k = nn.Dense(self.kv_heads * hd, use_bias=False, name="k")(h)
                v = nn.Dense(self.kv_heads * hd, use_bias=False, name="v")(h)
                b, t = h.shape[:2]
                q = q.reshape(b, t, self.heads, hd)
                k = jnp.repeat(k.reshape(b, t, self.kv_heads, hd), self.heads // self.kv_heads, 2)
                v = jnp.repeat(v.reshape(b, t, self.kv_heads, hd), self.heads // self.kv_heads, 2)
                a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd), -1)
                o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, self.d)
                h = h + nn.Dense(self.d, use_bias=False, name="o")(o)
                up = nn.Dense(2 * self.d, use_bias=False, name="up")(h)
                gate = nn.Dense(2 * self.d, use_bias=False, name="gate")(h)
                h = h + nn.Dense(self.d, use_bias=False, name="down")(jax.nn.silu(gate) * up)
                return h, None

        stack = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True},
                        length=self.layers)(self.d, self.heads, self.kv_heads, name="layers")
        h, _ = stack(h, None)
        return emb.attend(h)


TARGETS = r".*layers/(q|k|v|o|gate|up|down)/kernel|.*embed/embedding"


@pytest.fixture(scope="module")
def decoder():
    m = _ScanDecoder()
    ids = jax.random.randint(jax.random.key(0), (2, 7), 0, m.vocab)
    return m, m.init(jax.random.key(1), ids), ids


@pytest.mark.slow
def test_configure_gives_per_layer_adapters_equal_to_merge(decoder, rng):
    model, variables, ids = decoder
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=TARGETS)
    cfg = lj.configure(cfg, model.apply, variables, ids)
    spec = lj.describe(variables, cfg).specs
    assert spec["params/layers/q/kernel"].layout == L(1, 1, 1)
    assert spec["params/embed/embedding"].layout == L(0, 1, 1)
    ad = perturb_b(lj.init(variables, cfg, key=rng), key=jax.random.fold_in(rng, 1))
    assert ad["params"]["layers"]["q"]["kernel"].a.shape == (3, 32, 4)   # (L, in, r)
    assert ad["params"]["layers"]["down"]["kernel"].b.shape == (3, 4, 32)
    e = lj.explain(model.apply, cfg, variables, ad, ids)
    assert e.n_fallbacks == 0, e
    fwd = jax.jit(lj.apply(model.apply, cfg))
    want = model.apply(lj.merge(variables, ad, cfg), ids)
    assert rel_err(fwd(variables, ad, ids), want) <= 1e-5

    def loss_lora(a):
        return jnp.mean(lj.apply(model.apply, cfg)(variables, a, ids) ** 2)

    def loss_merged(a):
        return jnp.mean(model.apply(lj.merge(variables, a, cfg), ids) ** 2)

    g, gm = jax.grad(loss_lora)(ad), jax.grad(loss_merged)(ad)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(gm), strict=True):
        assert rel_err(x, y) <= 1e-4
    assert "inferred" in str(lj.describe(variables, cfg))


def test_stacked_model_without_layouts_is_an_error_with_the_fix(decoder, rng):
    model, variables, ids = decoder
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*layers/q/kernel")
    ad = lj.init(variables, cfg, key=rng)
    with pytest.raises(ValueError, match=r"(?s)^params/layers/q/kernel: the program uses this "
                                         r"\(3, 32, 32\) weight as lj.Layout\(1, 1, 1\) \(axes: "
                                         r"stacked 3, in 32, out 32\).*factored as "
                                         r"lj.Layout\(0, 2, 1\).*default layout.*"
                                         r"Fix: config = lj.configure\(config, fn, params"):
        lj.apply(model.apply, cfg)(variables, ad, ids)


def test_declared_layouts_win(decoder, rng):
    model, variables, ids = decoder
    declared = lj.LoraConfig(rank=2, targets=r".*layers/q/kernel",
                             layouts={r".*layers/q/kernel": L(0, 2, 1)})
    cfg = lj.configure(declared, model.apply, variables, ids)
    assert cfg.layout_for("params/layers/q/kernel") == L(0, 2, 1)
    assert cfg.layout_source("params/layers/q/kernel")[0] == "explicit"


def test_closure_over_params_is_an_error(rng):
    params = {"w": jax.random.normal(rng, (8, 4))}
    cfg = lj.LoraConfig(rank=2, targets="w")
    ad = lj.init(params, cfg, key=rng)
    closure = lambda p, x: x @ params["w"]     # noqa: E731  (ignores p)
    with pytest.raises(ValueError, match=r"(?s)^lj.apply: fn never reads any of the 1 adapted "
                                         r"weights.*closes over the params.*Fix: pass them"):
        lj.apply(closure, cfg)(params, ad, jnp.ones((2, 8)))


def test_strict_refuses_a_single_unused_target(rng):
    params = {"w": jax.random.normal(rng, (8, 4)), "v": jax.random.normal(rng, (8, 4))}
    cfg = lj.LoraConfig(rank=2, targets=("w", "v"))
    ad = lj.init(params, cfg, key=rng)
    fn = lambda p, x: x @ p["w"]               # noqa: E731
    lj.apply(fn, cfg)(params, ad, jnp.ones((2, 8)))          # not strict: fine
    with pytest.raises(ValueError, match=r"lj.apply\(strict=True\): fn never reads 1 of the "
                                         r"adapted weights.*\['v'\].*Fix: narrow"):
        lj.apply(fn, cfg, strict=True)(params, ad, jnp.ones((2, 8)))


# ----------------------------------------------------------------------------- any axis order


def _out_in_model(rng):
    """An (out, in) weight (Equinox/PyTorch order) used as W @ x under vmap, and a bias."""
    k1, k2 = jax.random.split(rng)
    params = {"lin": {"weight": jax.random.normal(k1, (24, 16)) / 4,
                      "bias": jax.random.normal(k2, (24,))}}

    def fn(p, x):
        return jax.vmap(lambda v: p["lin"]["weight"] @ v + p["lin"]["bias"])(x)
    return params, fn


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "dora", "rslora", "nf4", "int8"])
def test_out_in_weight_composes_with_every_variant(rng, variant):
    params, fn = _out_in_model(rng)
    x = jax.random.normal(jax.random.fold_in(rng, 1), (5, 16))
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*/weight", use_dora=variant == "dora",
                        use_rslora=variant == "rslora")
    cfg = lj.configure(cfg, fn, params, x)
    assert cfg.layout_for("lin/weight") == L(0, 1, 1, order=(1, 0))
    base = params
    if variant in ("nf4", "int8"):
        base = lj.quantize(params, targets=r".*/weight", method=variant, config=cfg)
    ad = perturb_b(lj.init(base, cfg, key=rng), key=jax.random.fold_in(rng, 2))
    node = ad["lin"]["weight"]
    assert node.a.shape == (16, 4) and node.b.shape == (4, 24)     # a: (in, r), b: (r, out)
    merged = lj.merge(lj.dequantize(base), ad, cfg)
    # merge in float64: W' = W + s (a b)^T for the (out, in) storage
    w = np.asarray(lj.dequantize(base)["lin"]["weight"], np.float64)
    d = float(node.scale) * (np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)).T
    want_w = w + d
    if variant == "dora":    # m * V / ||V|| with the norm over the input axis of each unit
        want_w = np.asarray(node.m, np.float64)[:, None] * want_w / \
            np.linalg.norm(want_w, axis=1, keepdims=True)
    assert rel_err(merged["lin"]["weight"], want_w) <= 1e-5
    y = jax.jit(lj.apply(fn, cfg))(base, ad, x)
    assert rel_err(y, fn(merged, x)) <= 1e-5
    assert lj.explain(fn, cfg, base, ad, x).n_fallbacks == 0


def test_inferred_layouts_survive_checkpoints_and_unmerge(rng, tmp_path):
    params, fn = _out_in_model(rng)
    x = jnp.ones((2, 16))
    cfg = lj.configure(lj.LoraConfig(rank=3, targets=r".*/weight"), fn, params, x)
    ad = perturb_b(lj.init(params, cfg, key=rng), key=rng)
    lj.save(tmp_path, ad, cfg, params=params)
    back, cfg2 = lj.restore(tmp_path, params=params)
    assert cfg2 == cfg and cfg2.layout_source("lin/weight")[0] == "inferred"
    np.testing.assert_array_equal(back["lin"]["weight"].b, ad["lin"]["weight"].b)
    assert lj.LoraConfig.from_dict(cfg.to_dict()) == cfg
    again = lj.unmerge(lj.merge(params, ad, cfg), ad, cfg)
    assert rel_err(again["lin"]["weight"], params["lin"]["weight"]) <= 1e-6


def test_layout_order_is_validated():
    with pytest.raises(ValueError, match=r"LoraConfig.layouts: .*order=\(0, 0\) must list each "
                                         r"of the 2 axes once"):
        lj.LoraConfig(targets="w", layouts={"w": L(0, 1, 1, order=(0, 0))})
    assert lj.LoraConfig(targets="w", layouts={"w": (0, 1, 1, (0, 1))}).layout_for("w") == \
        L(0, 1, 1)   # the identity order is no order
