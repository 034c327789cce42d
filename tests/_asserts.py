"""Tree comparisons that name the failing leaf, with per-dtype tolerances."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._core.paths import path_str

# Relative tolerances used across the suite, by the dtype being compared.
RTOL = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}


def rel_err(actual, expected) -> float:
    """max|a - e| / max|e| in float64 (0 for two all-zero arrays)."""
    a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    denom = np.max(np.abs(e)) if e.size else 0.0
    err = np.max(np.abs(a - e)) if e.size else 0.0
    return float(err / denom) if denom > 0 else float(err)


def rel_err64(actual, expected) -> float:
    """max|a - e| / max|e| in float64 throughout (``rel_err`` rounds both to float32);
    max|a| where ``expected`` is all zero."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if not e.size:
        return 0.0
    denom, err = np.max(np.abs(e)), np.max(np.abs(a - e))
    return float(err / denom) if denom > 0 else float(err)


def assert_close(actual, expected, *, rtol=None, what="value"):
    """Asserts ``rel_err(actual, expected) <= rtol`` (default: by dtype)."""
    actual, expected = jnp.asarray(actual), jnp.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    tol = RTOL[jnp.dtype(expected.dtype).name] if rtol is None else rtol
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def assert_trees_close(actual, expected, *, rtol=None, exact=False):
    """Compares two pytrees leaf by leaf; the failure names the path.

    ``exact=True`` demands bit-identical leaves (same dtype, same bytes).
    """
    fa, ta = jax.tree_util.tree_flatten_with_path(actual)
    fe, te = jax.tree_util.tree_flatten_with_path(expected)
    assert ta == te, f"tree structures differ:\n{ta}\n{te}"
    for (p, a), (_, e) in zip(fa, fe):
        path = path_str(p)
        if exact:
            a, e = np.asarray(a), np.asarray(e)
            assert a.dtype == e.dtype, f"{path}: dtype {a.dtype} != {e.dtype}"
            assert a.shape == e.shape, f"{path}: shape {a.shape} != {e.shape}"
            assert np.array_equal(a.reshape(-1).view(np.uint8), e.reshape(-1).view(np.uint8)), \
                f"{path}: not bit-identical (max diff {np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)))})"
        else:
            assert_close(a, e, rtol=rtol, what=path)


def perturb_b(adapters, *, key, std=0.1):
    """Gives every LoraWeights a non-zero random B, so the adapter has an effect."""
    from lora_jax import is_lora

    leaves, treedef = jax.tree.flatten(adapters, is_leaf=is_lora)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for k, node in zip(keys, leaves):
        if is_lora(node):
            b = std * jax.random.normal(k, node.b.shape, jnp.float32)
            node = node._replace(b=b.astype(node.b.dtype))
        out.append(node)
    return jax.tree.unflatten(treedef, out)


class CompileCounter:
    """Counts XLA backend compilations while active (public jax.monitoring).

    Example::

        with CompileCounter() as cc:
            f(x); f(x)
        assert cc.count == 1
    """

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0

    def _listener(self, name, duration, **kwargs):
        if name == self.EVENT:
            self.count += 1

    def __enter__(self):
        import jax.monitoring
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        import jax.monitoring
        jax.monitoring.unregister_event_duration_listener(self._listener)
        return False


def random_adapters(params, config, *, seed, b_std=0.05):
    """Adapters for ``params`` with random A and non-zero random B, from numpy.

    The structure and shapes come from ``jax.eval_shape`` of ``lj.init`` (no
    compilation), so building them is cheap; trained (``config.train``)
    leaves get the base value plus noise.
    """
    import lora_jax as lj

    gen = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda p: lj.init(p, config, key=jax.random.key(0)), params)
    base = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def fill(keypath, node):
        path = path_str(keypath)
        if node is None:
            return None
        if lj.is_lora(node):
            bound = 1.0 / np.sqrt(node.a.shape[-2])
            a = gen.uniform(-bound, bound, node.a.shape).astype(np.float32)
            b = (b_std * gen.standard_normal(node.b.shape)).astype(np.float32)
            return lj.LoraWeights(jnp.asarray(a, node.a.dtype), jnp.asarray(b, node.b.dtype),
                                  jnp.asarray(config.scale_for(path), jnp.float32))
        noise = 0.1 * gen.standard_normal(node.shape).astype(np.float32)
        return jnp.asarray(np.asarray(base[path], np.float32) + noise, node.dtype)

    return jax.tree_util.tree_map_with_path(
        fill, shapes, is_leaf=lambda x: x is None or lj.is_lora(x))
