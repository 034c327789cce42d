"""Consistency between params, config and adapters: every pattern applies
somewhere, paths are unique, arguments are not swapped, factors are floating
and the stored scale is the config's. Each branch through the public entry
points (lj.init, lj.describe, lj.merge, lj.apply with and without jit), and
correct adapters of every kind pass them all."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._core.weights import check_adapters
from tests._asserts import assert_close, perturb_b, random_adapters


def _gen(rng):
    return np.random.default_rng(int(jax.random.randint(rng, (), 0, 2**31 - 1)))


def _normal(gen, shape, std=0.3):
    return jnp.asarray(std * gen.standard_normal(shape), jnp.float32)


def _params(gen):
    return {"l1": {"w": _normal(gen, (16, 24)), "b": _normal(gen, (24,), 0.1)},
            "l2": {"w": _normal(gen, (24, 8))},
            "head": {"w": _normal(gen, (8, 4))}}


def _fn(p, x):
    h = x @ p["l1"]["w"]
    h = jnp.tanh(h + p["l1"]["b"].reshape((1,) * (h.ndim - 1) + (-1,)))   # any batch rank
    return (h @ p["l2"]["w"]) @ p["head"]["w"]


def _bf16_bound(merged, ad, x):
    """An upper bound on |lj.apply(_fn) - _fn(merged)| elementwise when the LoRA factors
    are bfloat16: each layer's low-rank term s (x a) b carries at most a few bf16
    roundings (x and s*b cast, x@a and the product rounded: 6 units of 2^-8 bounds them),
    and an error in a layer's input passes on through |W + s a b| (tanh is 1-Lipschitz).
    The frozen x @ W runs in float32 (1e-6 relative covers it). True for every input,
    unlike a fixed relative tolerance on the output."""
    u = 6 * 2.0 ** -8

    def lora_mag(h, node):
        a = np.abs(np.asarray(node.a, np.float64))
        sb = np.abs(float(node.scale) * np.asarray(node.b, np.float64))
        return h @ a @ sb

    def w(path):
        return np.abs(np.asarray(merged[path]["w"], np.float64))

    x = np.asarray(x, np.float64)
    e = u * lora_mag(np.abs(x), ad["l1"]["w"]) + 1e-6 * (np.abs(x) @ w("l1"))
    pre = x @ np.asarray(merged["l1"]["w"], np.float64) + np.asarray(merged["l1"]["b"],
                                                                     np.float64)
    h = np.abs(np.tanh(pre)) + e           # |the layer-2 input apply sees|, bounded
    e = e @ w("l2") + u * lora_mag(h, ad["l2"]["w"]) + 1e-6 * (h @ w("l2"))
    h2 = h @ w("l2") + e
    return e @ w("head") + u * lora_mag(h2, ad["head"]["w"]) + 1e-6 * (h2 @ w("head"))


def _assert_within_bf16_bound(got, want, merged, ad, x, what):
    bound = _bf16_bound(merged, ad, x)
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    worst = float(np.max(err - bound))
    assert worst <= 0, f"{what}: |error| exceeds the bf16 rounding bound by {worst:.3g}"


CFG = lj.LoraConfig(rank=2, alpha=16, targets=r".*/w")
TARGETED = ["head/w", "l1/w", "l2/w"]      # flattening order


def _adapters(params, cfg, gen):
    return random_adapters(params, cfg, seed=int(gen.integers(2**31 - 1)), b_std=0.2)


def _entry_points(params, cfg, key):
    """lj.init and lj.describe: both resolve the config against params."""
    return [lambda: lj.init(params, cfg, key=key), lambda: lj.describe(params, cfg)]


def _runs(params, ad, cfg, x):
    """lj.merge and lj.apply (without and with jit): all check the adapters."""
    return {"merge": lambda: lj.merge(params, ad, cfg),
            "apply": lambda: lj.apply(_fn, cfg)(params, ad, x),
            "apply-jit": lambda: jax.jit(lj.apply(_fn, cfg))(params, ad, x)}


# ----------------------------------------------------------------------------- patterns

_PATTERN_CASES = {
    "rank_pattern-nothing": (
        dict(rank_pattern={"l9/w": 1}),
        r"LoraConfig\.rank_pattern: pattern 'l9/w' matches no targeted leaf, so it never "
        r"applies: it matches no leaf\. The targeted paths are:\n  head/w\n  l1/w\n  l2/w"),
    "rank_pattern-untargeted": (
        dict(rank_pattern={r"l1/.*": 1, "l1/b": 1}),
        r"LoraConfig\.rank_pattern: pattern 'l1/b' matches no targeted leaf, so it never "
        r"applies: it matches only leaves that are not targeted \(l1/b\)"),
    "alpha_pattern": (
        dict(alpha_pattern={r".*/kernel": 4.0}),
        r"LoraConfig\.alpha_pattern: pattern '\.\*/kernel' matches no targeted leaf"),
    "layouts": (
        dict(layouts={"l1/W": lj.Layout(0, 1, 1)}),
        r"LoraConfig\.layouts: pattern 'l1/W' matches no targeted leaf"),
    "layouts-excluded": (
        dict(exclude="head/w", layouts={"head/w": lj.Layout(0, 1, 1)}),
        r"LoraConfig\.layouts: pattern 'head/w' matches no targeted leaf, so it never "
        r"applies: it matches only leaves that are not targeted \(head/w\)\. The targeted "
        r"paths are:\n  l1/w\n  l2/w"),
    "exclude": (
        dict(exclude=(r"head/w", r".*/b")),
        r"LoraConfig\.exclude: pattern '\.\*/b' matches none of the leaves LoraConfig\.targets "
        r"matches, so it excludes nothing \(exclude only removes targeted leaves\); targets "
        r"matches:\n  head/w\n  l1/w\n  l2/w"),
    "exclude-callable": (
        dict(exclude=lambda path, leaf: leaf.ndim == 1),
        r"LoraConfig\.exclude: <function .*> excludes none of the leaves LoraConfig\.targets "
        r"matches, so it has no effect"),
    "exclude-everything": (
        dict(exclude=r".*"),
        r"LoraConfig\.exclude: '\.\*' excludes every leaf LoraConfig\.targets '\.\*/w' "
        r"matches:\n  head/w"),
    "inferred_layouts": (
        dict(inferred_layouts={"emb/w": (lj.Layout(0, 1, 1), "a lookup")}),
        r"LoraConfig\.inferred_layouts: path 'emb/w' matches no leaf of params .*; some real "
        r"paths are:\n  head/w\n  l1/b"),
    "tied": (
        dict(tied=("head",)),
        r"LoraConfig\.tied: 'head' is not the path of a leaf of params; some real paths "
        r"are:\n  head/w"),
}


@pytest.mark.parametrize("case", list(_PATTERN_CASES))
def test_pattern_that_applies_nowhere_is_an_error(rng, case):
    kw, match = _PATTERN_CASES[case]
    params = _params(_gen(rng))
    cfg = CFG.replace(**kw)
    for call in _entry_points(params, cfg, rng):
        with pytest.raises(ValueError, match=match) as e:
            call()
        assert ". Fix: " in str(e.value)


def test_pattern_fixes_name_a_real_path(rng):
    params = _params(_gen(rng))
    with pytest.raises(ValueError, match=r"Fix: write the pattern against these paths \(e\.g\. "
                                         r"r'head/w'\), or remove it\."):
        lj.describe(params, CFG.replace(rank_pattern={"nope": 1}))


def test_patterns_that_apply_pass(rng):
    params = _params(_gen(rng))
    cfg = CFG.replace(
        # the second pattern is shadowed at l1/w (first match wins) but applies at l2/w
        rank_pattern={"l1/w": 1, r"l\d/w": 3}, alpha_pattern={r".*": 6.0},
        exclude=(r"head/.*",), layouts={r"l1/w": lj.Layout(0, 1, 1)},
        inferred_layouts={"l2/w": (lj.Layout(0, 1, 1), "x @ w")},
        tied=("head/w",))            # a leaf of params, targeted or not
    specs = lj.describe(params, cfg).specs
    assert {p: s.rank for p, s in specs.items()} == {"l1/w": 1, "l2/w": 3}
    assert specs["l2/w"].scale == pytest.approx(2.0)
    ad = lj.init(params, cfg, key=rng)
    assert ad["head"]["w"] is None and ad["l1"]["w"].a.shape == (16, 1)


def test_one_target_pattern_of_several_matching_nothing_still_warns(rng):
    params = _params(_gen(rng))
    with pytest.warns(lj.LoraWarning, match=r"LoraConfig\.targets: pattern 'nope' matched no "
                                            r"leaf \(the other patterns did\)"):
        lj.describe(params, CFG.replace(targets=("l1/w", "nope")))


# ----------------------------------------------------------------------------- paths


@pytest.mark.parametrize("tree,keys", [
    (lambda x, y: {"a/b": x, "a": {"b": y}}, r"\['a'\]\['b'\] and \['a/b'\]"),
    (lambda x, y: {"a": [x], "a/0": y}, r"\['a'\]\[0\] and \['a/0'\]"),
], ids=["slash-in-key", "index-vs-str"])
def test_colliding_paths_are_refused(rng, tree, keys):
    gen = _gen(rng)
    params = tree(_normal(gen, (8, 6)), _normal(gen, (8, 6)))
    path = "a/b" if "a/b" in params else "a/0"
    cfg = lj.LoraConfig(rank=2, targets=".*")
    match = (rf"{path}: two leaves of params have this '/'-joined path, {keys}; lora_jax "
             rf"addresses leaves by it, so they would share one adapter and collapse into one "
             rf"entry when saved\. Fix: rename one of the keys")
    for call in _entry_points(params, cfg, rng):
        with pytest.raises(ValueError, match=match):
            call()


# ----------------------------------------------------------------------------- swapped


def test_swapped_arguments_are_named(rng):
    gen = _gen(rng)
    params = _params(gen)
    ad = _adapters(params, CFG, gen)
    x = _normal(gen, (3, 16), 1.0)
    match = (r"head/w: params holds a LoraWeights here: an adapter tree was passed where the "
             r"frozen params go \(the arguments look swapped\)\. Fix: pass the params first and "
             r"the adapters second: lj\.merge\(params, adapters, config\), "
             r"lj\.apply\(fn, config\)\(params, adapters, \*args\)\.")
    calls = {"merge": lambda: lj.merge(ad, params, CFG),
             "apply": lambda: lj.apply(_fn, CFG)(ad, params, x),
             "apply-jit": lambda: jax.jit(lj.apply(_fn, CFG))(ad, params, x),
             "init": lambda: lj.init(ad, CFG, key=rng),
             "describe": lambda: lj.describe(ad, CFG)}
    for call in calls.values():
        with pytest.raises(ValueError, match=match):
            call()
    # The adapters alone (a single LoraWeights as params) name the root.
    with pytest.raises(ValueError, match=r"^params: params holds a LoraWeights here"):
        lj.describe(ad["l1"]["w"], lj.LoraConfig(targets=".*"))


# ----------------------------------------------------------------------------- factor dtypes


@pytest.mark.parametrize("field,dtype", [("a", jnp.int32), ("b", jnp.bool_),
                                         ("a", jnp.complex64), ("m", jnp.int8)])
def test_non_floating_factors_are_refused(rng, field, dtype):
    gen = _gen(rng)
    params = _params(gen)
    cfg = CFG.replace(use_dora=field == "m")
    ad = perturb_b(lj.init(params, cfg, key=rng), key=jax.random.fold_in(rng, 1))
    node = ad["l1"]["w"]
    value = getattr(node, field)
    bad = (jnp.asarray(gen.integers(1, 3, value.shape)) if dtype != jnp.complex64 else
           jnp.asarray(gen.standard_normal(value.shape) + 1j)).astype(dtype)
    ad = {**ad, "l1": {**ad["l1"], "w": node._replace(**{field: bad})}}
    name = jnp.dtype(dtype).name
    match = (rf"l1/w: the adapter's {field} has dtype {name} {re.escape(str(value.shape))}; "
             rf"LoRA factors must be floating point .*Fix: build adapters with lj\.init")
    for call in _runs(params, ad, cfg, _normal(gen, (3, 16), 1.0)).values():
        with pytest.raises(ValueError, match=match):
            call()


def test_mixed_float_factor_dtypes_pass(rng):
    """a and b may differ in floating dtype (apply runs the input through a in a's dtype,
    merge computes in float32)."""
    gen = _gen(rng)
    params = _params(gen)
    ad = _adapters(params, CFG, gen)
    node = ad["l1"]["w"]
    ad = {**ad, "l1": {**ad["l1"], "w": node._replace(a=node.a.astype(jnp.bfloat16))}}
    x = _normal(gen, (3, 16), 1.0)
    runs = {name: call() for name, call in _runs(params, ad, CFG, x).items()}
    want = _fn(runs["merge"], x)
    for name in ("apply", "apply-jit"):
        _assert_within_bf16_bound(runs[name], want, runs["merge"], ad, x, name)


# ----------------------------------------------------------------------------- scale


def _with_scale(ad, path, scale):
    top, leaf = path.split("/")   # test trees only: two-level paths
    return {**ad, top: {**ad[top], leaf: ad[top][leaf]._replace(scale=scale)}}


def test_scale_from_another_alpha_is_refused_outside_jit(rng):
    gen = _gen(rng)
    params = _params(gen)
    made = CFG                                        # alpha 16 / rank 2 = 8
    ad = _adapters(params, made, gen)
    wrong = made.replace(alpha=8)                     # gives 4
    x = _normal(gen, (3, 16), 1.0)
    runs = _runs(params, ad, wrong, x)
    match = (r"head/w: the adapter's scale is 8 but the config gives 4 = alpha 8 / rank 2 "
             r"\(use_rslora=False\): the adapters were made with another alpha, rank or "
             r"use_rslora than this config\. Fix: pass the config the adapters were made with "
             r"\(alpha=16 here gives 8, e\.g\. alpha_pattern=\{r'head/w': 16\}\), or "
             r"LoraConfig\(scale_from='adapters'\)")
    for name in ("merge", "apply"):
        with pytest.raises(ValueError, match=match):
            runs[name]()
    # Under jit the scale is a tracer: not compared, and tracing works (the stored
    # scale is what runs).
    got = runs["apply-jit"]()
    assert_close(got, _fn(lj.merge(params, ad, made), x), rtol=1e-5, what="apply-jit")
    # The alpha the message suggests is the one that fits.
    lj.merge(params, ad, wrong.replace(alpha=16))


def test_scale_mismatch_names_rslora_and_alpha_pattern(rng):
    gen = _gen(rng)
    params = _params(gen)
    made = lj.LoraConfig(rank=4, alpha=8, targets=r"l\d/w")           # 8 / 4 = 2
    ad = _adapters(params, made, gen)
    with pytest.raises(ValueError, match=r"l1/w: the adapter's scale is 2 but the config gives "
                                         r"4 = alpha 8 / rank sqrt\(4\) \(use_rslora=True\)"):
        lj.merge(params, ad, made.replace(use_rslora=True))
    with pytest.raises(ValueError, match=r"l2/w: the adapter's scale is 2 but the config gives "
                                         r"0\.75 = alpha 3 / rank 4"):
        lj.merge(params, ad, made.replace(alpha_pattern={"l2/w": 3}))
    bumped = _with_scale(ad, "l1/w", jnp.float32(2.0 * (1 + 1e-4)))   # beyond float32 rounding
    with pytest.raises(ValueError, match=r"l1/w: the adapter's scale is 2\.0002 but the config "
                                         r"gives 2 "):
        lj.apply(_fn, made)(params, bumped, _normal(gen, (2, 16), 1.0))


def test_scale_rounded_to_its_dtype_passes(rng):
    """A whole tree cast to bfloat16 (scale included) keeps alpha / rank to bf16's precision."""
    gen = _gen(rng)
    params = _params(gen)
    cfg = lj.LoraConfig(rank=3, alpha=16, targets=r"l\d/w")          # 5.333...
    ad = jax.tree.map(lambda v: v.astype(jnp.bfloat16), _adapters(params, cfg, gen))
    assert ad["l1"]["w"].scale.dtype == jnp.bfloat16
    assert float(ad["l1"]["w"].scale) != cfg.scale_for("l1/w")
    x = _normal(gen, (3, 16), 1.0)
    for call in _runs(params, ad, cfg, x).values():
        call()


