"""Creating adapters: `init`.

Each leaf's PRNG key is derived from the root key and the leaf's path, so
adding or removing a target never changes the initial values of the others.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp

from lora_jax._config import LoraConfig
from lora_jax._paths import LeafSpec, path_str, resolve
from lora_jax._weights import LoraWeights, scale_array

__all__ = ["init", "leaf_key"]


def leaf_key(key, path: str):
    """The PRNG key of the leaf at ``path``: ``fold_in(key, crc32(path))``.

    Example:
      >>> import jax
      >>> k = jax.random.key(0)
      >>> bool((jax.random.key_data(leaf_key(k, "a/kernel"))
      ...       == jax.random.key_data(leaf_key(k, "a/kernel"))).all())
      True
    """
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _init_a(key, spec: LeafSpec, config: LoraConfig):
    if config.init == "kaiming":
        # PEFT: kaiming_uniform_(a=sqrt(5)) on the (rank, in) weight, i.e.
        # U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(spec.in_size)
        return jax.random.uniform(key, spec.a_shape, jnp.float32, -bound, bound
                                  ).astype(config.dtype)
    if config.init == "gaussian":
        init_std = 1.0 / spec.rank  # PEFT's "gaussian": std 1/r
        return (init_std * jax.random.normal(key, spec.a_shape, jnp.float32)
                ).astype(config.dtype)
    raise ValueError(f"LoraConfig.init={config.init!r} is not handled by lj.init.")


def init(params, config: LoraConfig, *, key):
    """Creates the adapter tree for ``params``.

    The result mirrors ``params``: ``LoraWeights(a, b, scale)`` at each
    targeted leaf (``a: (*stacked, in, rank)`` from ``config.init``,
    ``b: (*stacked, rank, out)`` zeros, so the model starts unchanged), a
    copy of the leaf at each ``config.train`` leaf, and ``None`` elsewhere.

    Args:
      params: the model's parameters (any pytree of arrays; only shapes and
        dtypes are read, except that ``train`` leaves are copied).
      config: the `LoraConfig`.
      key: a PRNG key (``jax.random.key(0)``); keyword-only.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
      >>> cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*/kernel")
      >>> adapters = lj.init(params, cfg, key=jax.random.key(0))
      >>> adapters["dense"]["kernel"].a.shape, adapters["dense"]["kernel"].b.shape
      ((16, 4), (4, 32))
      >>> adapters["dense"]["bias"] is None
      True
    """
    resolved = resolve(params, config)
    train = set(resolved.train)

    def make(keypath, leaf):
        path = path_str(keypath)
        spec = resolved.targets.get(path)
        if spec is not None:
            a = _init_a(leaf_key(key, path), spec, config)
            b = jnp.zeros(spec.b_shape, config.dtype)
            return LoraWeights(a, b, scale_array(spec))
        if path in train:
            # A copy: the adapter tree's buffers may be donated to a train step,
            # which must never invalidate the frozen params.
            return jnp.array(leaf, copy=True)
        return None

    return jax.tree_util.tree_map_with_path(make, params)
