"""Params files for the command line: one array per '/'-path.

``.safetensors`` and ``.npz`` files hold a flat ``{path: array}`` mapping
keyed by the paths `lj.path_str` prints (``params/block_0/attn/q/kernel``).
A flat dict keyed by those paths has exactly the paths of the nested tree,
so it works as ``params`` everywhere (`lj.restore`, `lj.merge`,
`lj.import_peft`). A directory is read as an Orbax ``StandardCheckpointer``
checkpoint of the params tree.
"""

from __future__ import annotations

import os

import numpy as np

from lora_jax._checkpoint.manager import orbax_checkpoint
from lora_jax._core.errors import error
from lora_jax._core.leaf import is_container
from lora_jax._core.paths import leaves_with_paths

__all__ = ["save_params", "load_params", "safetensors_modules"]


def safetensors_modules(where: str):
    """``(safetensors.numpy, safetensors.safe_open)``, imported on first use: safetensors
    is an optional dependency (the ``interop`` extra), so ``import lora_jax`` works
    without it and only reading or writing such a file needs it."""
    try:
        import safetensors.numpy
        from safetensors import safe_open
    except ImportError:
        raise error(where, "PEFT-format and .safetensors files need the safetensors package",
                    "pip install 'lora-jax[interop]' (or pip install safetensors)",
                    kind=ImportError) from None
    return safetensors.numpy, safe_open


def _host(x) -> np.ndarray:
    return np.asarray(x)


def save_params(path, params) -> None:
    """Writes ``params`` as a flat ``{path: array}`` file (``.safetensors`` or ``.npz``).

    Example:
      >>> import os, tempfile, numpy as np, lora_jax as lj
      >>> params = {"params": {"dense": {"kernel": np.ones((2, 3), np.float32)}}}
      >>> with tempfile.TemporaryDirectory() as d:
      ...     lj.interop.save_params(os.path.join(d, "base.npz"), params)
      ...     flat = lj.interop.load_params(os.path.join(d, "base.npz"))
      >>> list(flat), flat["params/dense/kernel"].shape
      (['params/dense/kernel'], (2, 3))
    """
    path = os.fspath(path)
    quantized = [p for p, x in leaves_with_paths(params) if is_container(x)]
    if quantized:
        raise error(path, f"{quantized[0]} is a quantized weight ({len(quantized)} in all); a "
                          f"params file holds plain arrays",
                    "save the float base you quantized from, or lj.dequantize(params) first "
                    "(the file then holds the dequantized values)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise error(path, f"the folder {folder} does not exist",
                    f"create it first (mkdir -p {folder}), or write somewhere else",
                    kind=FileNotFoundError)
    flat = {p: _host(x) for p, x in leaves_with_paths(params)}
    if path.endswith(".safetensors"):
        st_numpy, _ = safetensors_modules("lj.interop.save_params")
        st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, path,
                           metadata={"format": "lora_jax.params"})
    elif path.endswith(".npz"):
        odd = sorted(k for k, v in flat.items() if v.dtype.kind == "V" or
                     v.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"))
        if odd:
            # npz stores ml_dtypes arrays as raw bytes ('|V2') and reads them back so.
            raise error(path, f".npz can't hold {flat[odd[0]].dtype.name} arrays "
                              f"(e.g. {odd[0]})",
                        "write a .safetensors file instead")
        taken = sorted({"file", "allow_pickle"} & set(flat))
        if taken:
            # np.savez's own parameter names: such a key would be taken for the argument
            raise error(path, f".npz can't hold a leaf at path {taken[0]!r} (np.savez takes it "
                              f"for its own argument)",
                        "write a .safetensors file instead")
        np.savez(path, allow_pickle=True, **flat)
    else:
        raise error(path, "params files end in .safetensors or .npz",
                    "rename the output to end in one of those")


def load_params(path):
    """Reads params written by `save_params` (flat dict) or an Orbax directory (tree).

    See `save_params` for an example.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            return orbax_checkpoint().StandardCheckpointer().restore(os.path.abspath(path))
        except Exception as e:
            raise error(path, f"not an Orbax checkpoint of a params tree "
                              f"({type(e).__name__}: {e})",
                        "pass the directory given to StandardCheckpointer.save, or a "
                        ".safetensors/.npz file") from e
    if not os.path.isfile(path):
        raise error(path, "no such params file", "check the path")
    if path.endswith(".safetensors"):
        st_numpy, _ = safetensors_modules("lj.interop.load_params")
        try:
            return dict(st_numpy.load_file(path))
        except Exception as e:
            raise error(path, f"can't read the safetensors file ({e})",
                        "re-create it with lj.interop.save_params") from e
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    raise error(path, "params files are .safetensors, .npz or an Orbax directory",
                "write the params with lj.interop.save_params")