def test_scale_shape_is_checked(rng):
    gen = _gen(rng)
    params = _params(gen)
    ad = _with_scale(_adapters(params, CFG, gen), "l2/w", jnp.full((3,), 8.0, jnp.float32))
    match = (r"l2/w: the adapter's scale has shape \(3,\), expected \(\) \(a scalar for one "
             r"adapter, one value per adapter in a set")
    for call in _runs(params, ad, CFG, _normal(gen, (3, 16), 1.0)).values():
        with pytest.raises(ValueError, match=match):
            call()


def test_abstract_scales_are_not_compared(rng):
    """Shapes only (a restore skeleton, eval_shape): nothing to compare."""
    params = _params(_gen(rng))
    abstract = jax.eval_shape(lambda p: lj.init(p, CFG, key=jax.random.key(0)), params)
    check_adapters(params, abstract, CFG.replace(alpha=3))


def test_scale_from_adapters_uses_the_stored_scales(rng):
    gen = _gen(rng)
    params = _params(gen)
    ad = _adapters(params, CFG, gen)
    cfg = CFG.replace(alpha=1, scale_from="adapters")
    x = _normal(gen, (3, 16), 1.0)
    want = lj.merge(params, ad, CFG)
    runs = {name: call() for name, call in _runs(params, ad, cfg, x).items()}
    for path in ("l1", "l2", "head"):
        assert_close(runs["merge"][path]["w"], want[path]["w"], rtol=0, what=path)
    for name in ("apply", "apply-jit"):
        assert_close(runs[name], _fn(want, x), rtol=1e-5, what=name)


