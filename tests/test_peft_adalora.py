"""`lj.export_peft_adalora` / `lj.import_peft_adalora`: PEFT's AdaLoRA files both ways.

The reference is PEFT itself: a model saved with ``save_pretrained`` (its
``rank_pattern`` cuts each module to the kept triplets) imports to the same
outputs, and our files load with ``PeftModel.from_pretrained`` to ours.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from tests._asserts import rel_err
from tests.conftest import SEED

D_IN, D_H, D_OUT, INIT_R = 12, 10, 6, 5
KEY_MAP = {r"(l\d)/kernel": r"\1.weight"}


def _gen(k=0):
    return np.random.default_rng(SEED + k)


def _fn(params, x):
    h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"][None])
    return h @ params["l2"]["kernel"] + params["l2"]["bias"][None]


def _net(torch, gen):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = torch.nn.Linear(D_IN, D_H)
            self.l2 = torch.nn.Linear(D_H, D_OUT)

        def forward(self, x):
            return self.l2(torch.tanh(self.l1(x)))

    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.tensor(gen.standard_normal(tuple(p.shape)) * 0.3, dtype=torch.float32))
    return net


def _params(net):
    layer = lambda m: {"kernel": jnp.asarray(m.weight.detach().numpy().T),  # noqa: E731
                       "bias": jnp.asarray(m.bias.detach().numpy())}
    return {"l1": layer(net.l1), "l2": layer(net.l2)}


def _pruned(gen, shape_lead=()):
    """Random non-zero e with some triplets pruned (at least one, not all)."""
    e = gen.uniform(0.5, 1.5, (*shape_lead, INIT_R)) * gen.choice([-1, 1], (*shape_lead, INIT_R))
    keep = gen.random((*shape_lead, INIT_R)) < 0.6
    keep[..., 0], keep[..., 1] = True, False
    return np.where(keep, e, 0.0)


def _trained_like(ad, gen, es):
    out = {}
    for name, e in es.items():
        n = ad[name]["kernel"]
        out[name] = {"kernel": lj.AdaLoraWeights(
            jnp.asarray(gen.standard_normal(n.a.shape) * 0.3, n.a.dtype),
            jnp.asarray(e, n.e.dtype),
            jnp.asarray(gen.standard_normal(n.b.shape) * 0.3, n.b.dtype), n.scale), "bias": None}
    return out


def _config(alpha=8.0):
    return lj.LoraConfig(rank=INIT_R, alpha=alpha, targets=r".*/kernel")


# PEFT 0.21 warns on loading its own AdaLoRA files: its LoRA rank_pattern check
# reads AdaLoRA's {module.lora_E: [bool]} keys as LoRA rank patterns.
PEFT_LOAD_WARNING = "ignore:The following rank_pattern keys did not match:RuntimeWarning"


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.filterwarnings(PEFT_LOAD_WARNING)
def test_peft_saved_adalora_imports_to_the_same_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    gen = _gen(1)
    net = _net(torch, gen)
    params = _params(net)
    pcfg = peft.AdaLoraConfig(init_r=INIT_R, lora_alpha=8.0, target_modules=["l1", "l2"],
                              total_step=10)
    model = peft.get_peft_model(net, pcfg)
    pattern = {}
    with torch.no_grad():
        for name in ("l1", "l2"):
            layer = getattr(model.base_model.model, name)
            e = _pruned(gen)
            for which, shape in (("lora_A", layer.lora_A["default"].shape),
                                 ("lora_B", layer.lora_B["default"].shape)):
                getattr(layer, which)["default"].copy_(
                    torch.tensor(gen.standard_normal(tuple(shape)) * 0.3, dtype=torch.float32))
            layer.lora_E["default"].copy_(torch.tensor(e[:, None], dtype=torch.float32))
            pattern[f"{name}.lora_E.default"] = (e != 0).tolist()   # as the allocator keys it
    model.peft_config["default"].rank_pattern = pattern
    x = gen.standard_normal((7, D_IN)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.tensor(x)).numpy()
    model.save_pretrained(str(tmp_path))

    ad, cfg = lj.import_peft_adalora(str(tmp_path), params, key_map=KEY_MAP)
    assert cfg.rank == INIT_R and cfg.targets == ("l1/kernel", "l2/kernel")
    for name in ("l1", "l2"):
        got = np.asarray(ad[name]["kernel"].e) != 0
        assert got.tolist() == pattern[f"{name}.lora_E.default"], name
    out = jax.jit(lj.apply(_fn, cfg))(params, lj.adalora_view(ad), jnp.asarray(x))
    assert rel_err(out, want) <= 1e-5
    # and what PEFT itself reloads from those files is that model too
    again = peft.PeftModel.from_pretrained(_net(torch, _gen(1)), str(tmp_path))
    with torch.no_grad():
        assert rel_err(again(torch.tensor(x)).numpy(), want) <= 1e-5


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.filterwarnings(PEFT_LOAD_WARNING)
@pytest.mark.parametrize("nothing_kept", [False, True])
def test_exported_adalora_loads_in_peft_with_our_outputs(tmp_path, nothing_kept):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    gen = _gen(2)
    net = _net(torch, gen)
    params = _params(net)
    cfg = _config(alpha=float(gen.uniform(1, 16)))
    e2 = np.zeros(INIT_R) if nothing_kept else _pruned(gen)
    ad = _trained_like(lj.adalora_init(params, cfg, key=jax.random.key(SEED)), gen,
                       {"l1": _pruned(gen), "l2": e2})
    schedule = dict(target_r=2, total_step=100, tinit=10, tfinal=20, delta_t=5)
    lj.export_peft_adalora(str(tmp_path), ad, cfg, key_map=KEY_MAP, params=params,
                           schedule=schedule)
    with open(tmp_path / "adapter_config.json") as fh:
        written = json.load(fh)
    assert (written["init_r"], written["deltaT"], written["total_step"]) == (INIT_R, 5, 100)
    assert written["rank_pattern"]["l1.lora_E"] == (np.asarray(ad["l1"]["kernel"].e) != 0).tolist()

    model = peft.PeftModel.from_pretrained(net, str(tmp_path))
    assert model.peft_config["default"].peft_type == "ADALORA"
    x = gen.standard_normal((7, D_IN)).astype(np.float32)
    with torch.no_grad():
        got = model(torch.tensor(x)).numpy()
    want = lj.apply(_fn, cfg)(params, lj.adalora_view(ad), jnp.asarray(x))
    assert rel_err(got, want) <= 1e-5
    if nothing_kept:   # PEFT can't load rank 0: one zero triplet, which changes nothing
        assert written["rank_pattern"]["l2.lora_E"] == [True] + [False] * (INIT_R - 1)
        from safetensors.numpy import load_file
        e = load_file(str(tmp_path / "adapter_model.safetensors"))["base_model.model.l2.lora_E"]
        assert e.shape == (1, 1) and float(e[0, 0]) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_round_trip_keeps_the_view(tmp_path, stacked):
    gen = _gen(3)
    lead = (3,) if stacked else ()
    params = {"l1": {"kernel": jnp.asarray(gen.standard_normal((*lead, D_IN, D_H)),
                                           jnp.float32)},
              "l2": {"kernel": jnp.asarray(gen.standard_normal((*lead, D_H, D_OUT)),
                                           jnp.float32)}}
    key_map = {r"(l\d)/kernel": r"layers.{i}.\1.weight"} if stacked else KEY_MAP
    cfg = _config(alpha=float(gen.uniform(1, 16)))
    if stacked:
        cfg = cfg.replace(layouts={r".*/kernel": lj.Layout(1, 1, 1)})
    base = lj.adalora_init(params, cfg, key=jax.random.key(SEED))
    ad = {}
    for name in ("l1", "l2"):
        n = base[name]["kernel"]
        ad[name] = {"kernel": n._replace(
            a=jnp.asarray(gen.standard_normal(n.a.shape), n.a.dtype),
            e=jnp.asarray(_pruned(gen, lead), n.e.dtype),
            b=jnp.asarray(gen.standard_normal(n.b.shape), n.b.dtype))}
    lj.export_peft_adalora(str(tmp_path), ad, cfg, key_map=key_map)
    back, cfg2 = lj.import_peft_adalora(str(tmp_path), params, key_map=key_map)
    assert cfg2.rank == INIT_R and np.isclose(cfg2.scale_for("l1/kernel"),
                                              cfg.scale_for("l1/kernel"), rtol=1e-6)
    want, got = lj.adalora_view(ad), lj.adalora_view(back)
    for name in ("l1", "l2"):
        w, g = want[name]["kernel"], got[name]["kernel"]
        np.testing.assert_array_equal(np.asarray(g.a), np.asarray(w.a), err_msg=name)
        # pruned rows of b are not stored: they are zero after the trip
        kept = (np.asarray(ad[name]["kernel"].e) != 0)[..., None]
        np.testing.assert_array_equal(np.asarray(g.b), np.where(kept, np.asarray(w.b), 0))
        np.testing.assert_allclose(float(g.scale), float(w.scale), rtol=1e-6)
    x = jnp.asarray(gen.standard_normal((4, D_IN)), jnp.float32)
    if not stacked:
        def fn(p, x):
            return jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]
        assert rel_err(lj.apply(fn, cfg2)(params, got, x), lj.apply(fn, cfg)(params, want, x)) \
            <= 1e-6


def _exported(tmp_path, gen=None):
    gen = gen or _gen(4)
    params = {"l1": {"kernel": jnp.asarray(gen.standard_normal((D_IN, D_H)), jnp.float32)},
              "l2": {"kernel": jnp.asarray(gen.standard_normal((D_H, D_OUT)), jnp.float32)}}
    cfg = _config()
    base = lj.adalora_init(params, cfg, key=jax.random.key(SEED))
    ad = {n: {"kernel": base[n]["kernel"]._replace(e=jnp.asarray(_pruned(gen), jnp.float32))}
          for n in ("l1", "l2")}
    lj.export_peft_adalora(str(tmp_path), ad, cfg, key_map=KEY_MAP)
    return params, ad, cfg


def _edit_config(tmp_path, fn):
    path = tmp_path / "adapter_config.json"
    c = json.loads(path.read_text())
    fn(c)
    path.write_text(json.dumps(c))


def _edit_tensors(tmp_path, fn):
    from safetensors.numpy import load_file, save_file
    path = str(tmp_path / "adapter_model.safetensors")
    t = load_file(path)
    fn(t)
    save_file(t, path)   # no lora_jax metadata: no sha check


def test_import_errors_name_the_file_and_key(tmp_path):
    params, ad, cfg = _exported(tmp_path)
    imp = lambda: lj.import_peft_adalora(str(tmp_path), params, key_map=KEY_MAP)  # noqa: E731

    _edit_config(tmp_path, lambda c: c["rank_pattern"]["l1.lora_E"].append(False))
    with pytest.raises(ValueError, match=r"adapter_config.json.*rank_pattern\['l1.lora_E'\] "
                                         r"has 6 entries, but init_r=5"):
        imp()
    _edit_config(tmp_path, lambda c: c["rank_pattern"]["l1.lora_E"].pop())

    def flip(c):
        c["rank_pattern"]["l2.lora_E"][1] = True   # _pruned always prunes triplet 1
    _edit_config(tmp_path, flip)
    with pytest.raises(ValueError, match=r"safetensors.*base_model.model.l2: lora_A .* don't "
                                         r"fit the"):
        imp()
    _edit_config(tmp_path, lambda c: c["rank_pattern"]["l2.lora_E"].__setitem__(1, False))

    _edit_tensors(tmp_path, lambda t: t.pop("base_model.model.l1.lora_E"))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors.*"
                                         r"base_model.model.l1.lora_E is missing"):
        imp()


def test_import_refuses_other_files(tmp_path):
    params, ad, cfg = _exported(tmp_path / "ada")
    with pytest.raises(ValueError, match=r"key 'base_model.model.l1.lora_A' is not .* for a "
                                         r"linear module the key map gives"):
        lj.import_peft_adalora(str(tmp_path / "ada"), params, key_map={r"(l\d)/kernel": r"x.\1.w"})
    lora = lj.init(params, cfg, key=jax.random.key(SEED))
    lj.export_peft(str(tmp_path / "lora"), lora, cfg, key_map=KEY_MAP)
    with pytest.raises(ValueError, match=r"adapter_config.json.*peft_type='LORA': not an AdaLoRA "
                                         r"adapter.*lj.import_peft"):
        lj.import_peft_adalora(str(tmp_path / "lora"), params, key_map=KEY_MAP)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        lj.import_peft_adalora(str(tmp_path / "none"), params, key_map=KEY_MAP)
    small = {"l1": {"kernel": jnp.zeros((D_IN + 1, D_H))}, "l2": params["l2"]}
    with pytest.raises(ValueError, match=r"adapter_model.safetensors"):
        lj.import_peft_adalora(str(tmp_path / "ada"), small, key_map=KEY_MAP)


@pytest.mark.slow
def test_export_errors(tmp_path):
    gen = _gen(5)
    params, ad, cfg = _exported(tmp_path / "ok", gen)
    lora = lj.init(params, cfg, key=jax.random.key(SEED))
    with pytest.raises(ValueError, match="must hold AdaLoraWeights only.*lj.export_peft"):
        lj.export_peft_adalora(str(tmp_path / "x"), lora, cfg, key_map=KEY_MAP)
    mixed = lj.adalora_init(params, cfg.replace(rank_pattern={"l2/kernel": 3}),
                            key=jax.random.key(SEED))
    with pytest.raises(ValueError, match=r"initial ranks \[3, 5\].*one init_r"):
        lj.export_peft_adalora(str(tmp_path / "x"), mixed, cfg, key_map=KEY_MAP)
    with pytest.raises(ValueError, match="the key map leaves 'l2/kernel' unmapped"):
        lj.export_peft_adalora(str(tmp_path / "x"), ad, cfg, key_map={r"l1/kernel": "l1.weight"})
    stacked = {"l1": {"kernel": jnp.zeros((2, D_IN, D_H))}}
    scfg = cfg.replace(layouts={r".*/kernel": lj.Layout(1, 1, 1)})
    sad = lj.adalora_init(stacked, scfg, key=jax.random.key(SEED))
    with pytest.raises(ValueError, match=r"l1/kernel.*1 stacked axes.*'\{i\}'"):
        lj.export_peft_adalora(str(tmp_path / "x"), sad, scfg, key_map=KEY_MAP)
    with pytest.raises(TypeError, match="schedule=.*total_step"):
        lj.export_peft_adalora(str(tmp_path / "x"), ad, cfg, key_map=KEY_MAP,
                               schedule={"target_r": 2})
    with pytest.raises(ValueError, match="tinit=5 leaves no budgeting phase"):
        lj.export_peft_adalora(str(tmp_path / "x"), ad, cfg, key_map=KEY_MAP,
                               schedule={"target_r": 2, "total_step": 6, "tinit": 5, "tfinal": 1})
    with pytest.raises(ValueError, match="embedding"):
        emb = {"params": {"model": {"embed_tokens": {"embedding": jnp.zeros((9, 4))}}}}
        ead = lj.adalora_init(emb, cfg.replace(targets=".*embedding"), key=jax.random.key(0))
        lj.export_peft_adalora(str(tmp_path / "x"), ead, cfg, key_map="llama")


@pytest.mark.parametrize("field, value, match", [
    ("init_r", 0, "init_r=0 is not a positive integer"),
    ("lora_alpha", -1.0, "lora_alpha=-1.0 is not a number > 0"),
    ("bias", "all", "bias='all' is not supported"),
    ("use_dora", True, "use_dora=True is not supported"),
])
def test_import_refuses_malformed_configs(tmp_path, field, value, match):
    params, _, _ = _exported(tmp_path)
    _edit_config(tmp_path, lambda c: c.__setitem__(field, value))
    with pytest.raises(ValueError, match=r"adapter_config.json: .*" + match):
        lj.import_peft_adalora(str(tmp_path), params, key_map=KEY_MAP)


def test_import_detects_corrupted_and_empty_files(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    params, _, _ = _exported(tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    t = load_file(path)
    t["base_model.model.l1.lora_A"] = t["base_model.model.l1.lora_A"] + 1
    save_file(t, path, metadata=meta)
    with pytest.raises(ValueError, match="tensor base_model.model.l1.lora_A does not match the "
                                         "sha256"):
        lj.import_peft_adalora(str(tmp_path), params, key_map=KEY_MAP)
    save_file({}, path)
    with pytest.raises(ValueError, match="no AdaLoRA factors"):
        lj.import_peft_adalora(str(tmp_path), params, key_map=KEY_MAP)
