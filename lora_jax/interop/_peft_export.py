"""`export_peft`: a lora_jax adapter tree written as PEFT's adapter files."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, NamedTuple

import numpy as np

from lora_jax._checkpoint.fingerprint import base_fingerprint
from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.leaf import dense_float32, is_container
from lora_jax._core.paths import leaves_with_paths
from lora_jax._core.weights import check_adapters, flatten_adapters, is_lora
from lora_jax.interop._files import safetensors_modules
from lora_jax.interop._keymap import (
    HFName,
    layer_names,
    lookup,
    resolve_key_map,
    to_torch_layout,
)
from lora_jax.interop._peft_experts import DEFAULT_ORDER, EXPERT_KINDS, expert_factors, nested_keys
from lora_jax.interop._peft_format import (
    CONFIG_NAME,
    FACTOR_KEYS,
    META_CFG,
    META_FP,
    META_SHA,
    PEFT_VERSION,
    PREFIX,
    WEIGHTS_NAME,
    adapter_folder,
    atomic_write,
    sha,
)
from lora_jax.interop._peft_ties import export_ties

__all__ = ["export_peft"]


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


def _alpha_for_export(path, config: LoraConfig, r: int, scale: float) -> float:
    """The lora_alpha giving this module's scale (the config's, unless the scale was changed)."""
    alpha = config.alpha_for(path)
    if math.isclose(scale, config.scale_for(path), rel_tol=1e-6):
        return alpha
    return scale * (math.sqrt(r) if config.use_rslora else r)


def _pattern_key(module: str) -> str:
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", module name).
    return re.escape(module)


def _loftq_record(config: LoraConfig, checked) -> dict:
    """PEFT's ``loftq_config`` of a LoftQ adapter (``{}`` for any other init).

    PEFT reads ``init_lora_weights="loftq"`` as "this adapter fits a LoftQ
    base, not W": loading it onto the float model redoes LoftQ there (with
    bitsandbytes' NF4, which is not lora_jax's bit for bit) before the factors
    are loaded. ``loftq_bits`` is the base's (so ``params`` is required)."""
    if config.init != "loftq":
        return {}
    if checked is None:
        raise error("lj.export_peft", "init='loftq' adapters fit their quantized base, and "
                    "PEFT's loftq_config records its bits (4 for NF4, 8 for int8), which only "
                    "the base shows",
                    "pass params= the quantized base lj.init returned")
    bits = {path: {"nf4": 4, "int8": 8}.get(str(getattr(leaf, "method", "")))
            for path, leaf, _, spec in checked if spec is not None}
    if None in bits.values() or len(set(bits.values())) != 1:
        shown = {p: b for p, b in list(bits.items())[:6]}
        raise error("lj.export_peft", f"init='loftq' needs every target quantized alike "
                    f"(PEFT's loftq_config has one loftq_bits), but params give {shown} "
                    f"(None: not NF4/int8)",
                    "pass params= the quantized base lj.init returned for these adapters")
    return {"loftq_bits": next(iter(bits.values())), "loftq_iter": config.loftq_iters}


def _peft_config(config: LoraConfig, out: _Exported, base_model_name_or_path,
                 task_type, loftq: dict) -> dict:
    modules, saved = out.modules, out.saved_modules
    ranks = [r for r, _ in (*modules.values(), *out.experts.values())]
    r0 = config.rank if config.rank in ranks else max(set(ranks), key=ranks.count)
    every_ra = [*modules.values(), *out.experts.values()]
    alphas = [a for r, a in every_ra if r == r0] or [a for _, a in every_ra]
    a0 = config.alpha if config.alpha in alphas else max(set(alphas), key=alphas.count)
    odd = {n: ra for n, ra in out.experts.items() if ra != (r0, a0)}
    if odd:
        raise error("lj.export_peft", f"expert weights {sorted(odd)[:4]} have (rank, alpha) "
                                      f"{sorted(set(odd.values()))[:3]} but the file's r and "
                                      f"lora_alpha are {(r0, a0)}; lora_jax writes no "
                                      f"rank_pattern for target_parameters",
                    "give the expert weights the config's rank and alpha")
    # A tied head is no target (PEFT ties it to the embedding), but PEFT gives
    # it its own scaling from the patterns: they must name it when needed.
    every = {**modules, **out.heads}
    rank_pattern = {_pattern_key(m): r for m, (r, _) in sorted(every.items()) if r != r0}
    alpha_pattern = {_pattern_key(m): a for m, (_, a) in sorted(every.items()) if a != a0}
    return {
        "peft_type": "LORA", "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "inference_mode": True, "auto_mapping": None, "peft_version": PEFT_VERSION,
        "r": r0, "lora_alpha": _json_number(a0),
        "target_modules": sorted(modules), "exclude_modules": None,
        "lora_dropout": config.dropout, "fan_in_fan_out": out.fan_in_fan_out, "bias": "none",
        "use_rslora": config.use_rslora, "modules_to_save": sorted(set(saved)) or None,
        "init_lora_weights": "loftq" if loftq else True,
        "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {k: _json_number(v) for k, v in alpha_pattern.items()},
        "use_dora": config.use_dora, "lora_bias": False, "layer_replication": None,
        "target_parameters": sorted(out.experts) or None, "trainable_token_indices": None,
        "loftq_config": loftq, "eva_config": None, "corda_config": None,
        "megatron_config": None, "megatron_core": "megatron.core",
        "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
        "ensure_weight_tying": out.tied,
    }