def test_scale_from_field():
    with pytest.raises(ValueError, match=r"LoraConfig\.scale_from: 'config ' is invalid: it "
                                         r"must be one of \('config', 'adapters'\)"):
        lj.LoraConfig(targets=".*", scale_from="config ")
    cfg = lj.LoraConfig(targets=".*", scale_from="adapters")
    assert lj.LoraConfig.from_dict(cfg.to_dict()) == cfg
    assert "scale_from" not in CFG.to_dict()            # the default: files as before
    # unit scales (combined adapters) are the config's again
    assert cfg.with_ranks({"w": 4}, unit_scale=True).scale_from == "config"


# ----------------------------------------------------------------------------- correct adapters


def _kind(kind, params, rng):
    """(params, config, adapters with non-zero B) of one kind of adapter."""
    key_b = jax.random.fold_in(rng, 7)
    if kind == "quantized":
        params = lj.quantize(params, targets=r"l\d/w", method="nf4", block_size=16)
    cfg = {"float": CFG,
           "bf16": CFG.replace(dtype=jnp.bfloat16, alpha=5),
           "rslora": CFG.replace(rank=4, use_rslora=True, alpha=3),
           "dora": CFG.replace(use_dora=True, rank_pattern={"l1/w": 3}),
           "pissa": CFG.replace(init="pissa", alpha=3),
           "quantized": CFG.replace(alpha_pattern={"l2/w": 7.0}),
           "stacked": lj.LoraConfig(rank=2, alpha=5, targets="stack",
                                    layouts={"stack": lj.Layout(1, 1, 1)})}[kind]
    if kind == "pissa":
        params, ad = lj.init(params, cfg, return_params=True)
    else:
        ad = lj.init(params, cfg, key=rng)
    return params, cfg, perturb_b(ad, key=key_b, std=0.5)


