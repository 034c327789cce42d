"""Shared fixtures. The repository root goes on sys.path so tests can import
the reference models from ``examples/``.

The whole session runs with JAX's strictest numerics checks, as equinox's
tests do: no implicit dtype promotion (mixing float32 and bfloat16 must be
written out) and no implicit rank promotion (broadcasting must be explicit).
Warnings are errors (pyproject.toml lists the third-party ones allowed).
A test that runs third-party code relying on implicit promotion (optax's adam,
Flax's bfloat16 normalization layers, Keras' layers) says so with
``@pytest.mark.standard_promotion`` (JAX's standard dtype and rank
promotion); lora_jax itself must pass strict."""

import gc
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KERAS_BACKEND", "jax")   # Keras 3 models run on JAX in the tests
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402

from examples import gpt  # noqa: E402

# Small enough for 2 CPU cores, shaped like the reference (all six targets).
SMALL = gpt.GPTConfig(vocab=97, d_model=64, n_heads=4, n_layers=2, d_mlp=128, max_len=16)


@pytest.fixture(autouse=True)
def _standard_promotion_where_marked(request):
    """JAX's standard dtype and rank promotion for tests marked ``standard_promotion``."""
    if request.node.get_closest_marker("standard_promotion") is None:
        yield
        return
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


@pytest.fixture(params=[False, True], ids=["nojit", "jit"])
def maybe_jit(request):
    """Runs a test body with and without jax.jit."""
    return jax.jit if request.param else (lambda f, **kw: f)


@pytest.fixture(scope="session")
def small_gpt():
    """(model, variables) of a small Linen decoder."""
    return gpt.init_linen(SMALL, seed=0)


# Fresh random inputs on every run; set LORA_JAX_TEST_SEED to replay one.
SEED = int(os.environ.get("LORA_JAX_TEST_SEED", int.from_bytes(os.urandom(3), "little")))


def pytest_configure(config):
    # The pytest session only: subprocess workers that import this module for
    # its constants keep JAX's defaults.
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_report_header(config):
    return f"lora_jax test seed: LORA_JAX_TEST_SEED={SEED}"


@pytest.fixture
def rng(request):
    """A PRNG key that differs per test and per run (replay with the seed)."""
    import zlib
    return jax.random.fold_in(jax.random.key(SEED), zlib.crc32(request.node.nodeid.encode()))


_GC_EACH_TEST = os.environ.get("LORA_JAX_TEST_GC") == "1"


@pytest.fixture(autouse=True)
def _collect_garbage_where_unraisables_are_ignored(request):
    """A test that ignores unraisable exceptions (the checkpoint tests: Orbax leaves
    a coroutine behind after a failed read) collects its cyclic garbage before it
    ends. Otherwise that garbage is collected whenever the collector next runs, in
    another test, whose finalizer errors then fail it (as
    ``ExceptionGroup: multiple unraisable exception warnings``) although it did
    nothing wrong. A full collection costs ~0.25 s with torch and jax loaded, so
    other tests skip it; ``LORA_JAX_TEST_GC=1`` collects after every test, which
    pins any finalizer error on the test that made the garbage."""
    yield
    if _GC_EACH_TEST or any("Unraisable" in str(arg)
                            for mark in request.node.iter_markers("filterwarnings")
                            for arg in mark.args):
        gc.collect()