def _json_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def export_peft(directory, adapters, config: LoraConfig, *, key_map, params=None,
                adapter_name: str = "default", base_model_name_or_path: str | None = None,
                task_type: str | None = None, tied=(), overwrite: bool = False,
                expert_order=DEFAULT_ORDER) -> str:
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
      expert_order: for MoE expert weights (key-map kinds ``"experts"`` /
        ``"experts_in_out"``, written as PEFT's ``target_parameters``): the
        parameter names of one torch module in the order its ``__init__``
        registers them, which decides PEFT's nesting (``.base_layer``) of their
        adapters. The default knows transformers' names (``gate_up_proj``
        before ``down_proj``).

    An ``init="loftq"`` adapter is recorded as PEFT's
    ``init_lora_weights="loftq"`` with its ``loftq_config`` (bits from the
    quantized base, so ``params`` is then required): it fits that base, not
    the float weights. For an exact PEFT model, save ``lj.dequantize`` of
    the base as the model's weights and export with
    ``config.replace(init="kaiming", loftq_iters=1)`` (PEFT's own LoftQ
    recipe: the backbone plus ``init_lora_weights=True``).

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
    checked = None if params is None else check_adapters(params, adapters, config)
    loftq = _loftq_record(config, checked)
    nodes = _export_nodes(adapters, km)
    ties = export_ties(adapters, nodes, config, tied, params, km)
    out = _export_tensors(nodes, config, ties, expert_order)
    if out.saved_modules:
        _complete_saved_modules(out.tensors, out.saved_modules, params, km, nodes)
    if not out.modules and not out.experts:
        raise error("lj.export_peft", "the adapters hold no LoraWeights (only fully-trained "
                                      "leaves); PEFT needs at least one LoRA module",
                    "check the config: its targets must adapt at least one weight")
    peft_cfg = _peft_config(config, out, base_model_name_or_path, task_type, loftq)
    meta = _export_metadata(out.tensors, config, params)
    folder = adapter_folder(directory, adapter_name, "lj.export_peft")
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
    experts: dict          # torch expert parameter (target_parameters) -> (r, alpha)


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


def _export_tensors(nodes, config: LoraConfig, ties: dict, expert_order) -> _Exported:
    """PEFT's tensors for every node: LoRA factors, and the weights of modules_to_save
    (with the copies a tied head needs)."""
    out = _Exported({}, {}, [], False, {}, bool(ties), {})
    fan_in_fan_out = False
    experts = {}
    for path, node, hf in nodes:
        if is_lora(node) and hf.kind in EXPERT_KINDS:
            experts[hf.name] = (path, node)
        elif is_lora(node):
            _add_lora_tensors(out, path, node, hf, config)
            fan_in_fan_out |= hf.kind == "conv1d"
        else:
            if "{i}" in hf.name:
                raise error(path, "stacked fully-trained leaves can't be exported as "
                                  "modules_to_save",
                            "unstack them first")
            out.tensors[f"{PREFIX}{hf.name}"] = to_torch_layout(np.asarray(node), hf.kind, path)
            out.saved_modules.append(hf.module)
        if path in ties:
            _add_head_copies(out, hf, ties[path])
    if experts:
        _add_expert_tensors(out, experts, config, expert_order)
    return out._replace(fan_in_fan_out=fan_in_fan_out)


def _add_expert_tensors(out: _Exported, experts: dict, config: LoraConfig, order) -> None:
    """MoE expert weights' ``lora_A`` / ``lora_B`` (PEFT's ``target_parameters``)."""
    prefixes = nested_keys(list(experts), order)
    for name, (path, node) in experts.items():
        layout = config.layout_for(path)
        if node.m is not None or layout is None or \
                (layout.n_stacked, layout.n_in, layout.n_out, layout.order) != (1, 1, 1, None):
            why = ("DoRA (PEFT's ParamWrapper has no DoRA)" if node.m is not None else
                   f"layout {layout} (the default: one adapter over every expert)"
                   if layout is None else f"layout {layout}")
            raise error(path, f"an expert weight ({name}) exports as PEFT's target_parameters "
                              f"only with plain LoRA on lj.Layout(1, 1, 1) (experts, in, out); "
                              f"this adapter has {why}",
                        "config = lj.configure(config, fn, params, *args) reads the layout; "
                        "plain LoRA only")
        scale = np.asarray(node.scale, np.float32)
        if scale.ndim:
            raise error(path, f"scale has shape {scale.shape}: this is an adapter set",
                        "export each adapter separately (adapter_name=...)")
        lora_a, lora_b = expert_factors(path, np.asarray(node.a), np.asarray(node.b))
        out.tensors[f"{PREFIX}{prefixes[name]}.lora_A.weight"] = lora_a
        out.tensors[f"{PREFIX}{prefixes[name]}.lora_B.weight"] = lora_b
        r = node.a.shape[-1]
        out.experts[name] = (r, _alpha_for_export(path, config, r, float(scale)))