def _stacked_fn(p, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["stack"])[0]


@pytest.mark.parametrize("kind", ["float", "bf16", "rslora", "dora", "pissa", "quantized",
                                  "stacked"])
def test_correct_adapters_pass_every_entry_point(rng, tmp_path, kind):
    gen = _gen(rng)
    base = {"stack": _normal(gen, (3, 16, 16))} if kind == "stacked" else _params(gen)
    fn = _stacked_fn if kind == "stacked" else _fn
    params, cfg, ad = _kind(kind, base, rng)
    x = _normal(gen, (3, 16), 1.0)
    lj.describe(params, cfg)
    dense = lj.dequantize(params) if kind == "quantized" else params
    merged = lj.merge(dense, ad, cfg)
    want = fn(merged, x)
    with warnings.catch_warnings():
        # merging into NF4 requantizes: it may warn that rounding erases part of the update
        warnings.simplefilter("ignore", lj.LoraWarning)
        lj.merge(params, ad, cfg)
    got = {"apply": lj.apply(fn, cfg)(params, ad, x),
           "apply-jit": jax.jit(lj.apply(fn, cfg))(params, ad, x)}
    for name, out in got.items():
        if kind == "bf16":
            _assert_within_bf16_bound(out, want, merged, ad, x, name)
        else:
            assert_close(out, want, rtol=1e-4, what=name)
    lj.analyze(params, ad, cfg)
    lj.save(tmp_path, ad, cfg, params=params)
    back, back_cfg = lj.restore(tmp_path, params=params)
    assert back_cfg == cfg
    assert_close(fn(lj.merge(dense, back, back_cfg), x), want, rtol=0, what="restored")


