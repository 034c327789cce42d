"""PEFT-format adapters: `export_peft` and `import_peft` (safetensors, never pickle).

The files are what ``peft.PeftModel.save_pretrained`` writes and
``PeftModel.from_pretrained`` loads::

    <directory>/adapter_config.json          LoraConfig fields (r, lora_alpha, target_modules, ...)
    <directory>/adapter_model.safetensors    base_model.model.<module>.lora_A.weight  (r, in)
                                             base_model.model.<module>.lora_B.weight  (out, r)
    <directory>/<name>/...                   adapters other than "default"

``lora_A.weight`` is ``a.T`` and ``lora_B.weight`` is ``b.T`` for every
layer kind (PEFT uses the ``nn.Linear`` orientation even for GPT-2's
``Conv1D``); embeddings use ``lora_embedding_A`` / ``lora_embedding_B``
with the same transposes. DoRA's magnitude ``m`` is
``<module>.lora_magnitude_vector`` (shape ``(out,)``, PEFT's per output
unit norm, the same orientation for every kind; ``use_dora`` in the
config). Scaling is not stored: PEFT recomputes it from
``lora_alpha`` / ``r`` (``/ sqrt(r)`` with ``use_rslora``), per module via
``rank_pattern`` / ``alpha_pattern``, which the export fills for every
module whose rank or alpha differs from the defaults. Fully-trained leaves
(``LoraConfig.train``) become ``modules_to_save``: PEFT stores the whole
module, so the export needs ``params`` for the module's untrained
parameters. The mapping between our paths and torch module names is a
`lora_jax.interop.KeyMap` (presets ``"llama"``, ``"gpt2"``, ``"bert"``).

Tied embeddings. A model may use its input embedding also as the output
head (``logits = h @ E.T``; ``tie_word_embeddings`` in transformers). An
adapter on such an embedding changes both uses; PEFT does the same only
with ``ensure_weight_tying=true``, and then stores the head's entries as
copies of the embedding's (``lm_head.lora_A.weight`` is
``lora_embedding_B.T``, ``lm_head.lora_B.weight`` is
``lora_embedding_A.T``; a fully-trained embedding's head copy is
``lm_head.weight``). `export_peft` writes that for every exported
embedding that is tied -- listed in ``LoraConfig.tied`` (`lj.configure`
fills it), passed as ``tied=``, or found from ``params`` (they hold the
embedding but no leaf for the head the key map's ``ties`` name).
`import_peft` reads such files exactly, and refuses an adapter trained with
the tie broken (``ensure_weight_tying=false`` and only the embedding, or
only the head, changed), which one tied embedding can't express.

Stacked layers. A key map template with ``{i}`` maps a stacked (``nn.scan``)
leaf to one module per layer. A PEFT file that adapts only some layers
(``layers_to_transform``) imports with zero adapters (no change) in the
others.

lora_jax adds, in the safetensors metadata (PEFT ignores it), a sha256 of
every tensor and the base fingerprint; `import_peft` verifies both when
present.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from lora_jax._checkpoint.fingerprint import BaseMismatchError, base_fingerprint, check_base
from lora_jax._core.config import Layout, LoraConfig, LoraWarning
from lora_jax._core.errors import error, message
from lora_jax._core.leaf import dense_float32, is_container
from lora_jax._core.paths import leaves_with_paths, resolve, unflatten_params
from lora_jax._core.weights import LoraWeights, check_adapters, flatten_adapters, is_lora
from lora_jax._variants.dora import magnitude_init
from lora_jax.interop._files import safetensors_modules
from lora_jax.interop._keymap import (
    HFName,
    layer_names,
    lookup,
    resolve_key_map,
    tied_head,
    to_torch_layout,
)

__all__ = ["export_peft", "import_peft", "UnsupportedPeftFeature", "CONFIG_NAME",
           "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PEFT_VERSION = "0.21.2"  # the PEFT release this format was verified against
_META_SHA = "lora_jax.sha256"
_META_FP = "lora_jax.base_fingerprint"
_META_CFG = "lora_jax.config"

# How each layer kind names its factors (PEFT's LoraLayer subclasses).
_FACTOR_KEYS = {"linear": ("lora_A.weight", "lora_B.weight"),
                "conv1d": ("lora_A.weight", "lora_B.weight"),
                "embedding": ("lora_embedding_A", "lora_embedding_B")}

# init_lora_weights values that only change how training starts; the others
# (pissa, olora, corda, loftq, lora_ga, mica) change the base weights or the
# forward pass, so the factors alone would mean something else here.
_SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal")

# adapter_config.json fields lora_jax does not implement; a non-default value
# is refused by name.
_UNSUPPORTED = {
    "lora_bias": "lora_bias (a trainable bias on lora_B)",
    "layer_replication": "layer_replication (repeated layers sharing base weights)",
    "target_parameters": "target_parameters (LoRA on bare nn.Parameters)",
    "trainable_token_indices": "trainable_token_indices (TrainableTokens)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "megatron_config": "Megatron tensor-parallel LoRA (megatron_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
}
# Fields that only steer training or module selection (the file's keys say
# which modules have adapters): accepted and ignored.
_IGNORED = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "peft_version", "r", "lora_alpha", "target_modules", "exclude_modules",
    "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "megatron_core", "qalora_group_size", "ensure_weight_tying", "runtime_config", "use_dora",
    *_UNSUPPORTED,
}


class UnsupportedPeftFeature(ValueError):
    """A PEFT adapter uses a feature lora_jax does not implement."""


def _folder(directory, adapter_name: str, where: str) -> str:
    if not isinstance(adapter_name, str) or not adapter_name or "/" in adapter_name \
            or adapter_name in (".", ".."):
        raise error(where, f"adapter_name={adapter_name!r} is not a plain folder name",
                    "use a plain name like 'default'")
    directory = os.fspath(directory)
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


def _sha(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
    """Writes via a fsync'd temporary file renamed into place (never half a file)."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _stack_names(hf: HFName, path: str, n_stacked: int, shape) -> list[str]:
    """The modules' parameter names of a LoRA leaf with ``n_stacked`` stacked axes."""
    if n_stacked == 0:
        if "{i}" in hf.name:
            raise error(path, f"the key map gives {hf.name!r} with '{{i}}' but the leaf has no "
                              f"stacked axis",
                        "drop '{i}' from that rule")
        return [hf.name]
    if n_stacked > 1 or "{i}" not in hf.name:
        raise error(path, f"a leaf with {n_stacked} stacked axes (shape {tuple(shape)}) needs a "
                          f"key map template with '{{i}}' for the layer index (one stacked axis "
                          f"at most), got {hf.name!r}",
                    "e.g. (r'params/layers/(.*)/kernel', r'model.layers.{i}.\\1.weight', "
                    "'linear')")
    return layer_names(hf, path, shape)


# ----------------------------------------------------------------------------- export


def _alpha_for_export(path, config: LoraConfig, r: int, scale: float) -> float:
    """The lora_alpha giving this module's scale (the config's, unless the scale was changed)."""
    alpha = config.alpha_for(path)
    if math.isclose(scale, config.scale_for(path), rel_tol=1e-6):
        return alpha
    return scale * (math.sqrt(r) if config.use_rslora else r)


def _pattern_key(module: str) -> str:
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", module name).
    return re.escape(module)


