"""PEFT's ``target_parameters`` (LoRA on MoE expert ``nn.Parameter``s), both ways.

The reference is PEFT 0.21 in torch: a small MoE whose experts are 3-D
``nn.Parameter``s (``gate_up_proj`` registered before ``down_proj``, as in
transformers), next to an ``nn.Linear``. A lora_jax adapter exported with
`lj.export_peft` and loaded by ``PeftModel.from_pretrained`` gives the outputs
of `lj.apply`, and a PEFT adapter read by `lj.import_peft` gives PEFT's
outputs, <= 1e-5 relative (float32). Both conventions: ``(E, out, in)``
(PEFT's default, kind ``"experts"``) and ``(E, in, out)`` with
``is_transposed`` (kind ``"experts_in_out"``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from tests._asserts import rel_err
from tests.conftest import SEED

pytestmark = [pytest.mark.torch]

E, D, F, T, R = 4, 8, 6, 10, 2


def _gen(k=0):
    return np.random.default_rng(SEED + 9000 + k)


def _torch_net(transposed: bool, gen):
    torch = pytest.importorskip("torch")

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.is_transposed = transposed
            up = gen.standard_normal((E, D, F) if transposed else (E, F, D)) * 0.3
            down = gen.standard_normal((E, F, D) if transposed else (E, D, F)) * 0.3
            self.gate_up_proj = torch.nn.Parameter(torch.tensor(up, dtype=torch.float32))
            self.down_proj = torch.nn.Parameter(torch.tensor(down, dtype=torch.float32))

        def forward(self, x, ids):
            up, down = self.gate_up_proj[ids], self.down_proj[ids]
            if transposed:            # (E, in, out)
                h = torch.einsum("td,tdf->tf", x, up)
                return torch.einsum("tf,tfd->td", torch.tanh(h), down)
            h = torch.einsum("td,tfd->tf", x, up)            # (E, out, in)
            return torch.einsum("tf,tdf->td", torch.tanh(h), down)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(D, D, bias=False)
            self.experts = Experts()

        def forward(self, x, ids):
            return self.experts(self.proj(x), ids)

    torch.manual_seed(int(gen.integers(1 << 30)))
    return Net().eval()


def _jax_side(net, transposed: bool):
    """params (leaves (E, in, out)), fn and key map of the torch net."""
    up = net.experts.gate_up_proj.detach().numpy()
    down = net.experts.down_proj.detach().numpy()
    if not transposed:
        up, down = np.swapaxes(up, 1, 2), np.swapaxes(down, 1, 2)
    params = {"experts": {"gate_up_proj": jnp.asarray(up), "down_proj": jnp.asarray(down)},
              "proj": {"kernel": jnp.asarray(net.proj.weight.detach().numpy().T)}}

    def fn(p, x, ids):
        h = jnp.einsum("td,tdf->tf", x @ p["proj"]["kernel"], p["experts"]["gate_up_proj"][ids])
        return jnp.einsum("tf,tfd->td", jnp.tanh(h), p["experts"]["down_proj"][ids])

    kind = "experts_in_out" if transposed else "experts"
    key_map = lj.interop.KeyMap([(r"experts/(gate_up_proj|down_proj)", r"experts.\1", kind),
                                 (r"proj/kernel", "proj.weight", "linear")])
    return params, fn, key_map


def _inputs(gen):
    x = gen.standard_normal((T, D)).astype(np.float32)
    ids = np.concatenate([np.arange(E), gen.integers(0, E, T - E)]).astype(np.int32)
    return x, ids


@pytest.mark.slow
@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "in_out"])
def test_exported_expert_adapter_loads_in_peft_with_the_same_outputs(rng, tmp_path, transposed):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    gen = _gen(1)
    net = _torch_net(transposed, gen)
    params, fn, key_map = _jax_side(net, transposed)
    x, ids = _inputs(gen)
    cfg = lj.configure(lj.LoraConfig(rank=R, alpha=2 * R, targets=r"experts/.*|proj/kernel"),
                       fn, params, x, ids)
    ad = lj.init(params, cfg, key=rng)
    ad = jax.tree.map(lambda n: n._replace(b=jnp.asarray(gen.standard_normal(n.b.shape) * 0.3,
                                                         jnp.float32)) if lj.is_lora(n) else n,
                      ad, is_leaf=lj.is_lora)
    lj.export_peft(tmp_path, ad, cfg, key_map=key_map, params=params)
    with torch.no_grad():
        pm = peft.PeftModel.from_pretrained(net, str(tmp_path)).eval()
        got = pm(torch.tensor(x), torch.tensor(ids, dtype=torch.long)).numpy()
    want = np.asarray(lj.apply(fn, cfg)(params, ad, x, ids))
    assert rel_err(got, want) <= 1e-5
    assert rel_err(want, np.asarray(fn(params, x, ids))) > 1e-3     # the adapters act
    back, back_cfg = lj.import_peft(tmp_path, params, key_map=key_map)
    for path in ("gate_up_proj", "down_proj"):
        np.testing.assert_allclose(np.asarray(back["experts"][path].a),
                                   np.asarray(ad["experts"][path].a), rtol=0, atol=0)
        np.testing.assert_allclose(np.asarray(back["experts"][path].b),
                                   np.asarray(ad["experts"][path].b), rtol=0, atol=0)
    assert back_cfg.layout_for("experts/down_proj") == lj.Layout(1, 1, 1)


@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "in_out"])
def test_peft_expert_adapter_imports_with_peft_s_outputs(tmp_path, transposed):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    gen = _gen(2)
    net = _torch_net(transposed, gen)
    params, fn, key_map = _jax_side(net, transposed)
    pcfg = peft.LoraConfig(r=R, lora_alpha=3 * R, target_modules=["proj"],
                           target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                           init_lora_weights=False)       # random B: the adapter acts
    pm = peft.get_peft_model(net, pcfg).eval()
    pm.save_pretrained(str(tmp_path))
    x, ids = _inputs(gen)
    with torch.no_grad():
        want = pm(torch.tensor(x), torch.tensor(ids, dtype=torch.long)).numpy()
    ad, cfg = lj.import_peft(tmp_path, params, key_map=key_map)
    assert ad["experts"]["gate_up_proj"].a.shape == (E, D, R)
    got = np.asarray(lj.apply(fn, cfg)(params, ad, x, ids))
    assert rel_err(got, want) <= 1e-5
    assert lj.explain(fn, cfg, params, ad, x, ids).n_fallbacks == 0


def test_expert_export_refuses_what_peft_cannot_hold(rng, tmp_path):
    pytest.importorskip("safetensors")
    gen = _gen(3)
    params = {"experts": {"gate_up_proj": jnp.asarray(gen.standard_normal((E, D, F)),
                                                      jnp.float32)}}
    key_map = lj.interop.KeyMap([(r"experts/(gate_up_proj)", r"experts.\1", "experts")])
    cfg = lj.LoraConfig(rank=R, targets="experts/gate_up_proj")      # the default layout
    ad = lj.init(params, cfg, key=rng)
    with pytest.raises(ValueError, match=r"experts/gate_up_proj: an expert weight "
                       r"\(experts.gate_up_proj\) exports as PEFT's target_parameters only "
                       r"with plain LoRA on lj.Layout\(1, 1, 1\)[\s\S]*lj.configure"):
        lj.export_peft(tmp_path / "a", ad, cfg, key_map=key_map)
    two = {"experts": {"w_a": params["experts"]["gate_up_proj"],
                       "w_b": params["experts"]["gate_up_proj"]}}
    km2 = lj.interop.KeyMap([(r"experts/(w_a|w_b)", r"experts.\1", "experts")])
    cfg2 = lj.LoraConfig(rank=R, targets="experts/.*", layouts={".*": lj.Layout(1, 1, 1)})
    with pytest.raises(ValueError, match=r"experts: this module has several expert parameters "
                       r"\['w_a', 'w_b'\][\s\S]*expert_order"):
        lj.export_peft(tmp_path / "b", lj.init(two, cfg2, key=rng), cfg2, key_map=km2)
    lj.export_peft(tmp_path / "c", lj.init(two, cfg2, key=rng), cfg2, key_map=km2,
                   expert_order=("w_b", "w_a"))
    import json
    written = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["experts.w_a", "experts.w_b"]
    back, _ = lj.import_peft(tmp_path / "c", two, key_map=km2, expert_order=("w_b", "w_a"))
    assert back["experts"]["w_a"].a.shape == (E, D, R)