@pytest.mark.slow
def test_adapter_set_passes_every_entry_point(rng):
    gen = _gen(rng)
    params = _params(gen)
    c2 = lj.LoraConfig(rank=2, alpha=4, targets=r".*/w")
    c3 = lj.LoraConfig(rank=3, alpha=9, targets=r"l\d/w", use_rslora=True)
    members = {"two": (_adapters(params, c2, gen), c2), "three": (_adapters(params, c3, gen), c3)}
    aset = lj.adapter_set(members)
    xs = _normal(gen, (3, 2, 16), 1.0)
    ids = lj.adapter_ids(aset, ["three", "__base__", "two"])
    out = lj.apply_mixed(_fn)(params, aset, ids, xs)
    out_jit = jax.jit(lj.apply_mixed(_fn))(params, aset, ids, xs)
    hot = aset.config.replace(scale_from="adapters")   # members keep their own scales
    assert_close(out[1], _fn(params, xs[1]), rtol=1e-5, what="mixed base")
    for e, name in ((0, "three"), (2, "two")):
        ad, cfg = members[name]
        want = _fn(lj.merge(params, ad, cfg), xs[e])
        assert_close(out[e], want, rtol=1e-5, what=f"mixed {name}")
        assert_close(out_jit[e], want, rtol=1e-5, what=f"mixed-jit {name}")
        trimmed = lj.select_adapter(aset, name, trim=True)
        assert_close(lj.apply(_fn, cfg)(params, trimmed, xs[e]), want, rtol=1e-5, what=name)
        padded = lj.select_adapter(aset, name)
        assert_close(lj.apply(_fn, hot)(params, padded, xs[e]), want, rtol=1e-5,
                     what=f"hot swap {name}")
    merged = lj.merge_weighted(params, aset, {"two": 1.0})
    assert_close(merged["l1"]["w"], lj.merge(params, *members["two"])["l1"]["w"], rtol=1e-6,
                 what="merge_weighted")
    combo = lj.combine(aset, {"two": 0.5, "three": 0.5}, method="cat")
    lj.merge(params, combo.adapters, combo.config)