def _add_head_copies(out: _Exported, hf: HFName, head: str) -> None:
    """The tied head's entries, copies of the embedding's, as PEFT writes them with
    ``ensure_weight_tying`` (its head shares the embedding's tensors, transposed)."""
    emb, head_module = f"{PREFIX}{hf.module}", head.rsplit(".", 1)[0]
    if f"{PREFIX}{hf.name}" in out.tensors:     # fully trained: the head is the same matrix
        out.tensors[f"{PREFIX}{head}"] = out.tensors[f"{PREFIX}{hf.name}"]
        return
    out.tensors[f"{PREFIX}{head_module}.lora_A.weight"] = \
        np.ascontiguousarray(out.tensors[f"{emb}.lora_embedding_B"].T)
    out.tensors[f"{PREFIX}{head_module}.lora_B.weight"] = \
        np.ascontiguousarray(out.tensors[f"{emb}.lora_embedding_A"].T)
    out.heads[head_module] = out.modules[hf.module]


def _add_lora_tensors(out: _Exported, path, node, hf: HFName, config: LoraConfig) -> None:
    """One LoRA leaf's ``lora_A`` / ``lora_B`` (and DoRA magnitude) per module it maps to."""
    a, b = np.asarray(node.a), np.asarray(node.b)
    scale = np.asarray(node.scale, np.float32)
    if scale.ndim:
        raise error(path, f"scale has shape {scale.shape}: this is an adapter set (a leading "
                          f"adapter axis)",
                    "export each adapter separately (adapter_name=...)")
    if hf.kind not in FACTOR_KEYS:
        raise error(path, f"the key map says {hf.name!r} is a {hf.kind!r} parameter; LoRA in "
                          f"PEFT applies to linear, conv1d and embedding layers",
                    "narrow LoraConfig.targets or correct the key map's kind")
    n_stacked = a.ndim - 2
    names = _stack_names(hf, path, n_stacked, a.shape)
    key_a, key_b = FACTOR_KEYS[hf.kind]
    r = a.shape[-1]
    alpha = _alpha_for_export(path, config, r, float(scale))
    m = None if node.m is None else np.asarray(node.m)
    for i, name in enumerate(names):
        module = name.rsplit(".", 1)[0]
        ai, bi = (a[i], b[i]) if n_stacked else (a, b)
        out.tensors[f"{PREFIX}{module}.{key_a}"] = np.ascontiguousarray(ai.T)
        out.tensors[f"{PREFIX}{module}.{key_b}"] = np.ascontiguousarray(bi.T)
        if m is not None:   # DoRA: one magnitude per output unit, (out,)
            out.tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = \
                np.ascontiguousarray(m[i] if n_stacked else m)
        out.modules[module] = (r, alpha)


def _export_metadata(tensors: dict, config: LoraConfig, params) -> dict:
    """The safetensors metadata: lora_jax's sha256 sums, config and base fingerprint."""
    meta = {"format": "pt",
            META_SHA: json.dumps({k: sha(v) for k, v in sorted(tensors.items())}),
            META_CFG: json.dumps(_config_dict(config))}
    if params is not None:
        meta[META_FP] = json.dumps(base_fingerprint(params, config))
    return meta


def _write_adapter(folder: str, st_numpy, tensors: dict, meta: dict, peft_cfg: dict,
                   overwrite: bool) -> None:
    """Writes both files into ``folder`` (created); existing ones only with ``overwrite``."""
    os.makedirs(folder, exist_ok=True)
    targets = [os.path.join(folder, n) for n in (WEIGHTS_NAME, CONFIG_NAME)]
    if not overwrite and any(os.path.exists(t) for t in targets):
        raise error(folder, "already holds a PEFT adapter",
                    "pass overwrite=True, or another directory / adapter_name")
    atomic_write(targets[0], st_numpy.save(tensors, metadata=meta))
    atomic_write(targets[1], (json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n").encode())


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
            tensors[f"{PREFIX}{hf.name}"] = to_torch_layout(np.asarray(dense_float32(leaf)
                                                            if is_container(leaf) else leaf),
                                                            hf.kind, path)