def _peft_config(config: LoraConfig, out: _Exported, base_model_name_or_path,
                 task_type) -> dict:
    modules, saved = out.modules, out.saved_modules
    ranks = [r for r, _ in modules.values()]
    r0 = config.rank if config.rank in ranks else max(set(ranks), key=ranks.count)
    alphas = [a for r, a in modules.values() if r == r0] or [a for _, a in modules.values()]
    a0 = config.alpha if config.alpha in alphas else max(set(alphas), key=alphas.count)
    # A tied head is no target (PEFT ties it to the embedding), but PEFT gives
    # it its own scaling from the patterns: they must name it when needed.
    every = {**modules, **out.heads}
    rank_pattern = {_pattern_key(m): r for m, (r, _) in sorted(every.items()) if r != r0}
    alpha_pattern = {_pattern_key(m): a for m, (_, a) in sorted(every.items()) if a != a0}
    return {
        "peft_type": "LORA", "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "inference_mode": True, "auto_mapping": None, "peft_version": _PEFT_VERSION,
        "r": r0, "lora_alpha": _json_number(a0),
        "target_modules": sorted(modules), "exclude_modules": None,
        "lora_dropout": config.dropout, "fan_in_fan_out": out.fan_in_fan_out, "bias": "none",
        "use_rslora": config.use_rslora, "modules_to_save": sorted(set(saved)) or None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {k: _json_number(v) for k, v in alpha_pattern.items()},
        "use_dora": config.use_dora, "lora_bias": False, "layer_replication": None,
        "target_parameters": None, "trainable_token_indices": None,
        "loftq_config": {}, "eva_config": None, "corda_config": None,
        "megatron_config": None, "megatron_core": "megatron.core",
        "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
        "ensure_weight_tying": out.tied,
    }


def _json_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def export_peft(directory, adapters, config: LoraConfig, *, key_map, params=None,
                adapter_name: str = "default", base_model_name_or_path: str | None = None,
                task_type: str | None = None, tied=(), overwrite: bool = False) -> str:
    """Writes adapters in PEFT's format (``PeftModel.from_pretrained`` loads them).

    Args:
      directory: the output folder (created).
      adapters: the adapter tree (or a flat ``{path: node}`` dict).
      config: its `LoraConfig`.
      key_map: our paths -> torch names: a preset (``"llama"``, ``"gpt2"``,
        ``"bert"``), a `lora_jax.interop.KeyMap`, ``{regex: template}`` or a
        callable. Every adapted (and fully-trained) path must be mapped.
      params: the base params. Checks the adapters against them, records
        the base fingerprint, and supplies the untrained parameters of
        ``modules_to_save`` modules (required when ``config.train`` is set).
      adapter_name: ``"default"`` writes into ``directory``; another name
        into ``directory/<name>`` (PEFT's layout for extra adapters).
      base_model_name_or_path: recorded in ``adapter_config.json``.
      task_type: PEFT's ``task_type`` (e.g. ``"CAUSAL_LM"``), or None.
      tied: paths of embeddings the model also uses as its output head, in
        addition to ``config.tied`` (which `lj.configure` fills for the
        targets it reads; name a fully-trained embedding here, or let
        ``params`` show it: the embedding with no leaf for the head the key
        map's ``ties`` name). A tied embedding that is exported makes the
        file set ``ensure_weight_tying`` and hold the head's copies, so
        PEFT's forward adapts the lookup and the head alike, as `lj.apply`
        does.
      overwrite: replace existing adapter files.

    Returns:
      The folder written.

    Example:
      >>> import json, os, tempfile, jax, lora_jax as lj
      >>> w = jax.random.normal(jax.random.key(0), (8, 16))
      >>> params = {"params": {"lm_head": {"kernel": w}}}
      >>> cfg = lj.LoraConfig(rank=2, alpha=4, targets=r".*/lm_head/kernel")
      >>> ad = lj.init(params, cfg, key=jax.random.key(1))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = lj.export_peft(d, ad, cfg, key_map="llama")
      ...     with open(os.path.join(d, "adapter_config.json")) as fh:
      ...         c = json.load(fh)
      >>> c["r"], c["lora_alpha"], c["target_modules"]
      (2, 4, ['lm_head'])
    """
    st_numpy, _ = safetensors_modules("lj.export_peft")
    km = resolve_key_map(key_map, "lj.export_peft")
    if not isinstance(config, LoraConfig):
        raise error("lj.export_peft", f"config must be a lj.LoraConfig, got "
                                      f"{type(config).__name__}",
                    "pass the LoraConfig the adapters were created with", kind=TypeError)
    if params is not None:
        check_adapters(params, adapters, config)
    nodes = _export_nodes(adapters, km)
    ties = _export_ties(adapters, nodes, config, tied, params, km)
    out = _export_tensors(nodes, config, ties)
    if out.saved_modules:
        _complete_saved_modules(out.tensors, out.saved_modules, params, km, nodes)
    if not out.modules:
        raise error("lj.export_peft", "the adapters hold no LoraWeights (only fully-trained "
                                      "leaves); PEFT needs at least one LoRA module",
                    "check the config: its targets must adapt at least one weight")
    peft_cfg = _peft_config(config, out, base_model_name_or_path, task_type)
    meta = _export_metadata(out.tensors, config, params)
    folder = _folder(directory, adapter_name, "lj.export_peft")
    _write_adapter(folder, st_numpy, out.tensors, meta, peft_cfg, overwrite)
    return folder


class _Exported(NamedTuple):
    """What `export_peft` writes, gathered from the adapter tree."""

    tensors: dict          # safetensors key -> array (torch layout)
    modules: dict          # LoRA module -> (r, alpha)
    saved_modules: list    # modules_to_save modules, one entry per trained leaf
    fan_in_fan_out: bool   # some module is a GPT-2 style Conv1D
    heads: dict            # output head tied to an adapted embedding -> (r, alpha)
    tied: bool             # some exported embedding is tied to the output head


def _export_nodes(adapters, km) -> list[tuple[str, Any, HFName]]:
    """The adapter tree's ``[(path, node, HFName)]`` to export, every path mapped by ``km``."""
    nodes = [(p, n) for p, n in flatten_adapters(adapters)[0] if n is not None]
    if not nodes:
        raise error("lj.export_peft", "adapters hold no LoraWeights and no trained arrays; "
                                      "nothing to export",
                    "pass the tree from lj.init / lj.restore")
    mapped = [(p, n, lookup(km, p)) for p, n in nodes]
    unmapped = [p for p, _, hf in mapped if hf is None]
    if unmapped:
        raise error("lj.export_peft", f"the key map leaves {len(unmapped)} adapted/trained "
                                      f"paths unmapped, e.g. {unmapped[:6]}",
                    "add rules for them (lj.interop.KeyMap), or use the preset matching your "
                    "model (presets: llama, gpt2, bert)")
    return [(p, n, hf) for p, n, hf in mapped if hf is not None]


def _export_tensors(nodes, config: LoraConfig, ties: dict) -> _Exported:
    """PEFT's tensors for every node: LoRA factors, and the weights of modules_to_save
    (with the copies a tied head needs)."""
    out = _Exported({}, {}, [], False, {}, bool(ties))
    fan_in_fan_out = False
    for path, node, hf in nodes:
        if is_lora(node):
            _add_lora_tensors(out, path, node, hf, config)
            fan_in_fan_out |= hf.kind == "conv1d"
        else:
            if "{i}" in hf.name:
                raise error(path, "stacked fully-trained leaves can't be exported as "
                                  "modules_to_save",
                            "unstack them first")
            out.tensors[f"{_PREFIX}{hf.name}"] = to_torch_layout(np.asarray(node), hf.kind, path)
            out.saved_modules.append(hf.module)
        if path in ties:
            _add_head_copies(out, hf, ties[path])
    return out._replace(fan_in_fan_out=fan_in_fan_out)


