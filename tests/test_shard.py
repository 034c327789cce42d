"""Sharding rules and the sharded train step.

The rules are checked here on abstract meshes (shapes and shardings only);
the numerics on 8 CPU devices run in one subprocess (`tests/_shard_worker.py`):
XLA's device count is fixed when the backend starts, and this process has
started it with one device.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

import lora_jax as lj
from examples import gpt
from tests._asserts import CompileCounter
from tests._shard_worker import SMALL, make_inputs
from tests.conftest import ROOT, SEED

MESH = AbstractMesh((2, 4), ("data", "model"))


def _abstract(shapes: dict, specs: dict, mesh=MESH):
    """{path: ShapeDtypeStruct with NamedSharding} as a nested dict."""
    out = {}
    for path, shape in shapes.items():
        node = out
        *parents, leaf = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, jnp.float32,
                                          sharding=NamedSharding(mesh, specs.get(path, P())))
    return out


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _specs(node):
    return tuple(getattr(node, f).spec for f in ("a", "b", "scale"))


# ----------------------------------------------------------------------------- rules


def test_column_and_row_parallel_rules():
    params = _abstract(
        {"q/kernel": (64, 128), "o/kernel": (128, 64), "fc1/kernel": (64, 256),
         "fc1/bias": (256,), "head/kernel": (64, 32)},
        {"q/kernel": P("data", "model"), "o/kernel": P("model", "data"),
         "fc1/kernel": P(None, "model"), "fc1/bias": P("model"),
         "head/kernel": P(None, "model")})
    cfg = lj.LoraConfig(rank=8, targets=r"(q|o|fc1)/kernel", train=r"head/kernel")
    sh = lj.adapter_shardings(params, cfg)
    # a follows W's input axis, b W's output axis; the rank axis and scale replicated
    assert _specs(sh["q"]["kernel"]) == (P("data", None), P(None, "model"), P())
    assert _specs(sh["o"]["kernel"]) == (P("model", None), P(None, "data"), P())
    assert _specs(sh["fc1"]["kernel"]) == (P(None, None), P(None, "model"), P())
    assert sh["fc1"]["bias"] is None
    assert sh["head"]["kernel"] == params["head"]["kernel"].sharding   # trained: follows W
    # the result mirrors lj.init's tree
    ad = jax.eval_shape(lambda p: lj.init(p, cfg, key=jax.random.key(0)), params)
    assert jax.tree.structure(sh) == jax.tree.structure(ad)


def test_stacked_axes_follow_w():
    # nn.scan stack: (layers, in, out), layers sharded over 'data' (pipeline-style)
    params = _abstract({"blocks/q/kernel": (4, 64, 128)},
                       {"blocks/q/kernel": P("data", None, "model")})
    cfg = lj.LoraConfig(rank=4, targets=r".*/kernel", layouts={r"blocks/.*": lj.Layout(1, 1, 1)})
    a, b, scale = _specs(lj.adapter_shardings(params, cfg)["blocks"]["q"]["kernel"])
    assert (a, b, scale) == (P("data", None, None), P("data", None, "model"), P())


@pytest.mark.parametrize("w_spec,a_spec,b_spec", [
    # the outermost merged axis sharded: a's blocks line up with W's
    (P("model", None, "data"), P("model", None), P(None, "data")),
    # an inner merged axis sharded: the first sharded one is taken
    (P(None, "model", None), P("model", None), P(None, None)),
    # both sharded: the first one wins
    (P("model", "data", None), P("model", None), P(None, None)),
    # several mesh axes on one W axis carry over as a tuple
    (P(None, None, ("data", "model")), P(None, None), P(None, ("data", "model"))),
])
def test_flattened_axes(w_spec, a_spec, b_spec):
    # an out-projection (heads, head_dim, d) adapted with layout (0, 2, 1):
    # a: (heads * head_dim, r), b: (r, d)
    params = _abstract({"o/kernel": (4, 16, 64)}, {"o/kernel": w_spec})
    cfg = lj.LoraConfig(rank=4, targets="o/kernel", layouts={"o/kernel": (0, 2, 1)})
    node = lj.adapter_shardings(params, cfg)["o"]["kernel"]
    assert (node.a.spec, node.b.spec) == (a_spec, b_spec)


def test_multi_axis_output_flattened():
    # a q projection (d, heads, head_dim), heads sharded: b's flat output axis takes it
    params = _abstract({"q/kernel": (64, 4, 16)}, {"q/kernel": P("data", "model", None)})
    cfg = lj.LoraConfig(rank=4, targets="q/kernel", layouts={"q/kernel": (0, 1, 2)})
    node = lj.adapter_shardings(params, cfg)["q"]["kernel"]
    assert (node.a.spec, node.b.spec) == (P("data", None), P(None, "model"))


def test_overrides_and_shardings_argument():
    params = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    given = {"w": NamedSharding(MESH, P("data", "model"))}
    cfg = lj.LoraConfig(rank=4, targets="w")
    sh = lj.adapter_shardings(params, cfg, shardings=given,
                              overrides={r"w/b": P(None, "data"), r"w/a": P()})
    assert _specs(sh["w"]) == (P(), P(None, "data"), P())
    full = NamedSharding(MESH, P("model", None))
    assert lj.adapter_shardings(params, cfg, shardings=given,
                                overrides=[("w/a", full)])["w"].a == full


@pytest.mark.parametrize("override,match", [
    ({"nothing/.*": P()}, r"matched no path.*\n  w/a"),
    ({"w/a": P("data", None, None)}, r"w/a: override .* 3 entries .* shape \(64, 4\)"),
    ({"w/a": P("pipe")}, r"w/a: override .* mesh axis 'pipe'.*\('data', 'model'\)"),
    ({"w/b": P(None, "data")}, None),                     # fine: 64 % 2 == 0
    ({"w/b": P("model", None)}, r"w/b: .* axis 0 \(size 4\) over 4 devices"),   # rank 4 ok
    ({"w/a": P(("data", "data"))}, r"w/a: .* uses mesh axis 'data' twice"),
])
def test_override_errors(override, match):
    params = _abstract({"w": (64, 64)}, {"w": P("data", "model")})
    cfg = lj.LoraConfig(rank=4, targets="w")
    if match is None:
        lj.adapter_shardings(params, cfg, overrides=override)
        return
    if "size 4" in match:   # a rank of 4 split over 4 devices is legal; 3 is not
        cfg = lj.LoraConfig(rank=3, targets="w")
        match = match.replace("size 4", "size 3")
    with pytest.raises(ValueError, match=match):
        lj.adapter_shardings(params, cfg, overrides=override)


def test_override_type_errors():
    params = _abstract({"w": (64, 64)}, {"w": P()})
    cfg = lj.LoraConfig(rank=4, targets="w")
    with pytest.raises(TypeError, match=r"overrides\['w/a'\] is a str"):
        lj.adapter_shardings(params, cfg, overrides={"w/a": "data"})
    with pytest.raises(TypeError, match="not a \\(regex, PartitionSpec\\) pair"):
        lj.adapter_shardings(params, cfg, overrides=[("w/a",)])
    with pytest.raises(ValueError, match="not a valid regex"):
        lj.adapter_shardings(params, cfg, overrides={"w/(a": P()})


def test_unsharded_params_are_an_error_naming_the_path():
    cfg = lj.LoraConfig(rank=4, targets=r".*kernel")
    with pytest.raises(TypeError, match=r"layer/kernel: .* carries no sharding.*param_shardings"):
        lj.adapter_shardings({"layer": {"kernel": np.ones((8, 8), np.float32)}}, cfg)
    with pytest.raises(ValueError, match="shardings= does not mirror params"):
        lj.adapter_shardings({"kernel": jnp.ones((8, 8))}, cfg, shardings={"other": None})


def test_single_device_params_give_single_device_adapters():
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = {"w": jax.device_put(jnp.ones((8, 8)), dev)}
    sh = lj.adapter_shardings(params, lj.LoraConfig(rank=2, targets="w"))
    assert sh["w"] == lj.LoraWeights(dev, dev, dev)


def test_param_shardings():
    params = {"q": {"kernel": jnp.ones((8, 16)), "bias": jnp.ones(16)}}
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    sh = lj.param_shardings(params, mesh, rules={r".*/kernel": P("data", "model")})
    assert sh["q"]["kernel"].spec == P("data", "model") and sh["q"]["bias"].spec == P()
    with pytest.raises(ValueError, match=r"matched no path.*\n  q/bias"):
        lj.param_shardings(params, mesh, rules={r".*/scale": P()})
    with pytest.raises(ValueError, match=r"q/bias: the rule's spec .* 2 entries"):
        lj.param_shardings(params, mesh, rules={r".*": P("data", "model")})
    big = {"w": jax.ShapeDtypeStruct((6, 8), jnp.float32)}
    with pytest.raises(ValueError, match=r"w: .* axis 0 \(size 6\) over 4 devices"):
        lj.param_shardings(big, MESH, rules={"w": P("model")})
    with pytest.raises(TypeError, match="mapping"):
        lj.param_shardings(params, mesh, rules=3)


# ----------------------------------------------------------------------------- optimizer state


def _ad_and_shardings():
    params = _abstract({"q/kernel": (64, 128), "o/kernel": (128, 64)},
                       {"q/kernel": P("data", "model"), "o/kernel": P("model", "data")})
    cfg = lj.LoraConfig(rank=8, targets=r".*/kernel")
    ad = jax.eval_shape(lambda p: lj.init(p, cfg, key=jax.random.key(0)), params)
    return params, cfg, ad, lj.adapter_shardings(params, cfg)


def test_opt_state_follows_adapters():
    _, _, ad, sh = _ad_and_shardings()
    tx = lj.optimizer(optax.adam(1e-3))
    state_sh = lj.opt_state_shardings(jax.eval_shape(tx.init, ad), ad, sh)
    adam = state_sh.inner_states["train"].inner_state[0]
    assert adam.count.spec == P()
    for moment in (adam.mu, adam.nu):
        assert moment["q"]["kernel"].a == sh["q"]["kernel"].a
        assert moment["o"]["kernel"].b == sh["o"]["kernel"].b
    # same structure as the state itself: usable as jit shardings
    assert jax.tree.structure(state_sh) == jax.tree.structure(jax.eval_shape(tx.init, ad))


def test_opt_state_of_other_shapes_is_replicated():
    _, _, ad, sh = _ad_and_shardings()
    # adafactor keeps factored row/column statistics: same paths, other shapes
    tx = lj.optimizer(optax.adafactor(1e-3, min_dim_size_to_factor=8))
    state = jax.eval_shape(tx.init, ad)
    state_sh = lj.opt_state_shardings(state, ad, sh)
    for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                               jax.tree.leaves(state_sh)):
        if "/q/kernel/a" in "/" + lj.path_str(path) and leaf.shape == (64, 8):
            assert s == sh["q"]["kernel"].a
        elif leaf.shape not in ((64, 8), (8, 128), (128, 8), (8, 64)):
            assert s.spec == P(), lj.path_str(path)
    # plain optax (no lj.optimizer): the scales get state, replicated like them
    plain = lj.opt_state_shardings(jax.eval_shape(optax.adam(1e-3).init, ad), ad, sh)
    assert plain[0].mu["q"]["kernel"].scale.spec == P()
    with pytest.raises(ValueError, match="shardings do not mirror adapters"):
        lj.opt_state_shardings(state, ad, {"q": None})


# ----------------------------------------------------------------------------- the step, 1 device


@pytest.fixture(scope="module")
def one_device_setup():
    # Auto axes: the reference decoder's embedding lookup is not ready for
    # jax.make_mesh's default Explicit axes.
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    model, variables, cfg, _ = make_inputs(SEED)          # one block, numpy-filled
    rules = {r".*/(q|k|v|fc1)/kernel": P("data", "model"), r".*/(o|fc2)/kernel": P("model", "data")}
    params = jax.device_put(variables, lj.param_shardings(variables, mesh, rules=rules))
    tx = lj.optimizer(optax.adam(1e-2))
    sh = lj.train_shardings(params, cfg, tx, batch=P("data"))
    fwd = lj.apply(model.apply, cfg)

    def loss(v, a, toks):
        return gpt.causal_lm_loss(fwd(v, a, toks[:, :-1]), toks[:, 1:])
    tokens = gpt.random_tokens(SMALL, 4, seed=SEED)
    return params, cfg, tx, sh, loss, jax.device_put(tokens, sh.batch[0]), jax.random.key(SEED)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_one_device_mesh_no_recompiles_and_state_stays_put(one_device_setup):
    params, cfg, tx, sh, loss, tokens, rng = one_device_setup
    step = lj.make_sharded_train_step(loss, tx, sh)
    ad = lj.init(params, cfg, key=rng)
    opt = tx.init(ad)
    # scale and the step count start uncommitted; shard_train_state commits them
    assert not ad["params"]["block_0"]["attn"]["q"]["kernel"].scale.committed
    ad, opt = lj.shard_train_state(ad, opt, sh)
    placed = jax.tree.map(lambda x: x.sharding, (ad, opt))
    assert all(x.committed for x in jax.tree.leaves((ad, opt)))
    losses = []
    with CompileCounter() as cc:
        for _ in range(20):
            ad, opt, l = step(params, ad, opt, tokens)
            losses.append(float(l))
    assert cc.count == 1                      # the first step's compile, nothing after
    assert losses[-1] < losses[0]
    assert jax.tree.map(lambda x: x.sharding, (ad, opt)) == placed
    assert l.sharding == sh.scalar


@pytest.mark.standard_promotion
def test_step_with_aux_and_errors(one_device_setup, rng):
    params, cfg, tx, sh, loss, tokens, _ = one_device_setup
    # aux and donate=False on a one-matrix model (no second decoder compile)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
    w = {"w": jax.device_put(jax.random.normal(rng, (8, 8)), NamedSharding(mesh, P()))}
    wcfg = lj.LoraConfig(rank=2, targets="w")
    wsh = lj.train_shardings(w, wcfg, tx, batch=P("data"))
    fwd = lj.apply(lambda p, x: x @ p["w"], wcfg)

    def loss_aux(p, a, x):
        y = fwd(p, a, x)
        return jnp.mean(y ** 2), {"mean": jnp.mean(y)}
    step = lj.make_sharded_train_step(loss_aux, tx, wsh, has_aux=True, donate=False)
    ad = lj.init(w, wcfg, key=rng)
    ad, opt = lj.shard_train_state(ad, tx.init(ad), wsh)
    x = jax.device_put(jnp.ones((4, 8)), wsh.batch[0])
    _, _, l, aux = step(w, ad, opt, x)
    assert np.isfinite(float(l)) and np.isfinite(float(aux["mean"]))
    assert np.isfinite(float(ad["w"].a.sum()))      # not donated: still readable
    with pytest.raises(TypeError, match="lj.TrainShardings"):
        lj.make_sharded_train_step(loss, tx, sh.adapters)
    with pytest.raises(TypeError, match="lj.TrainShardings"):
        lj.shard_train_state(ad, opt, {})
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        lj.train_shardings(params, cfg, optax.adam, batch=P())
    with pytest.raises(TypeError, match=r"batch\[1\] is a str"):
        lj.train_shardings(params, cfg, tx, batch=(P("data"), "data"))
    unsharded = jax.tree.map(np.asarray, params)
    with pytest.raises(TypeError, match="params/.* carries no sharding"):
        lj.train_shardings(unsharded, cfg, tx, batch=P())


# ----------------------------------------------------------------------------- 8 devices


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    out = tmp_path_factory.mktemp("shard") / "result.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               LORA_JAX_TEST_SEED=str(SEED), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests._shard_worker", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.fail(f"8-device worker failed (seed {SEED}):\n{proc.stderr[-6000:]}")
    with open(out) as f:
        return json.load(f)


# Reduction order: sharding changes the order of f32 sums (the batch mean,
# the contractions split over devices). The worker measures the same effect
# on one device, by permuting the batch: ~0.6-1.0e-6 relative on the
# gradients, 0-5e-7 on the loss. The sharded runs sit at the same level
# (0.6-1.5e-6 on the worst gradient leaf, measured as max|diff| / max|ref|;
# 2.1-3.2e-6 for the reference decoder in benchmarks/bench_shard.py), so
# 1e-6 is below f32's own noise here; the bounds are a few times it.
LOSS_RTOL, GRAD_RTOL = 2e-6, 5e-6


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("layout", ["fsdp", "tp", "mix"])
def test_eight_devices_match_one(eight, layout):
    r = eight["layouts"][layout]
    noise = eight["single"]["reduction_order_noise"]
    msg = f"{layout}: {r} (one-device reduction-order noise {noise}, seed {eight['seed']})"
    assert r["loss_rel"] <= LOSS_RTOL, msg
    assert r["grad_rel"] <= GRAD_RTOL, msg
    assert r["loss_rel_max_over_20"] <= 1e-5, msg    # 20 Adam steps later
    assert r["adapters_rel_after_20"] <= 1e-3, msg


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("layout", ["fsdp", "tp", "mix"])
def test_eight_devices_compile_once_and_stay_put(eight, layout):
    r = eight["layouts"][layout]
    assert r["compiles_with_20_steps"] == 1     # one program: compiled, then reused 20 times
    assert r["compiles_during_20_steps"] == 0
    assert r["shardings_kept"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_eight_devices_flops_and_specs(eight):
    single = eight["single"]["flops"]
    lay = eight["layouts"]
    assert eight["devices"] == 8 and eight["single"]["collectives"]["all-reduce"] == 0
    # FSDP splits every matmul 8 ways; TP leaves the embeddings, the head
    # (vocab 97 is prime) and the attention core (4 heads on 8 devices)
    # replicated. The figures go to benchmarks/RESULTS.md.
    assert lay["fsdp"]["flops_per_device"] < single / 6
    assert lay["mix"]["flops_per_device"] < single / 4
    assert lay["tp"]["flops_per_device"] < single / 2.5
    for name in lay:
        assert sum(lay[name]["collectives"].values()) > 0
    assert lay["tp"]["specs"] == {"q/a": "P(None, None)", "q/b": "P(None, 'model')",
                                  "o/a": "P('model', None)", "o/b": "P(None, None)"}
    assert lay["mix"]["specs"] == {"q/a": "P('data', None)", "q/b": "P(None, 'model')",
                                   "o/a": "P('model', None)", "o/b": "P(None, 'data')"}


@pytest.mark.slow
@pytest.mark.subprocess
def test_checkpoints_across_topologies(eight):
    hops = eight["checkpoint"]
    for hop in ("2x4->8x1", "8x1->1dev", "1dev->2x4"):
        assert hops[hop]["bit_exact"] and hops[hop]["placed"] and hops[hop]["opt_placed"], hop
    assert hops["8x1->1dev"]["specs"] == ["single device"]
    assert "P(None, 'model')" in hops["1dev->2x4"]["specs"]
    assert hops["resume_compiles"] == 0


@pytest.mark.slow
@pytest.mark.subprocess
def test_step_rejects_state_committed_elsewhere(eight):
    # jit refuses an adapter committed to another sharding rather than
    # resharding (and recompiling) behind the user's back
    assert "does not match the sharding" in eight["layouts"]["mix"]["moved_adapter_error"]


# ----------------------------------------------------------------------------- Explicit axes

_EXPLICIT = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import lora_jax as lj
seed = int(sys.argv[1])
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
g = np.random.default_rng(seed)
params = {"l1": {"w": jnp.asarray(g.standard_normal((64, 128)) / 8, jnp.float32)},
          "l2": {"w": jnp.asarray(g.standard_normal((128, 32)) / 8, jnp.float32)}}
x = jnp.asarray(g.standard_normal((16, 64)), jnp.float32)
cfg = lj.LoraConfig(rank=4, targets=r".*/w")
ad = lj.init(params, cfg, key=jax.random.key(seed))
ad = jax.tree.map(lambda n: n._replace(b=jnp.asarray(g.standard_normal(n.b.shape), jnp.float32)),
                  ad, is_leaf=lj.is_lora)

def mlp(p, x):
    return jnp.tanh(x @ p["l1"]["w"]) @ p["l2"]["w"]

def loss(a, p, x):
    return jnp.sum(jnp.sin(lj.apply(mlp, cfg)(p, a, x)))

want = mlp(lj.merge(params, ad, cfg), x)
g_want = jax.grad(lambda a: jnp.sum(jnp.sin(mlp(lj.merge(params, a, cfg), x))))(ad)
out = {}
with jax.set_mesh(mesh):
    for name, spec in (("replicated", P()), ("fsdp", P("data", None))):
        p = jax.device_put(params, NamedSharding(mesh, spec))
        a = jax.device_put(ad, lj.adapter_shardings(p, cfg))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        y = jax.jit(lj.apply(mlp, cfg))(p, a, xs)
        grads = jax.jit(jax.grad(loss))(a, p, xs)
        out[name] = {
            "y": float(jnp.max(jnp.abs(y - want)) / jnp.max(jnp.abs(want))),
            "grad": max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v)))
                        for u, v in zip(jax.tree.leaves(grads), jax.tree.leaves(g_want))),
            "same_shardings": all(u.sharding.spec == v.sharding.spec for u, v in
                                  zip(jax.tree.leaves(grads), jax.tree.leaves(a)))}
print(json.dumps(out))
'''


@pytest.mark.slow
@pytest.mark.subprocess
def test_explicit_axes_data_parallel_and_fsdp():
    """On a mesh with Explicit axes (jax.make_mesh's default), `lj.apply`'s
    forward and its matmul kernel's backward run with the batch and the
    weights' input axis sharded: outputs and adapter gradients equal the
    merged model's, and each gradient has its adapter's sharding."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _EXPLICIT, str(SEED)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode:
        pytest.fail(f"Explicit-axes worker failed (seed {SEED}):\n{proc.stderr[-6000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in res.items():
        assert r["y"] < 1e-5 and r["grad"] < 1e-4 and r["same_shardings"], (name, r)


# A transformer block written for explicit sharding (Megatron-style tensor
# parallelism on the "model" axis, data parallelism on "data"): q, k, v and up
# column-parallel, o and down row-parallel, the model naming the row-parallel
# products' output shardings as an Explicit mesh requires.
_EXPLICIT_TP = r'''
import json, sys, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import lora_jax as lj
seed, custom_grad = int(sys.argv[1]), sys.argv[2] == "1"
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
g = np.random.default_rng(seed)
D, H, F, B, T = 32, 4, 64, 4, 8
def w(*shape):
    return jnp.asarray(g.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)
params = {n: {"w": w(D, D)} for n in ("q", "k", "v", "o")} | {"up": {"w": w(D, F)}, "down": {"w": w(F, D)}}
x = jnp.asarray(g.standard_normal((B, T, D)), jnp.float32)
cfg = lj.LoraConfig(rank=4, targets=r".*/w")
ad = lj.init(params, cfg, key=jax.random.key(seed))
ad = jax.tree.map(lambda n: n._replace(b=jnp.asarray(g.standard_normal(n.b.shape) / 4, jnp.float32)),
                  ad, is_leaf=lj.is_lora)
ROW = P("data", None, None)

def block(p, x):
    b, t, d = x.shape
    q, k, v = (jnp.reshape(x @ p[n]["w"], (b, t, H, d // H)) for n in ("q", "k", "v"))
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d // H)
    a = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v).reshape(b, t, d)
    x = x + jnp.matmul(a, p["o"]["w"], out_sharding=ROW)
    h = jax.nn.gelu(x @ p["up"]["w"])
    return x + jnp.matmul(h, p["down"]["w"], out_sharding=ROW)

def loss_lora(a, p, x):
    return jnp.sum(jnp.sin(lj.apply(block, cfg, custom_grad=custom_grad)(p, a, x)))
def loss_merged(a, p, x):
    return jnp.sum(jnp.sin(block(lj.merge(p, a, cfg), x)))
def loss_full(p, x):
    return jnp.sum(jnp.sin(block(p, x)))

COLL = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
def collectives(f, *args):
    txt = jax.jit(f).lower(*args).compile().as_text()
    out = {}
    for c in COLL:
        ops = re.findall(rf"= ([^=]*?) \b{c}(?:-start)?\(", txt)
        n = sum(int(np.prod([int(d) for d in dims.split(",") if d])) for o in ops
                for dims in re.findall(r"\[([0-9,]*)\]", o))
        if ops:
            out[c] = [len(ops), n]
    return out

rules = {"(q|k|v|up)/w": P(None, "model"), "(o|down)/w": P("model", None)}
with jax.set_mesh(mesh):
    p = jax.device_put(params, lj.param_shardings(params, mesh, rules=rules))
    a = jax.device_put(ad, lj.adapter_shardings(p, cfg))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    want = jax.jit(lambda p, a, x: block(lj.merge(p, a, cfg), x))(p, a, xs)
    y = jax.jit(lj.apply(block, cfg, custom_grad=custom_grad))(p, a, xs)
    grads = jax.jit(jax.grad(loss_lora))(a, p, xs)
    g_want = jax.jit(jax.grad(loss_merged))(a, p, xs)
    out = {"y": float(jnp.max(jnp.abs(y - want)) / jnp.max(jnp.abs(want))),
           "grad": max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v))) for u, v in zip(jax.tree.leaves(grads), jax.tree.leaves(g_want))),
           "same_shardings": all(u.sharding.spec == v.sharding.spec for u, v in zip(jax.tree.leaves(grads), jax.tree.leaves(a))),
           "fwd_lora": collectives(lj.apply(block, cfg, custom_grad=custom_grad), p, a, xs),
           "fwd_base": collectives(block, p, xs),
           "step_lora": collectives(jax.grad(loss_lora), a, p, xs),
           "step_full": collectives(jax.grad(loss_full), p, xs),
           "step_merged": collectives(jax.grad(loss_merged), a, p, xs)}
print(json.dumps(out))
'''


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("custom_grad", [True, False], ids=["kernel", "autodiff"])
def test_explicit_axes_tensor_parallel(custom_grad):
    """Tensor-parallel weights on a mesh with Explicit axes: `lj.apply` (the
    kernel, with q, k, v sharing their product, and the autodiff form) gives the
    merged model's outputs and adapter gradients, each gradient on its adapter's
    sharding, and the compiled programs move no weight: no all-gather,
    all-to-all or collective-permute, and as many all-reduces in the forward as
    the base model's (the row-parallel products' partial ``x @ a``, ``M x r``
    numbers each, join the same all-reduces)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _EXPLICIT_TP, str(SEED), str(int(custom_grad))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        pytest.fail(f"tensor-parallel worker failed (seed {SEED}):\n{proc.stderr[-6000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["y"] < 1e-5 and r["grad"] < 1e-4 and r["same_shardings"], r
    for name in ("fwd_lora", "step_lora"):
        assert set(r[name]) <= {"all-reduce"}, (name, r[name])   # nothing resharded
    assert r["fwd_lora"]["all-reduce"][0] == r["fwd_base"]["all-reduce"][0], r
    # the adapter's extra all-reduced numbers: its rank-r partials, not weights
    extra = r["fwd_lora"]["all-reduce"][1] - r["fwd_base"]["all-reduce"][1]
    assert 0 <= extra <= 2 * 4 * 8 * 4, r      # 2 row-parallel products, (B/2 * T) x r
