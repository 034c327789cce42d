"""Keras 3 models (JAX backend) as a params tree and a function of it.

A Keras model keeps its weights in ``keras.Variable`` objects and runs
functionally through ``model.stateless_call(trainable, non_trainable, *args)``,
which takes *lists* of arrays. lora_jax needs a params tree addressed by
paths, so `params` reads the variables into a flat dict keyed by each
variable's ``path`` (``"sequential/dense/kernel"``) and `apply_fn` turns that
dict back into the lists, in the model's order, inside the traced function::

    import os; os.environ["KERAS_BACKEND"] = "jax"
    params = lj.interop.keras.params(model)
    fn = lj.interop.keras.apply_fn(model)        # fn(params, x) == model(x)
    config = lj.configure(lj.LoraConfig(targets=r".*/kernel"), fn, params, x)
    adapters = lj.init(params, config, key=key)
    y = lj.apply(fn, config)(params, adapters, x)

Keras is imported only when these functions are called (``pip install keras``;
the JAX backend is selected with ``KERAS_BACKEND=jax`` before importing it).
"""

from __future__ import annotations

from collections.abc import Callable

from lora_jax._core.errors import error

__all__ = ["params", "apply_fn"]


def _check(model, where: str):
    try:
        import keras
    except ImportError:
        raise error(where, "Keras is not installed", "pip install keras (3.x), and set "
                    "KERAS_BACKEND=jax before importing it", kind=ImportError) from None
    if keras.backend.backend() != "jax":
        raise error(where, f"Keras runs on the {keras.backend.backend()!r} backend; lora_jax "
                    f"needs its JAX backend", "set the environment variable KERAS_BACKEND=jax "
                    "before the first import of keras")
    if not hasattr(model, "stateless_call"):
        raise error(where, f"expected a Keras 3 model or layer, got {type(model).__name__}",
                    "pass the keras.Model (built: call it once or give keras.Input shapes)",
                    kind=TypeError)
    if not model.built:
        raise error(where, "the Keras model is not built, so its weights do not exist yet",
                    "build it first: model(example_input), or declare keras.Input shapes")
    paths = [v.path for v in model.variables]
    dup = sorted({p for p in paths if paths.count(p) > 1})
    if dup:
        raise error(where, f"several Keras variables share the path {dup[0]!r}, so they "
                    f"can't be told apart as params", "give the layers unique names")


def params(model) -> dict:
    """The model's weights as ``{"trainable": {path: array}, "non_trainable": {...}}``.

    Args:
      model: a built Keras 3 model on the JAX backend.

    Returns:
      A dict of two flat dicts keyed by each variable's ``path``; paths
      seen by lora_jax read ``trainable/sequential/dense/kernel``.
    """
    _check(model, "lj.interop.keras.params")
    return {"trainable": {v.path: v.value for v in model.trainable_variables},
            "non_trainable": {v.path: v.value for v in model.non_trainable_variables}}


def apply_fn(model, *, training: bool = False, return_state: bool = False) -> Callable:
    """``fn(params, *args, **kwargs)`` running ``model`` on a `params` dict.

    Args:
      model: the built Keras 3 model the params were read from.
      training: passed to the model (dropout, batch-norm statistics).
      return_state: return ``(outputs, non_trainable)`` with the updated
        non-trainable variables (batch-norm statistics), as a dict like
        ``params(model)["non_trainable"]``; by default only the outputs.

    Returns:
      The function, for `lj.apply` / `lj.configure` / ``jax.jit``.
    """
    _check(model, "lj.interop.keras.apply_fn")
    t_paths = [v.path for v in model.trainable_variables]
    n_paths = [v.path for v in model.non_trainable_variables]

    def fn(p, *args, **kwargs):
        missing = [q for q in t_paths if q not in p.get("trainable", {})] + \
            [q for q in n_paths if q not in p.get("non_trainable", {})]
        if missing:
            raise error("lj.interop.keras.apply_fn", f"params lack the model's variables "
                        f"{missing[:4]}", "pass the dict lj.interop.keras.params(model) made "
                        "for this model")
        trainable = [p["trainable"][q] for q in t_paths]
        non_trainable = [p["non_trainable"][q] for q in n_paths]
        out, state = model.stateless_call(trainable, non_trainable, *args, training=training,
                                          **kwargs)
        if return_state:
            return out, dict(zip(n_paths, state, strict=True))
        return out

    return fn