def _add_head_copies(out: _Exported, hf: HFName, head: str) -> None:
    """The tied head's entries, copies of the embedding's, as PEFT writes them with
    ``ensure_weight_tying`` (its head shares the embedding's tensors, transposed)."""
    emb, head_module = f"{_PREFIX}{hf.module}", head.rsplit(".", 1)[0]
    if f"{_PREFIX}{hf.name}" in out.tensors:     # fully trained: the head is the same matrix
        out.tensors[f"{_PREFIX}{head}"] = out.tensors[f"{_PREFIX}{hf.name}"]
        return
    out.tensors[f"{_PREFIX}{head_module}.lora_A.weight"] = \
        np.ascontiguousarray(out.tensors[f"{emb}.lora_embedding_B"].T)
    out.tensors[f"{_PREFIX}{head_module}.lora_B.weight"] = \
        np.ascontiguousarray(out.tensors[f"{emb}.lora_embedding_A"].T)
    out.heads[head_module] = out.modules[hf.module]


def _export_ties(adapters, nodes, config: LoraConfig, tied, params, km) -> dict[str, str]:
    """``{our path: head parameter}`` of every exported embedding tied to the output head."""
    declared = _tied_paths(tied, "lj.export_peft")
    known = {p for p, _ in flatten_adapters(adapters)[0]}
    unknown = [p for p in declared if p not in known]
    if unknown:
        raise error("lj.export_peft", f"tied={unknown[:3]}: no such path in the adapters",
                    "name the embedding's '/'-path, e.g. tied=('params/model/embed_tokens/"
                    "embedding',)")
    names = None if params is None else {
        hf.name: p for p, _ in leaves_with_paths(params) if (hf := lookup(km, p)) is not None}
    wanted = set(config.tied) | set(declared)
    ties = {}
    for path, node, hf in nodes:
        head = tied_head(km, hf.name)
        found = head is not None and names is not None and head not in names
        if path not in wanted and not found:
            continue
        _check_export_tie(path, node, hf, head, names, km)
        ties[path] = head
    return ties


def _check_export_tie(path, node, hf: HFName, head, names, km) -> None:
    """A tied embedding PEFT can tie: an unstacked embedding, no DoRA, a known head."""
    if hf.kind != "embedding" or "{i}" in hf.name:
        raise error(path, f"this weight is tied to the output head (LoraConfig.tied / tied=), "
                          f"but the key map gives it as {hf.name!r} of kind {hf.kind!r}; PEFT "
                          f"ties one (unstacked) embedding to its head",
                    "map it as an 'embedding', or drop it from LoraConfig.tied")
    if head is None:
        raise error(path, f"this embedding is tied to the output head (LoraConfig.tied / "
                          f"tied=), but key map {getattr(km, 'name', 'custom')!r} doesn't say "
                          f"which torch parameter that head is, so its copies can't be written",
                    f"declare it: lj.interop.KeyMap(rules, ties={{'lm_head.weight': "
                    f"'{hf.name}'}}) (names without the prefix)")
    if names is not None and head in names:
        raise error(path, f"LoraConfig.tied (or tied=) says this embedding is also the output "
                          f"head, but params hold a separate head for {head!r} "
                          f"({names[head]})",
                    "drop the path from tied if the model has its own head, or remove the "
                    "head's leaf if it uses the embedding")
    if is_lora(node) and node.m is not None:
        raise error(path, "DoRA on an embedding tied to the output head: PEFT gives the tied "
                          "head its own magnitude vector, so the two uses can't stay tied",
                    "use plain LoRA (use_dora=False) for the embedding, or untie the head",
                    kind=UnsupportedPeftFeature)


def _tied_paths(tied, where: str) -> tuple:
    if isinstance(tied, str):
        tied = (tied,)
    if not isinstance(tied, (tuple, list)) or not all(isinstance(p, str) for p in tied):
        raise error(where, f"tied={tied!r} is not a tuple of '/'-joined paths",
                    "pass e.g. tied=('params/model/embed_tokens/embedding',)", kind=TypeError)
    return tuple(tied)


def _add_lora_tensors(out: _Exported, path, node, hf: HFName, config: LoraConfig) -> None:
    """One LoRA leaf's ``lora_A`` / ``lora_B`` (and DoRA magnitude) per module it maps to."""
    a, b = np.asarray(node.a), np.asarray(node.b)
    scale = np.asarray(node.scale, np.float32)
    if scale.ndim:
        raise error(path, f"scale has shape {scale.shape}: this is an adapter set (a leading "
                          f"adapter axis)",
                    "export each adapter separately (adapter_name=...)")
    if hf.kind not in _FACTOR_KEYS:
        raise error(path, f"the key map says {hf.name!r} is a {hf.kind!r} parameter; LoRA in "
                          f"PEFT applies to linear, conv1d and embedding layers",
                    "narrow LoraConfig.targets or correct the key map's kind")
    n_stacked = a.ndim - 2
    names = _stack_names(hf, path, n_stacked, a.shape)
    key_a, key_b = _FACTOR_KEYS[hf.kind]
    r = a.shape[-1]
    alpha = _alpha_for_export(path, config, r, float(scale))
    m = None if node.m is None else np.asarray(node.m)
    for i, name in enumerate(names):
        module = name.rsplit(".", 1)[0]
        ai, bi = (a[i], b[i]) if n_stacked else (a, b)
        out.tensors[f"{_PREFIX}{module}.{key_a}"] = np.ascontiguousarray(ai.T)
        out.tensors[f"{_PREFIX}{module}.{key_b}"] = np.ascontiguousarray(bi.T)
        if m is not None:   # DoRA: one magnitude per output unit, (out,)
            out.tensors[f"{_PREFIX}{module}.lora_magnitude_vector"] = \
                np.ascontiguousarray(m[i] if n_stacked else m)
        out.modules[module] = (r, alpha)


def _export_metadata(tensors: dict, config: LoraConfig, params) -> dict:
    """The safetensors metadata: lora_jax's sha256 sums, config and base fingerprint."""
    meta = {"format": "pt",
            _META_SHA: json.dumps({k: _sha(v) for k, v in sorted(tensors.items())}),
            _META_CFG: json.dumps(_config_dict(config))}
    if params is not None:
        meta[_META_FP] = json.dumps(base_fingerprint(params, config))
    return meta


