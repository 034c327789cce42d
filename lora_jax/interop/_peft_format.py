"""PEFT's adapter file format: names, metadata keys, adapter_config.json checks, module matching."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping

import numpy as np

from lora_jax._core.config import LoraWarning
from lora_jax._core.errors import error, message
from lora_jax.interop._files import safetensors_modules

__all__ = ["CONFIG_NAME", "FACTOR_KEYS", "META_CFG", "META_FP", "META_SHA", "PEFT_VERSION",
           "PREFIX", "UnsupportedPeftFeature", "WEIGHTS_NAME", "adapter_folder", "atomic_write",
           "check_peft_config", "is_saved_module", "pattern_value", "peft_targets",
           "read_safetensors", "sha", "read_config_json"]


CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"  # the PEFT release this format was verified against
META_SHA = "lora_jax.sha256"
META_FP = "lora_jax.base_fingerprint"
META_CFG = "lora_jax.config"

# How each layer kind names its factors (PEFT's LoraLayer subclasses).
FACTOR_KEYS = {"linear": ("lora_A.weight", "lora_B.weight"),
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
    "target_parameters",   # read by lora_jax.interop._peft_experts
    *_UNSUPPORTED,
}


class UnsupportedPeftFeature(ValueError):
    """A PEFT adapter uses a feature lora_jax does not implement."""


def adapter_folder(directory, adapter_name: str, where: str) -> str:
    if not isinstance(adapter_name, str) or not adapter_name or "/" in adapter_name \
            or adapter_name in (".", ".."):
        raise error(where, f"adapter_name={adapter_name!r} is not a plain folder name",
                    "use a plain name like 'default'")
    directory = os.fspath(directory)
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


def sha(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def atomic_write(path: str, data: bytes) -> None:
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


def read_config_json(cfg_path: str):
    """``adapter_config.json`` parsed; an unreadable or invalid file is an error naming it."""
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(cfg_path, f"not valid JSON ({e})",
                    "re-export the adapter (or re-save it with PEFT's save_pretrained)") from e


def check_peft_config(cfg, where: str) -> None:
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


def is_saved_module(module: str, saved) -> bool:
    # PEFT (_set_trainable) matches modules_to_save entries as plain suffixes:
    # "norm" also selects "input_layernorm".
    return any(module.endswith(t) for t in saved)


def pattern_value(patterns: Mapping | None, module: str, default):
    # PEFT 0.21: the first key k with re.match(rf"(.*\.)?({k})$", module) wins.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def peft_targets(cfg: Mapping, module: str) -> bool | None:
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


def read_safetensors(path: str):
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
