"""`import_peft`: PEFT's adapter files read into a lora_jax adapter tree and config."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from lora_jax._checkpoint.fingerprint import BaseMismatchError, check_base
from lora_jax._core.config import Layout, LoraConfig, LoraWarning
from lora_jax._core.errors import error, message
from lora_jax._core.leaf import dense_float32
from lora_jax._core.paths import leaves_with_paths, resolve, unflatten_params
from lora_jax._core.weights import LoraWeights, check_adapters, flatten_adapters, is_lora
from lora_jax._variants.dora import magnitude_init
from lora_jax.interop._keymap import (
    HFName,
    layer_names,
    lookup,
    resolve_key_map,
    tied_head,
    to_torch_layout,
)
from lora_jax.interop._peft_experts import DEFAULT_ORDER, take_experts
from lora_jax.interop._peft_format import (
    CONFIG_NAME,
    META_FP,
    META_SHA,
    PREFIX,
    WEIGHTS_NAME,
    UnsupportedPeftFeature,
    adapter_folder,
    check_peft_config,
    is_saved_module,
    pattern_value,
    peft_targets,
    read_config_json,
    read_safetensors,
    sha,
)
from lora_jax.interop._peft_ties import tied_paths

__all__ = ["import_peft"]


def import_peft(directory, params, *, key_map, adapter_name: str = "default", dtype=None,
                on_base_mismatch: str = "error", check_finite: bool = True, tied=(),
                expert_order=DEFAULT_ORDER):
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
      expert_order: MoE expert weights (PEFT's ``target_parameters``, key-map
        kinds ``"experts"`` / ``"experts_in_out"``): one torch module's
        parameter names in registration order, which decides where PEFT
        nested their adapters (see `lj.export_peft`).

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
    src = _read_adapter(adapter_folder(directory, adapter_name, "lj.import_peft"))
    tables = _skeleton_tables(params, km)
    ties = _import_ties(tables, km, tied_paths(tied, "lj.import_peft"))
    all_tensors = src.tensors
    experts = {}
    if src.pcfg.get("target_parameters"):
        rest = dict(src.tensors)
        experts = take_experts(rest, src.pcfg, tables.by_param, dict(tables.flat), expert_order,
                               src.st_path)
        src = src._replace(tensors=rest)
    pieces = _classify_tensors(src, tables, ties)
    _resolve_ties(pieces, ties, src)
    _check_untied_heads(pieces, tables, km, src)
    _check_all_placed(pieces, tables, km, src.st_path, len(experts))
    _check_targeted(pieces.factors, tables, src)
    per_path = _gather_per_path(pieces.factors, tables.by_module, src)
    per_path.update(_expert_entries(experts, tables, src))
    config = _build_config(src.pcfg, per_path, pieces.trained, all_tensors, dtype, src.st_path,
                           params).replace(tied=tuple(ties))
    adapters = _assemble_adapters(params, tables, per_path, pieces.trained, config)
    _check_imported(params, adapters, config, src.st_path, check_finite)
    # Both base checks warn at stacklevel=3, i.e. at import_peft's caller: call them here.
    if META_FP in src.meta:
        check_base(params, json.loads(src.meta[META_FP]), on_mismatch=on_base_mismatch,
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
    pcfg = read_config_json(cfg_path)
    check_peft_config(pcfg, cfg_path)
    tensors, meta = read_safetensors(st_path)
    _check_sums(st_path, tensors, meta)
    return _Source(folder, st_path, pcfg, tensors, meta)


def _check_sums(st_path: str, tensors: dict, meta: dict) -> None:
    """Every tensor must match the sha256 lora_jax recorded at export (when it did)."""
    if META_SHA not in meta:
        return
    sums = json.loads(meta[META_SHA])
    for k, v in tensors.items():
        if sums.get(k) != sha(v):
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
        rest = key[len(PREFIX):]
        head = next((h for h in heads if rest.startswith(h + ".")), None)
        if not key.startswith(PREFIX):
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
    if rest in by_param and is_saved_module(by_param[rest][1].module, saved):
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
        key = f"{PREFIX}{tie.head_module}.{suffix}"
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
        key = f"{PREFIX}{tie.head_module}.{suffix}"
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
        r = pattern_value(src.pcfg.get("rank_pattern"), name, src.pcfg["r"])
        alpha = pattern_value(src.pcfg.get("alpha_pattern"), name, src.pcfg["lora_alpha"])
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


def _check_all_placed(pieces: _Pieces, tables: _Tables, km, st_path: str,
                      n_experts: int = 0) -> None:
    """Every key must have found its leaf, and some must be LoRA factors (of modules, or
    of ``n_experts`` expert weights)."""
    if pieces.unplaced:
        raise error(st_path, f"{len(pieces.unplaced)} keys don't map to any leaf of params "
                             f"through key map {getattr(km, 'name', 'custom')!r}, e.g. "
                             f"{pieces.unplaced[:5]}. Keys must be "
                             f"'{PREFIX}<module>.lora_A.weight' etc. for modules the key map "
                             f"produces from params' paths (e.g. {sorted(tables.by_module)[:3]})",
                    "pass the key map (and prefix, e.g. KEY_MAPS['bert'].with_prefix('bert.')) "
                    "of the model the adapter was trained on")
    if not pieces.factors and not n_experts:
        raise error(st_path, "no LoRA factors found (no lora_A / lora_B tensors)",
                    "check the file: it should be a PEFT LoRA adapter's "
                    "adapter_model.safetensors")


def _check_targeted(factors: dict, tables: _Tables, src: _Source) -> None:
    """Every module PEFT targets (target_modules, layers_to_transform, ...) must have its
    factors: one without both was lost, and skipping it would give another model."""
    for module, (_, hf, _) in sorted(tables.by_module.items()):
        if hf.kind == "vector" or module in factors or not peft_targets(src.pcfg, module):
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


def _expert_entries(experts: dict, tables: _Tables, src: _Source) -> dict[str, _PathFactors]:
    """`_PathFactors` of the expert weights (``a (E, in, r)``, ``b (E, r, out)``)."""
    out = {}
    for path, (a, b) in experts.items():
        module = tables.by_path[path].module
        r = a.shape[-1]
        want = int(pattern_value(src.pcfg.get("rank_pattern"), module, src.pcfg["r"]))
        if want != r:
            raise error(src.st_path, f"{module}: its expert factors have rank {r} but "
                                     f"adapter_config.json gives it {want}; the config and "
                                     f"weights don't belong together", "re-export the adapter")
        if src.pcfg.get("use_dora"):
            raise error(src.st_path, f"{module}: use_dora with target_parameters (PEFT's "
                                     f"ParamWrapper has no DoRA)", "re-export the adapter",
                        kind=UnsupportedPeftFeature)
        alpha = float(pattern_value(src.pcfg.get("alpha_pattern"), module,
                                    src.pcfg["lora_alpha"]))
        out[path] = _PathFactors(r, alpha, {None: (a, b, None)})
    return out


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
    r = int(pattern_value(pcfg.get("rank_pattern"), module, pcfg["r"]))
    alpha = float(pattern_value(pcfg.get("alpha_pattern"), module, pcfg["lora_alpha"]))
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
        if a.ndim == 3:         # expert weights: (E, in, r), (E, r, out)
            layouts[path] = Layout(1, 1, 1)
            continue
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