def _write_adapter(folder: str, st_numpy, tensors: dict, meta: dict, peft_cfg: dict,
                   overwrite: bool) -> None:
    """Writes both files into ``folder`` (created); existing ones only with ``overwrite``."""
    os.makedirs(folder, exist_ok=True)
    targets = [os.path.join(folder, n) for n in (WEIGHTS_NAME, CONFIG_NAME)]
    if not overwrite and any(os.path.exists(t) for t in targets):
        raise error(folder, "already holds a PEFT adapter",
                    "pass overwrite=True, or another directory / adapter_name")
    _atomic_write(targets[0], st_numpy.save(tensors, metadata=meta))
    _atomic_write(targets[1], (json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n").encode())


def _config_dict(config: LoraConfig):
    try:
        return config.to_dict()
    except ValueError:
        return None  # a callable target: not recorded (PEFT's own config is complete)


def _complete_saved_modules(tensors, saved_modules, params, km, nodes):
    """PEFT loads a modules_to_save module whole: add its untrained parameters."""
    if params is None:
        raise error("lj.export_peft", f"LoraConfig.train makes {sorted(set(saved_modules))} "
                                      f"PEFT modules_to_save, which PEFT stores whole (weight "
                                      f"and bias)",
                    "pass params= so their untrained parameters can be written too")
    trained = {p for p, n, _ in nodes if not is_lora(n)}
    wanted = set(saved_modules)
    for path, leaf in leaves_with_paths(params):
        if path in trained:
            continue
        hf = lookup(km, path)
        if hf is not None and hf.module in wanted:
            tensors[f"{_PREFIX}{hf.name}"] = to_torch_layout(np.asarray(dense_float32(leaf)
                                                             if is_container(leaf) else leaf),
                                                             hf.kind, path)


# ----------------------------------------------------------------------------- import


def _check_peft_config(cfg, where: str) -> None:
    """``adapter_config.json`` (read from ``where``) must be a LoRA config lora_jax
    implements, with the fields the import reads well-formed."""
    if not isinstance(cfg, dict):
        raise error(where, f"holds a JSON {type(cfg).__name__}, not an object of LoraConfig "
                           f"fields",
                    "point at the adapter_config.json PEFT's save_pretrained (or "
                    "lj.export_peft) wrote: a JSON object with r, lora_alpha, target_modules")
    if cfg.get("peft_type") != "LORA":
        raise error(where, f"peft_type={cfg.get('peft_type')!r}; lora_jax imports LoRA adapters "
                           f"only",
                    "use a LoRA adapter (peft_type LORA)", kind=UnsupportedPeftFeature)
    _check_fields(cfg, where)
    for field, what in _UNSUPPORTED.items():
        value = cfg.get(field)
        if value not in (None, False, [], {}, ""):
            raise error(where, f"the adapter uses {what}: {field}={value!r}, which lora_jax does "
                               f"not implement; importing only the LoRA factors would give a "
                               f"different model",
                        "use an adapter without it (or merge it in PEFT with merge_and_unload "
                        "and extract a LoRA with lj.extract)", kind=UnsupportedPeftFeature)
    init = cfg.get("init_lora_weights", True)
    if init not in _SAFE_INITS:
        raise error(where, f"init_lora_weights={init!r}: that initialization changes the base "
                           f"weights (or the forward pass), so the factors don't apply to the "
                           f"original base",
                    "convert it to a plain LoRA in PEFT first (save_pretrained(..., "
                    "path_initial_model_for_weight_conversion=...))",
                    kind=UnsupportedPeftFeature)
    if cfg.get("bias", "none") != "none":
        raise error(where, f"bias={cfg.get('bias')!r} (trained base biases) is not supported",
                    "use an adapter trained with bias='none'", kind=UnsupportedPeftFeature)
    unknown = sorted(set(cfg) - _IGNORED)
    if unknown:
        warnings.warn(message(where, f"unknown adapter_config.json fields {unknown} ignored "
                                     f"(written by a newer PEFT?)",
                              "check they don't change the adapter's meaning"),
                      LoraWarning, stacklevel=4)   # import_peft's caller (via _read_adapter)


def _is_rank(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _is_alpha(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) \
        and x > 0


def _check_fields(cfg: dict, where: str) -> None:
    """``r`` and ``lora_alpha`` (and their patterns, the targets, the layer indices)
    must be there and of the types PEFT writes."""
    for field, ok, what in (("r", _is_rank, "a positive integer (the LoRA rank)"),
                            ("lora_alpha", _is_alpha, "a number > 0 (scale = lora_alpha / r)")):
        if field not in cfg:
            raise error(where, f"has no {field!r}, {what}; PEFT writes it in every adapter",
                        f"add it (e.g. \"{field}\": 8), or re-save the adapter with PEFT")
        if not ok(cfg[field]):
            raise error(where, f"{field}={cfg[field]!r} ({type(cfg[field]).__name__}) is not "
                               f"{what}",
                        f"write it as a JSON number, e.g. \"{field}\": 8")
    for field, ok, what in (("rank_pattern", _is_rank, "positive integers"),
                            ("alpha_pattern", _is_alpha, "numbers > 0")):
        value = cfg.get(field) or {}
        if not isinstance(value, dict) or not all(ok(v) for v in value.values()):
            raise error(where, f"{field}={value!r} is not an object mapping module names to "
                               f"{what}",
                        f"write it as e.g. \"{field}\": {{\"down_proj\": 4}}")
    targets = cfg.get("target_modules")
    if not (targets is None or isinstance(targets, str) or
            (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise error(where, f"target_modules={targets!r} is neither a list of module names nor "
                           f"a regex string",
                    "write it as PEFT does, e.g. \"target_modules\": [\"q_proj\", \"v_proj\"]")
    layers = cfg.get("layers_to_transform")
    if not (layers is None or _is_index(layers) or
            (isinstance(layers, list) and all(_is_index(i) for i in layers))):
        raise error(where, f"layers_to_transform={layers!r} is neither a layer index nor a list "
                           f"of them",
                    "write it as e.g. \"layers_to_transform\": [0, 2]")


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_saved_module(module: str, saved) -> bool:
    # PEFT (_set_trainable) matches modules_to_save entries as plain suffixes:
    # "norm" also selects "input_layernorm".
    return any(module.endswith(t) for t in saved)


def _pattern_value(patterns: Mapping | None, module: str, default):
    # PEFT 0.21: the first key k with re.match(rf"(.*\.)?({k})$", module) wins.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _peft_targets(cfg: Mapping, module: str) -> bool | None:
    """Whether PEFT 0.21 gives ``module`` a LoRA layer under this config
    (``check_target_module_exists``: exclude_modules, modules_to_save,
    target_modules, layers_to_transform / layers_pattern); None when the
    config doesn't say (no target_modules, or the unexpanded ``"all-linear"``)."""
    targets = cfg.get("target_modules")
    if targets is None or targets == "all-linear":
        return None
    excluded = cfg.get("exclude_modules")
    if isinstance(excluded, str) and re.fullmatch(excluded, module):
        return False
    if isinstance(excluded, list) and (module in excluded or
                                       any(module.endswith("." + e) for e in excluded)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in cfg.get("modules_to_save") or []):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith("." + t) for t in targets):
        return False
    return _in_transformed_layers(cfg, module)


def _in_transformed_layers(cfg: Mapping, module: str) -> bool:
    """PEFT's ``layers_to_transform`` filter: the module's layer index is listed."""
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = cfg.get("layers_pattern")
    if not pattern:
        # the first numbered segment is the layer index (not an expert index after it)
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        m = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if m is not None:
                break
    if m is None:
        return False
    index = int(m.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _read_safetensors(path: str):
    _, safe_open = safetensors_modules("lj.import_peft")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError and OSError: name the file either way
        raise error(path, f"can't read the safetensors file ({type(e).__name__}: {e}). It is "
                          f"truncated or corrupted",
                    "re-export or re-download it") from e
    return tensors, meta


def import_peft(directory, params, *, key_map, adapter_name: str = "default", dtype=None,
                on_base_mismatch: str = "error", check_finite: bool = True, tied=()):
    """Reads a PEFT LoRA adapter into ``(adapters, config)`` for ``params``.

    The adapter tree mirrors ``params``; the returned `LoraConfig` targets
    exactly the imported paths, with PEFT's per-module ranks and alphas
    (``rank_pattern`` / ``alpha_pattern``) and ``use_rslora``;
    ``modules_to_save`` become fully-trained leaves (``train``); an
    embedding the model ties to its head is in ``config.tied``. A stacked
    leaf (key map template with ``{i}``) whose file adapts only some layers
    (PEFT's ``layers_to_transform``) gets zero adapters in the others.
    Features lora_jax doesn't implement are refused by name
    (`UnsupportedPeftFeature`).

    Args:
      directory: the folder ``save_pretrained`` wrote.
      params: the base params the adapter is for (the skeleton).
      key_map: our paths -> torch names (as in `export_peft`).
      adapter_name: ``"default"`` reads ``directory``; another name
        ``directory/<name>``.
      dtype: convert A and B to this dtype (default: as stored; a file whose
        factors mix dtypes needs it).
      on_base_mismatch: ``"error"``, ``"warn"`` or ``"ignore"`` when the file
        carries a lora_jax base fingerprint that ``params`` don't match.
      check_finite: raise on NaN/Inf factors.
      tied: paths of embeddings the model also uses as its output head. Found
        without it when ``params`` hold the embedding and no leaf for the head
        the key map's ``ties`` name (the ``"llama"`` and ``"gpt2"`` presets
        declare theirs). A file that keeps them tied (PEFT's
        ``ensure_weight_tying``) imports exactly; one that adapted only the
        lookup or only the head is refused.

    Raises:
      UnsupportedPeftFeature: lora_bias, trained biases, base-modifying
        inits (PiSSA, OLoRA, LoftQ...), layer replication, an adapter that
        broke a tie the model has, and others.
      ValueError: missing files (and ``.bin`` pickles, never loaded),
        corrupted files, a malformed adapter_config.json, keys the key map
        can't place, targeted modules without factors, factor shapes that
        don't fit the base, NaN/Inf values.

    Example:
      >>> import tempfile, jax, lora_jax as lj
      >>> w = jax.random.normal(jax.random.key(0), (8, 16))
      >>> params = {"params": {"lm_head": {"kernel": w}}}
      >>> cfg = lj.LoraConfig(rank=2, alpha=4, targets=r".*/lm_head/kernel")
      >>> ad = lj.init(params, cfg, key=jax.random.key(1))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = lj.export_peft(d, ad, cfg, key_map="llama")
      ...     back, cfg2 = lj.import_peft(d, params, key_map="llama")
      >>> bool((back["params"]["lm_head"]["kernel"].a == ad["params"]["lm_head"]["kernel"].a).all())
      True
      >>> cfg2.targets, cfg2.rank, cfg2.alpha
      (('params/lm_head/kernel',), 2, 4.0)
    """
    km = resolve_key_map(key_map, "lj.import_peft")
    src = _read_adapter(_folder(directory, adapter_name, "lj.import_peft"))
    tables = _skeleton_tables(params, km)
    ties = _import_ties(tables, km, _tied_paths(tied, "lj.import_peft"))
    pieces = _classify_tensors(src, tables, ties)
    _resolve_ties(pieces, ties, src)
    _check_untied_heads(pieces, tables, km, src)
    _check_all_placed(pieces, tables, km, src.st_path)
    _check_targeted(pieces.factors, tables, src)
    per_path = _gather_per_path(pieces.factors, tables.by_module, src)
    config = _build_config(src.pcfg, per_path, pieces.trained, src.tensors, dtype, src.st_path,
                           params).replace(tied=tuple(ties))
    adapters = _assemble_adapters(params, tables, per_path, pieces.trained, config)
    _check_imported(params, adapters, config, src.st_path, check_finite)
    # Both base checks warn at stacklevel=3, i.e. at import_peft's caller: call them here.
    if _META_FP in src.meta:
        check_base(params, json.loads(src.meta[_META_FP]), on_mismatch=on_base_mismatch,
                   what=src.folder)
    _check_base_copies(pieces.base_copies, tables, on_base_mismatch, src.folder)
    return adapters, config


class _Source(NamedTuple):
    """An adapter folder's two files, read and validated."""

    folder: str
    st_path: str       # the safetensors file, named in errors
    pcfg: dict         # adapter_config.json
    tensors: dict      # safetensors key -> array
    meta: dict         # safetensors metadata


class _Tables(NamedTuple):
    """The params skeleton mapped forward through the key map (names are never parsed)."""

    flat: list         # [(path, leaf)] of params
    by_module: dict    # torch module -> (our path, HFName, stacked layer index or None)
    by_param: dict     # torch parameter name -> (our path, HFName), unstacked leaves only
    by_path: dict      # our path -> HFName, every leaf the key map maps


class _Pieces(NamedTuple):
    """The file's tensors sorted by what they are."""

    factors: dict      # torch module -> {"A": lora_A, "B": lora_B, "M": DoRA magnitude}
    trained: dict      # our path -> modules_to_save weight (torch layout)
    base_copies: list  # [(our path, base weight PEFT stored in the file)]
    unplaced: list     # keys the key map can't place
    heads: dict        # tied head module -> {suffix: tensor} (copies of the embedding's)


class _PathFactors(NamedTuple):
    """One adapted path's rank, alpha and factors (per stacked layer, or ``None``)."""

    r: int
    alpha: float
    layers: dict       # layer index or None -> (a, b, m or None), our orientation


class _Tie(NamedTuple):
    """An embedding the model also uses as its output head."""

    path: str          # our path of the embedding
    embed: HFName      # its torch parameter
    head: str | None   # the torch parameter of the head (None: the key map doesn't say)

    @property
    def head_module(self) -> str | None:
        return None if self.head is None else self.head.rsplit(".", 1)[0]


def _read_adapter(folder: str) -> _Source:
    """Reads ``adapter_config.json`` and the safetensors file, checking both."""
    cfg_path, st_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
        raise error(folder, f"no {CONFIG_NAME}",
                    "point at the folder save_pretrained / lj.export_peft wrote (extra "
                    "adapters are in sub-folders: pass adapter_name=)")
    if not os.path.isfile(st_path):
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt")
                   if os.path.exists(os.path.join(folder, n))]
        why = (f" ({pickled[0]} is a pickle, which lora_jax never loads: unpickling runs "
               f"code)") if pickled else ""
        raise error(folder, f"no {WEIGHTS_NAME}{why}",
                    "save the adapter with safetensors (save_pretrained(..., "
                    "safe_serialization=True))")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            pcfg = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(cfg_path, f"not valid JSON ({e})",
                    "re-export the adapter (or re-save it with PEFT's save_pretrained)") from e
    _check_peft_config(pcfg, cfg_path)
    tensors, meta = _read_safetensors(st_path)
    _check_sums(st_path, tensors, meta)
    return _Source(folder, st_path, pcfg, tensors, meta)


def _check_sums(st_path: str, tensors: dict, meta: dict) -> None:
    """Every tensor must match the sha256 lora_jax recorded at export (when it did)."""
    if _META_SHA not in meta:
        return
    sums = json.loads(meta[_META_SHA])
    for k, v in tensors.items():
        if sums.get(k) != _sha(v):
            raise error(st_path, f"tensor {k} does not match the sha256 recorded when it was "
                                 f"exported: the file is corrupted",
                        "re-export it")


def _skeleton_tables(params, km) -> _Tables:
    """Forward-maps every path of ``params`` to its torch module and parameter names."""
    flat = leaves_with_paths(params)
    by_module: dict[str, tuple[str, HFName, int | None]] = {}
    by_param: dict[str, tuple[str, HFName]] = {}
    by_path: dict[str, HFName] = {}
    for path, leaf in flat:
        hf = lookup(km, path)
        if hf is None:
            continue
        by_path[path] = hf
        stacked = "{i}" in hf.name
        for i, name in enumerate(layer_names(hf, path, leaf.shape)):
            module = name.rsplit(".", 1)[0]
            # a module is its weight's (kernel, embedding), not its bias's or norm's
            if module not in by_module or by_module[module][1].kind == "vector":
                by_module[module] = (path, hf, i if stacked else None)
        if not stacked:
            by_param[hf.name] = (path, hf)
    return _Tables(flat, by_module, by_param, by_path)


def _import_ties(tables: _Tables, km, declared: tuple) -> dict[str, _Tie]:
    """``{our path: _Tie}``: embeddings params use as the head too -- the key map's
    ``ties`` with no leaf for the head, and the ``tied=`` paths."""
    ties = {}
    for path, hf in tables.by_path.items():
        head = tied_head(km, hf.name)
        if head is not None and "{i}" not in hf.name and head not in tables.by_param:
            ties[path] = _Tie(path, hf, head)
    for path in declared:
        if path not in tables.by_path:
            raise error("lj.import_peft", f"tied={path!r} is not a path of params the key map "
                                          f"maps",
                        "name the embedding's '/'-path (lj.describe lists them)")
        hf = tables.by_path[path]
        head = tied_head(km, hf.name)
        if head is not None and head in tables.by_param:
            raise error(path, f"tied= says this embedding is also the output head, but params "
                              f"hold a separate head for {head!r} ({tables.by_param[head][0]})",
                        "drop the path from tied if the model has its own head")
        ties.setdefault(path, _Tie(path, hf, head))
    return ties


_MAGNITUDE = ".lora_magnitude_vector"   # DoRA
_FACTOR = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                     r"lora_embedding_B|lora_B\.bias)")


def _classify_tensors(src: _Source, tables: _Tables, ties: dict) -> _Pieces:
    """Sorts every key of the file into factors, trained weights, base copies, a tied
    head's copies or unplaced."""
    pieces = _Pieces({}, {}, [], [], {})
    saved = set(src.pcfg.get("modules_to_save") or [])
    heads = {t.head_module for t in ties.values() if t.head is not None}
    for key, value in src.tensors.items():
        rest = key[len(_PREFIX):]
        head = next((h for h in heads if rest.startswith(h + ".")), None)
        if not key.startswith(_PREFIX):
            pieces.unplaced.append(key)
        elif head is not None:
            pieces.heads.setdefault(head, {})[rest[len(head) + 1:]] = value
        elif rest.endswith(_MAGNITUDE):
            module = rest[: -len(_MAGNITUDE)]
            if module not in tables.by_module:
                pieces.unplaced.append(key)
            else:
                pieces.factors.setdefault(module, {})["M"] = np.reshape(value, -1)
        elif m := _FACTOR.fullmatch(rest):
            _add_factor(pieces, src, tables, key, m.group(1), m.group(2), value)
        else:
            _add_whole_weight(pieces, tables, saved, key, rest, value)
    return pieces


def _add_factor(pieces: _Pieces, src: _Source, tables: _Tables, key: str, module: str,
                which: str, value) -> None:
    """Files a ``lora_A`` / ``lora_B`` (or embedding) factor under its module."""
    if which == "lora_B.bias":
        raise error(src.st_path, f"{key}: lora_bias (a trainable bias on lora_B) is not "
                                 f"supported",
                    "use an adapter trained with lora_bias=False", kind=UnsupportedPeftFeature)
    if module not in tables.by_module:
        pieces.unplaced.append(key)
        return
    kind = tables.by_module[module][1].kind
    if (which.startswith("lora_embedding")) != (kind == "embedding"):
        raise error(src.st_path, f"{key} is a {which} factor but the key map says {module} is "
                                 f"a {kind} layer",
                    "correct the key map's kind")
    if kind == "linear" and src.pcfg.get("fan_in_fan_out"):
        raise error(src.folder, f"fan_in_fan_out=true, but {module} maps to a Linear-layout "
                                f"kernel (only GPT-2 style Conv1D layers store (in, out))",
                    "check the key map (gpt2 for GPT-2), or re-save the adapter with "
                    "fan_in_fan_out=false", kind=UnsupportedPeftFeature)
    pieces.factors.setdefault(module, {})["A" if which.endswith(("A.weight", "_A")) else "B"] \
        = value


def _add_whole_weight(pieces: _Pieces, tables: _Tables, saved: set, key: str, rest: str,
                      value) -> None:
    """Files a whole weight: a modules_to_save one, or PEFT's copy of a base weight."""
    by_param = tables.by_param
    base_name = rest.replace(".base_layer.", ".")
    if rest in by_param and _is_saved_module(by_param[rest][1].module, saved):
        pieces.trained[by_param[rest][0]] = value
    elif ".base_layer." in rest and base_name in by_param:
        # PEFT also stores a targeted embedding's base weight (save_embedding_layers).
        pieces.base_copies.append((by_param[base_name][0], value))
    else:
        pieces.unplaced.append(key)


# ---------------------------------------------------------------- import: tied embeddings

_UNTIE_FIX = ("train the adapter with peft.LoraConfig(..., ensure_weight_tying=True), which keeps "
              "the lookup and the head tied; or give the JAX model its own output head (a leaf "
              "holding the embedding's transpose) mapped to {head} by the key map, so the two "
              "uses can differ")


def _resolve_ties(pieces: _Pieces, ties: dict, src: _Source) -> None:
    """Checks the file against each tied embedding: the adapter must keep the lookup and
    the head tied (PEFT's ``ensure_weight_tying``), the head's entries being copies."""
    ewt = src.pcfg.get("ensure_weight_tying") is True
    for tie in ties.values():
        module = tie.embed.module
        lora, trained = pieces.factors.get(module), pieces.trained.get(tie.path)
        head = pieces.heads.pop(tie.head_module, {}) if tie.head is not None else {}
        if "base_layer.weight" in head:   # PEFT's copy of the (tied) base weight
            pieces.base_copies.append((tie.path, head.pop("base_layer.weight")))
        if lora is None and trained is None and not head:
            continue   # the adapter leaves the embedding alone
        head_name = tie.head_module or "tied to it"
        how = "LoRA" if lora is not None else "fully trained, modules_to_save"
        fix = _UNTIE_FIX.format(head=tie.head or "the head's torch name")
        if lora is None and trained is None:
            raise error(src.st_path, f"the adapter changes the output head {head_name} "
                                     f"({', '.join(sorted(head))}) but not the input embedding "
                                     f"{module}: "
                                     f"PEFT's model computes the head with a changed weight and "
                                     f"the lookup with the base one, while params hold one "
                                     f"embedding ({tie.path}) for both uses",
                        fix, kind=UnsupportedPeftFeature)
        if not ewt:
            what = (f"the output head ({head_name}) got an adapter of its own" if head else
                    f"PEFT changed the lookup only: the output head ({head_name}) kept the base "
                    f"embedding")
            raise error(src.st_path, f"the adapter changes the input embedding {module} ({how}) "
                                     f"with ensure_weight_tying=false, so {what}. params hold "
                                     f"one embedding ({tie.path}) for both uses, so importing "
                                     f"it would give another model",
                        fix, kind=UnsupportedPeftFeature)
        if lora is not None:
            _check_tied_lora(tie, lora, head, src, pieces)
        else:
            _check_tied_trained(tie, trained, head, src, pieces)


def _check_tied_lora(tie: _Tie, lora: dict, head: dict, src: _Source, pieces: _Pieces) -> None:
    """A tied LoRA embedding: the head's factors are the embedding's, transposed and
    swapped, and PEFT scales the head as it scales the embedding."""
    module = tie.embed.module
    if "M" in lora or "lora_magnitude_vector" in head:
        raise error(src.st_path, f"DoRA on {module}, which the model ties to its output head: "
                                 f"PEFT gives the head its own magnitude vector, which one tied "
                                 f"embedding can't have",
                    "use an adapter trained without DoRA on the embedding",
                    kind=UnsupportedPeftFeature)
    # PEFT's head: lora_A = lora_embedding_B.T, lora_B = lora_embedding_A.T
    copies = {"lora_A.weight": "B", "lora_B.weight": "A"}
    for suffix, value in head.items():
        key = f"{_PREFIX}{tie.head_module}.{suffix}"
        factor = lora.get(copies.get(suffix, ""))
        if factor is not None:
            _check_copy(key, value, np.asarray(factor).T,
                        f"{module}'s lora_embedding_{copies[suffix]} transposed", src.st_path)
        else:
            pieces.unplaced.append(key)
    if tie.head_module is not None:
        _check_head_scale(tie.embed.module, tie.head_module, src)


def _check_tied_trained(tie: _Tie, trained, head: dict, src: _Source, pieces: _Pieces) -> None:
    """A tied fully-trained embedding: the head's weight is the same matrix."""
    for suffix, value in head.items():
        key = f"{_PREFIX}{tie.head_module}.{suffix}"
        if suffix == "weight":
            _check_copy(key, value, trained, f"the trained {tie.embed.name}", src.st_path)
        else:
            pieces.unplaced.append(key)


def _check_copy(key: str, value, want, what: str, st_path: str) -> None:
    value, want = np.asarray(value), np.asarray(want)
    if value.shape != want.shape or not np.array_equal(value, want.astype(value.dtype)):
        same = value.shape == want.shape
        diff = (f"max |difference| {float(np.max(np.abs(value.astype(np.float64) - want))):.3g}"
                if same else f"shape {value.shape} vs {want.shape}")
        raise error(st_path, f"{key} is not a copy of {what} ({diff}): the head and the "
                             f"embedding it is tied to hold different adapters, which one tied "
                             f"embedding can't express",
                    "re-save the adapter from a PEFT model with ensure_weight_tying=True (it "
                    "writes exact copies), or untie the JAX model's head",
                    kind=UnsupportedPeftFeature)


def _check_head_scale(module: str, head_module: str, src: _Source) -> None:
    """PEFT scales the tied head by its own rank_pattern / alpha_pattern entries."""
    scales = []
    for name in (module, head_module):
        r = _pattern_value(src.pcfg.get("rank_pattern"), name, src.pcfg["r"])
        alpha = _pattern_value(src.pcfg.get("alpha_pattern"), name, src.pcfg["lora_alpha"])
        scales.append(alpha / (math.sqrt(r) if src.pcfg.get("use_rslora") else r))
    s_emb, s_head = scales
    if not math.isclose(s_emb, s_head, rel_tol=1e-6):
        raise error(src.st_path, f"PEFT scales the tied head {head_module} by {s_head:g} and "
                                 f"the embedding {module} by {s_emb:g} (rank_pattern / "
                                 f"alpha_pattern give them different r or lora_alpha); one tied "
                                 f"embedding has one scale",
                    f"train it with the same r and lora_alpha for {head_module} and {module}",
                    kind=UnsupportedPeftFeature)


def _check_untied_heads(pieces: _Pieces, tables: _Tables, km, src: _Source) -> None:
    """A file saved from a tied model (ensure_weight_tying, the head's entries copies of
    the embedding's) does not fit params whose head is a leaf of its own."""
    if src.pcfg.get("ensure_weight_tying") is not True:
        return
    for path, hf in tables.by_path.items():
        head = tied_head(km, hf.name)
        if head is None or head not in tables.by_param or not _head_copies(
                pieces, hf, tables.by_param[head], path):
            continue
        raise error(src.st_path, f"the adapter was saved from a model tying "
                                 f"{head.rsplit('.', 1)[0]} to {hf.module} "
                                 f"(ensure_weight_tying=true, the head's entries copies of the "
                                 f"embedding's), but params hold a separate head "
                                 f"({tables.by_param[head][0]}) besides {path}",
                    "import it into the tied model (no leaf for the head: it uses the "
                    "embedding), or, if this head equals the embedding, set "
                    "\"ensure_weight_tying\": false in adapter_config.json to import both as "
                    "separate adapters", kind=UnsupportedPeftFeature)


def _head_copies(pieces: _Pieces, embed: HFName, head: tuple, embed_path: str) -> bool:
    """Whether the file's entries for ``head`` (our path, HFName) copy the embedding's."""
    head_path, head_hf = head
    emb, lm = pieces.factors.get(embed.module), pieces.factors.get(head_hf.module)
    if emb is not None and lm is not None and {"A", "B"} <= set(emb) and {"A", "B"} <= set(lm):
        pairs = [(lm["A"], emb["B"].T), (lm["B"], emb["A"].T)]
    elif embed_path in pieces.trained and head_path in pieces.trained:
        pairs = [(pieces.trained[head_path], pieces.trained[embed_path])]
    else:
        return False
    return all(np.shape(x) == np.shape(y) and np.array_equal(x, y) for x, y in pairs)


# ---------------------------------------------------------------- import: factors


def _check_all_placed(pieces: _Pieces, tables: _Tables, km, st_path: str) -> None:
    """Every key must have found its leaf, and some must be LoRA factors."""
    if pieces.unplaced:
        raise error(st_path, f"{len(pieces.unplaced)} keys don't map to any leaf of params "
                             f"through key map {getattr(km, 'name', 'custom')!r}, e.g. "
                             f"{pieces.unplaced[:5]}. Keys must be "
                             f"'{_PREFIX}<module>.lora_A.weight' etc. for modules the key map "
                             f"produces from params' paths (e.g. {sorted(tables.by_module)[:3]})",
                    "pass the key map (and prefix, e.g. KEY_MAPS['bert'].with_prefix('bert.')) "
                    "of the model the adapter was trained on")
    if not pieces.factors:
        raise error(st_path, "no LoRA factors found (no lora_A / lora_B tensors)",
                    "check the file: it should be a PEFT LoRA adapter's "
                    "adapter_model.safetensors")


def _check_targeted(factors: dict, tables: _Tables, src: _Source) -> None:
    """Every module PEFT targets (target_modules, layers_to_transform, ...) must have its
    factors: one without both was lost, and skipping it would give another model."""
    for module, (_, hf, _) in sorted(tables.by_module.items()):
        if hf.kind == "vector" or module in factors or not _peft_targets(src.pcfg, module):
            continue
        raise error(src.st_path, f"{module}: adapter_config.json's target_modules select this "
                                 f"module, but the file has neither its lora_A nor its lora_B "
                                 f"(nor lora_embedding_A / _B); the file is incomplete",
                    "re-export the adapter (or re-save it with PEFT's save_pretrained); if the "
                    "module was meant to stay unadapted, list only the others in target_modules "
                    "(or use layers_to_transform)")


def _gather_per_path(factors: dict, by_module: dict, src: _Source) -> dict[str, _PathFactors]:
    """Groups the modules' factors by our path (a stacked leaf gathers its layers)."""
    per_path: dict[str, _PathFactors] = {}
    use_dora = bool(src.pcfg.get("use_dora", False))
    for module, ab in factors.items():
        _check_module_factors(module, ab, use_dora, src.st_path)
        path, _, layer = by_module[module]
        r, alpha = _module_rank_alpha(module, ab, src.pcfg, src.st_path)
        entry = per_path.setdefault(path, _PathFactors(r, alpha, {}))
        if (entry.r, entry.alpha) != (r, alpha):
            raise error(path, f"stacked layers have different ranks/alphas in the file "
                              f"({(entry.r, entry.alpha)} and {(r, alpha)} for {module}); a "
                              f"stacked leaf needs one",
                        "unstack the model")
        entry.layers[layer] = (ab["A"].T, ab["B"].T, ab.get("M"))
    return per_path


def _check_module_factors(module: str, ab: dict, use_dora: bool, st_path: str) -> None:
    """A module needs both factors, and a DoRA magnitude exactly when ``use_dora``."""
    if use_dora != ("M" in ab):
        raise error(st_path, f"{module}: adapter_config.json has use_dora={use_dora} but the "
                             f"module {'lacks' if use_dora else 'has'} a DoRA "
                             f"lora_magnitude_vector; the config and weights don't belong "
                             f"together",
                    "re-export the adapter")
    if not {"A", "B"} <= set(ab):
        missing = "lora_B" if "A" in ab else "lora_A"
        raise error(st_path, f"{module} has no {missing} tensor; the file is incomplete",
                    "re-export the adapter")


def _module_rank_alpha(module: str, ab: dict, pcfg: Mapping, st_path: str):
    """The module's ``(r, alpha)`` from the config, checked against its factors' shapes."""
    r = int(_pattern_value(pcfg.get("rank_pattern"), module, pcfg["r"]))
    alpha = float(_pattern_value(pcfg.get("alpha_pattern"), module, pcfg["lora_alpha"]))
    if ab["A"].shape[0] != r or ab["B"].shape[-1] != r:
        raise error(st_path, f"{module}: lora_A {tuple(ab['A'].shape)} / lora_B "
                             f"{tuple(ab['B'].shape)} don't have the rank {r} that "
                             f"adapter_config.json gives this module (r / rank_pattern); the "
                             f"config and weights don't belong together",
                    "re-export the adapter")
    return r, alpha


def _assemble_adapters(params, tables: _Tables, per_path: dict, trained: dict,
                       config: LoraConfig):
    """The adapter tree mirroring ``params``: LoraWeights, trained arrays, or None."""
    specs = resolve(params, config).targets
    leaves = []
    for path, leaf in tables.flat:
        if path in per_path:
            leaves.append(_lora_leaf(path, per_path[path].layers, specs[path], config, leaf))
        elif path in trained:   # trained paths come from by_param: mapped
            value = np.asarray(trained[path])
            linear = tables.by_path[path].kind == "linear"
            leaves.append(jnp.asarray(value.T if linear else value))
        else:
            leaves.append(None)
    return unflatten_params(params, leaves)


def _lora_leaf(path: str, layers: dict, spec, config: LoraConfig, leaf) -> LoraWeights:
    """One path's LoraWeights, its stacked layers stacked in order. A layer the file
    doesn't adapt (PEFT's layers_to_transform left it out) gets B = 0 -- no change --
    and, with DoRA, the base's own column norms as magnitude."""
    if None in layers:
        a, b, m = layers[None]
    else:
        a0, b0, _ = next(iter(layers.values()))
        zero = (np.zeros_like(a0), np.zeros_like(b0), None)
        n = spec.shape[0]
        stacked = [layers.get(i, zero) for i in range(n)]
        a = np.stack([x[0] for x in stacked])
        b = np.stack([x[1] for x in stacked])
        m = None
        if config.use_dora:
            base_m = (np.asarray(magnitude_init(leaf, spec, jnp.float32))
                      if len(layers) < n else None)
            m = np.stack([layers[i][2] if i in layers else
                          np.asarray(base_m)[i].astype(layers[next(iter(layers))][2].dtype)
                          for i in range(n)])
    a, b = jnp.asarray(a, config.dtype), jnp.asarray(b, config.dtype)
    m = None if m is None else jnp.asarray(m, config.dtype)
    return LoraWeights(a, b, jnp.asarray(spec.scale, jnp.float32), m)


def _check_imported(params, adapters, config: LoraConfig, st_path: str,
                    check_finite: bool) -> None:
    """The imported adapters must fit ``params`` and (unless told not to) be finite."""
    try:
        check_adapters(params, adapters, config)
    except ValueError as e:   # e says what and how to fix; name the file too
        raise error(st_path, str(e)) from None
    if not check_finite:
        return
    for path, node in flatten_adapters(adapters)[0]:
        arrays = ({"a": node.a, "b": node.b, "m": node.m} if is_lora(node) else
                  {"": node} if node is not None else {})
        for field, x in arrays.items():
            bad = 0 if x is None else int(np.sum(~np.isfinite(np.asarray(x, np.float32))))
            if bad:
                name = path + (f"/{field}" if field else "")
                raise error(st_path, f"{name} has {bad} NaN/Inf value(s): the adapter is "
                                     f"broken (training diverged?)",
                            "use another one, or pass check_finite=False to load it anyway")


def _infer_layout(path, shape, stacked: bool, in_size: int, out_size: int):
    """The Layout splitting ``shape`` into (stacked, in, out) axes of these sizes, or None."""
    s = 1 if stacked else 0
    rest = shape[s:]
    for k in range(1, len(rest)):
        if math.prod(rest[:k]) == in_size and math.prod(rest[k:]) == out_size:
            return Layout(s, k, len(rest) - k)
    return None  # nothing fits: check_adapters reports both shapes


def _check_base_copies(base_copies, tables: _Tables, on_mismatch, folder) -> None:
    """A base weight stored in the file must be the given one (else: resized
    vocabulary or another base), under the same policy as the fingerprint."""
    if not base_copies or on_mismatch == "ignore":
        return
    leaves = dict(tables.flat)
    differ = []
    for path, stored in base_copies:   # base copies come from by_param: mapped
        ours = to_torch_layout(np.asarray(dense_float32(leaves[path])),
                               tables.by_path[path].kind, path)
        if ours.shape != stored.shape or not np.array_equal(ours, np.asarray(stored, ours.dtype)):
            differ.append(f"{path}: file {tuple(stored.shape)}, params {tuple(ours.shape)}")
    if differ:
        why = (f"the adapter stores base weights that differ from the params given (a "
               f"resized vocabulary, or another base): {differ[:4]}")
        fix = ("pass the base the adapter was trained on; on_base_mismatch='warn' or 'ignore' "
               "to proceed anyway")
        if on_mismatch == "error":
            raise error(folder, why, fix, kind=BaseMismatchError)
        warnings.warn(message(folder, why, fix), LoraWarning, stacklevel=3)


def _build_config(pcfg, per_path, trained, tensors, dtype, st_path, params) -> LoraConfig:
    """The LoraConfig targeting exactly the imported paths, with the file's ranks and alphas."""
    layouts = _layouts(per_path, params)
    r0, a0 = int(pcfg["r"]), float(pcfg["lora_alpha"])
    dtype = _factor_dtype(tensors, dtype, st_path)
    return LoraConfig(
        targets=tuple(re.escape(p) for p in per_path),
        layouts={re.escape(p): lay for p, lay in layouts.items()},
        rank=r0, alpha=a0,
        rank_pattern={re.escape(p): e.r for p, e in per_path.items() if e.r != r0},
        alpha_pattern={re.escape(p): e.alpha for p, e in per_path.items() if e.alpha != a0},
        use_rslora=bool(pcfg.get("use_rslora", False)),
        use_dora=bool(pcfg.get("use_dora", False)),
        dropout=float(pcfg.get("lora_dropout") or 0.0),
        dtype=dtype,
        train=tuple(re.escape(p) for p in trained),
    )


def _layouts(per_path: dict, params) -> dict:
    """``{path: Layout}`` for the imported paths whose layout isn't the default one."""
    shapes = {p: tuple(x.shape) for p, x in leaves_with_paths(params)}
    layouts = {}
    for path, e in per_path.items():
        a, b, _ = next(iter(e.layers.values()))
        stacked = None not in e.layers
        lay = _infer_layout(path, shapes[path], stacked, a.shape[0], b.shape[1])
        if lay is not None and lay != Layout(0, len(shapes[path]) - 1, 1):
            layouts[path] = lay
    return layouts


def _factor_dtype(tensors: dict, dtype, st_path: str):
    """``dtype``, or the one dtype all LoRA tensors of the file share."""
    if dtype is not None:
        return dtype
    dtypes = {str(v.dtype) for k, v in tensors.items() if ".lora_" in k}
    if len(dtypes) != 1:
        raise error(st_path, f"the LoRA factors mix dtypes {sorted(dtypes)}",
                    "pass dtype= (e.g. jnp.float32) to convert them")
    return jnp.dtype(dtypes.pop())
