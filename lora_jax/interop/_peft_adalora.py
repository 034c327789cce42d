"""PEFT's AdaLoRA adapter files, both ways: `export_peft_adalora`, `import_peft_adalora`.

PEFT 0.21 saves an AdaLoRA model (``save_pretrained``) as::

    adapter_config.json          peft_type "ADALORA", init_r, target_r, lora_alpha, the
                                 schedule (tinit, tfinal, deltaT, beta1, beta2,
                                 orth_reg_weight, total_step), and rank_pattern:
                                 {"<module>.lora_E": [bool] * init_r}, the kept triplets
    adapter_model.safetensors    base_model.model.<module>.lora_A  (k, in)   P[:, kept].T
                                 base_model.model.<module>.lora_E  (k, 1)    Λ[kept]
                                 base_model.model.<module>.lora_B  (out, k)  Q[kept].T

with ``k`` the module's number of kept triplets (``ranknum``, always the
initial rank, is not saved). PEFT scales by ``lora_alpha / (ranknum + 1e-5)``;
lora_jax's `AdaLoraWeights` carry ``scale`` itself, so the export writes
``lora_alpha = scale * (init_r + 1e-5)`` and the import reads
``scale = lora_alpha / (init_r + 1e-5)``: both models compute the same update.
"""

from __future__ import annotations

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax._adalora import adalora, adalora_view
from lora_jax._core.config import Layout, LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.paths import leaves_with_paths, path_str, unflatten_params
from lora_jax._core.weights import AdaLoraWeights, check_adapters, is_adalora, is_node
from lora_jax.interop._files import safetensors_modules
from lora_jax.interop._keymap import HFName, layer_names, lookup, resolve_key_map
from lora_jax.interop._peft_format import (
    CONFIG_NAME,
    META_SHA,
    PEFT_VERSION,
    PREFIX,
    WEIGHTS_NAME,
    atomic_write,
    read_config_json,
    read_safetensors,
    sha,
)

__all__ = ["export_peft_adalora", "import_peft_adalora"]

_EPS = 1e-5   # PEFT: scaling = lora_alpha / (ranknum + 1e-5)
# lj.adalora's keyword arguments -> AdaLoraConfig's fields
_SCHEDULE = {"target_r": "target_r", "total_step": "total_step", "tinit": "tinit",
             "tfinal": "tfinal", "delta_t": "deltaT", "beta1": "beta1", "beta2": "beta2",
             "orth_reg_weight": "orth_reg_weight"}
_FACTOR = re.compile(r"(.+)\.(lora_A|lora_E|lora_B)")


def _is_ada_node(x) -> bool:
    return is_node(x) or is_adalora(x)


def _stacked_names(hf: HFName, path: str, a) -> list[str]:
    """The torch parameter names of one AdaLoRA leaf: one, or one per stacked layer."""
    n_stacked = a.ndim - 2
    if n_stacked == 0 and "{i}" not in hf.name:
        return [hf.name]
    if n_stacked == 1 and "{i}" in hf.name:
        return layer_names(hf, path, a.shape)
    raise error(path, f"the leaf has {n_stacked} stacked axes (a: {tuple(a.shape)}) but the key "
                      f"map gives {hf.name!r}; a stacked leaf needs one stacked axis and '{{i}}' "
                      f"in its template, an unstacked one no '{{i}}'",
                "correct the key map rule (e.g. r'model.layers.{i}.\\1.weight' for nn.scan "
                "layers)")


def _schedule_fields(schedule, init_r: int) -> dict:
    if schedule is None:   # PEFT requires total_step > 0; 1 with tinit = tfinal = 0 is valid
        return {"target_r": init_r, "total_step": 1, "tinit": 0, "tfinal": 0, "deltaT": 1,
                "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5}
    if not isinstance(schedule, dict) or set(schedule) - set(_SCHEDULE) \
            or "total_step" not in schedule:
        raise error("lj.export_peft_adalora", f"schedule={schedule!r} is not a dict of "
                    f"lj.adalora's keyword arguments with total_step "
                    f"(known: {sorted(_SCHEDULE)})",
                    "pass e.g. schedule=dict(target_r=2, total_step=1000, tinit=100, tfinal=200,"
                    " delta_t=10)", kind=TypeError)
    # lj.adalora's checks: a schedule it refuses, PEFT would refuse too
    adalora(optax.identity(), **{k: v for k, v in schedule.items() if k != "orth_reg_weight"})
    fields = _schedule_fields(None, init_r)
    fields.update({_SCHEDULE[k]: v for k, v in schedule.items()})
    return fields


def export_peft_adalora(directory, adapters, config: LoraConfig, *, key_map, params=None,
                        schedule=None) -> str:
    """Writes AdaLoRA adapters as PEFT's AdaLoRA files (``PeftModel.from_pretrained`` loads them).

    Each module keeps the triplets whose ``e`` is non-zero, listed in the
    config's ``rank_pattern`` (PEFT resizes the module to them on load); a
    module that kept none is written with one zero triplet (PEFT can't load
    a rank-0 module), which changes nothing. Every leaf must have the same
    initial rank and scale (PEFT's one ``init_r`` and ``lora_alpha``).
    Only ``linear`` modules (PEFT's ``SVDLinear``) are supported; a stacked
    leaf needs ``'{i}'`` in its key map template (one module per layer).

    Args:
      directory: the output folder (created; existing adapter files are replaced).
      adapters: the tree from `lj.adalora_init` (after training).
      config: its `LoraConfig` (``rank`` is ``init_r``; ``dropout`` is recorded).
      key_map: our paths -> torch names, as for `lj.export_peft` (a preset,
        a `lora_jax.interop.KeyMap`, ``{regex: template}`` or a callable).
      params: the base params; when given, the adapters are checked against them.
      schedule: the keyword arguments given to `lj.adalora` (``target_r``,
        ``total_step``, ``tinit``, ``tfinal``, ``delta_t``, ``beta1``,
        ``beta2``; also ``orth_reg_weight``), recorded as AdaLoraConfig's
        fields so training can resume in PEFT. None: the schedule is not
        recorded (``total_step=1``, ``target_r=init_r``, PEFT's defaults
        otherwise), which only matters for further training.

    Returns:
      The folder written.

    Example:
      >>> import json, os, tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"params": {"lm_head": {"kernel": jnp.ones((8, 16))}}}
      >>> cfg = lj.LoraConfig(rank=3, alpha=6, targets=r".*/lm_head/kernel")
      >>> ad = lj.adalora_init(params, cfg, key=jax.random.key(0))
      >>> node = ad["params"]["lm_head"]["kernel"]
      >>> ad["params"]["lm_head"]["kernel"] = node._replace(e=jnp.array([1.0, 0.0, 2.0]))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = lj.export_peft_adalora(d, ad, cfg, key_map="llama")
      ...     with open(os.path.join(d, "adapter_config.json")) as fh:
      ...         c = json.load(fh)
      >>> c["peft_type"], c["init_r"], c["rank_pattern"]
      ('ADALORA', 3, {'lm_head.lora_E': [True, False, True]})
    """
    where = "lj.export_peft_adalora"
    st_numpy, _ = safetensors_modules(where)
    km = resolve_key_map(key_map, where)
    if not isinstance(config, LoraConfig):
        raise error(where, f"config must be a lj.LoraConfig, got {type(config).__name__}",
                    "pass the LoraConfig the adapters were created with", kind=TypeError)
    flat, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=_is_ada_node)
    nodes = [(path_str(p), n) for p, n in flat if n is not None]
    others = [p for p, n in nodes if not is_adalora(n)]
    if others or not nodes:
        got = "no AdaLoraWeights" if not nodes else f"other nodes at {others[:4]}"
        raise error(where, f"the tree must hold AdaLoraWeights only (and None), got {got}",
                    "pass the tree lj.adalora_init built (for plain LoRA use lj.export_peft)")
    if params is not None:
        check_adapters(params, adalora_view(adapters), config)
    init_r = {int(n.a.shape[-1]) for _, n in nodes}
    scales = {float(np.asarray(n.scale, np.float64)) for _, n in nodes}
    if len(init_r) != 1 or max(scales) - min(scales) > 1e-6 * max(scales):
        raise error(where, f"the leaves have initial ranks {sorted(init_r)} and scales "
                           f"{sorted(scales)}; PEFT's AdaLoRA has one init_r and one lora_alpha",
                    "build the adapters with one rank and alpha (no rank_pattern / "
                    "alpha_pattern)")
    r0, scale = init_r.pop(), scales.pop()
    tensors, rank_pattern, modules = {}, {}, []
    for path, node in nodes:
        hf = lookup(km, path)
        if hf is None:
            raise error(where, f"the key map leaves {path!r} unmapped",
                        "add a rule for it (lj.interop.KeyMap), or use the preset matching "
                        "your model (presets: llama, gpt2, bert)")
        if hf.kind != "linear":
            raise error(path, f"the key map says {hf.name!r} is a {hf.kind!r} parameter; "
                              f"PEFT's AdaLoRA is exported for linear layers only",
                        "narrow LoraConfig.targets to linear kernels")
        a, e, b = (np.asarray(x) for x in (node.a, node.e, node.b))
        for i, name in enumerate(_stacked_names(hf, path, a)):
            module = name.rsplit(".", 1)[0]
            ai, ei, bi = (a[i], e[i], b[i]) if a.ndim == 3 else (a, e, b)
            kept = ei != 0
            if not kept.any():
                kept[0] = True   # PEFT can't load rank 0; one zero triplet adds nothing
            rank_pattern[f"{module}.lora_E"] = [bool(k) for k in kept]
            tensors[f"{PREFIX}{module}.lora_A"] = np.ascontiguousarray(ai[:, kept].T)
            tensors[f"{PREFIX}{module}.lora_E"] = np.ascontiguousarray(ei[kept][:, None])
            tensors[f"{PREFIX}{module}.lora_B"] = np.ascontiguousarray(bi[kept].T)
            modules.append(module)
    peft_cfg = {
        "peft_type": "ADALORA", "task_type": None, "base_model_name_or_path": None,
        "revision": None, "inference_mode": True, "auto_mapping": None,
        "peft_version": PEFT_VERSION, "r": 8, "init_r": r0,
        "lora_alpha": scale * (r0 + _EPS), "target_modules": sorted(modules),
        "exclude_modules": None, "lora_dropout": config.dropout, "fan_in_fan_out": False,
        "bias": "none", "use_rslora": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": rank_pattern, "alpha_pattern": {}, "use_dora": False,
        "loftq_config": {}, **_schedule_fields(schedule, r0),
    }
    folder = os.fspath(directory)
    os.makedirs(folder, exist_ok=True)
    meta = {"format": "pt",
            META_SHA: json.dumps({k: sha(v) for k, v in sorted(tensors.items())})}
    atomic_write(os.path.join(folder, WEIGHTS_NAME), st_numpy.save(tensors, metadata=meta))
    atomic_write(os.path.join(folder, CONFIG_NAME),
                 (json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n").encode())
    return folder


def _read(folder: str):
    cfg_path, st_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            raise error(folder, f"no {os.path.basename(p)}",
                        "point at the folder PEFT's save_pretrained (or "
                        "lj.export_peft_adalora) wrote, saved with safetensors")
    pcfg = read_config_json(cfg_path)
    if not isinstance(pcfg, dict) or pcfg.get("peft_type") != "ADALORA":
        got = pcfg.get("peft_type") if isinstance(pcfg, dict) else type(pcfg).__name__
        raise error(cfg_path, f"peft_type={got!r}: not an AdaLoRA adapter (ADALORA)",
                    "read LoRA adapters with lj.import_peft")
    r0, alpha = pcfg.get("init_r"), pcfg.get("lora_alpha")
    if isinstance(r0, bool) or not isinstance(r0, int) or r0 < 1:
        raise error(cfg_path, f"init_r={r0!r} is not a positive integer",
                    "re-save the adapter with PEFT (AdaLoraConfig(init_r=...))")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise error(cfg_path, f"lora_alpha={alpha!r} is not a number > 0",
                    "re-save the adapter with PEFT")
    for field, ok in (("bias", "none"), ("use_dora", False), ("fan_in_fan_out", False)):
        if pcfg.get(field, ok) not in (ok, None):
            raise error(cfg_path, f"{field}={pcfg[field]!r} is not supported for AdaLoRA here",
                        f"use an adapter with {field}={ok!r}")
    tensors, meta = read_safetensors(st_path)
    if META_SHA in meta:
        sums = json.loads(meta[META_SHA])
        for k, v in tensors.items():
            if sums.get(k) != sha(v):
                raise error(st_path, f"tensor {k} does not match the sha256 recorded at export: "
                                     f"the file is corrupted", "re-export it")
    return cfg_path, st_path, pcfg, tensors


def import_peft_adalora(directory, params, *, key_map):
    """Reads PEFT's AdaLoRA files into ``(adapters, config)`` for ``params``.

    The tree holds `AdaLoraWeights` at the initial rank ``init_r``: the kept
    triplets where ``rank_pattern`` puts them, the pruned ones zero (``e``, and
    their columns of ``a`` and rows of ``b``); a module without a
    ``rank_pattern`` entry holds all ``init_r`` triplets. ``scale`` is PEFT's
    ``lora_alpha / (init_r + 1e-5)``, and the `LoraConfig` has ``rank=init_r``,
    ``alpha=scale * init_r`` and the imported paths as targets. A stacked leaf
    (``'{i}'`` in its key map template) gathers its layers; a layer the file
    lacks is all pruned.

    Args:
      directory: the folder ``save_pretrained`` (or `export_peft_adalora`) wrote.
      params: the base params (the skeleton).
      key_map: our paths -> torch names, as for `lj.import_peft`.

    Returns:
      ``(adapters, config)``: use ``lj.apply(fn, config)(params,
      lj.adalora_view(adapters), x)``, or ``lj.adalora_to_lora(adapters, config)``.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"params": {"lm_head": {"kernel": jnp.ones((8, 16))}}}
      >>> cfg = lj.LoraConfig(rank=3, alpha=6, targets=r".*/lm_head/kernel")
      >>> ad = lj.adalora_init(params, cfg, key=jax.random.key(0))
      >>> node = ad["params"]["lm_head"]["kernel"]
      >>> ad["params"]["lm_head"]["kernel"] = node._replace(e=jnp.array([1.0, 0.0, 2.0]))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = lj.export_peft_adalora(d, ad, cfg, key_map="llama")
      ...     back, cfg2 = lj.import_peft_adalora(d, params, key_map="llama")
      >>> back["params"]["lm_head"]["kernel"].e.tolist(), cfg2.rank, round(cfg2.alpha, 4)
      ([1.0, 0.0, 2.0], 3, 6.0)
    """
    km = resolve_key_map(key_map, "lj.import_peft_adalora")
    cfg_path, st_path, pcfg, tensors = _read(os.fspath(directory))
    r0 = pcfg["init_r"]
    flat = leaves_with_paths(params)
    factors, by_module = _group_factors(tensors, flat, km, st_path)
    pattern = pcfg.get("rank_pattern") or {}
    scale = float(pcfg["lora_alpha"]) / (r0 + _EPS)
    layers: dict[str, dict] = {}
    for module, f in sorted(factors.items()):
        a, e, b = _place(module, f, pattern, r0, cfg_path, st_path)
        path, layer, n = by_module[module]
        layers.setdefault(path, {"n": n})[layer] = (a, e, b)

    def node(got):
        if None in got:
            a, e, b = got[None]
        else:
            zero = tuple(np.zeros_like(x) for x in next(v for k, v in got.items() if k != "n"))
            a, e, b = (np.stack([got.get(i, zero)[j] for i in range(got["n"])]) for j in range(3))
        return AdaLoraWeights(jnp.asarray(a), jnp.asarray(e), jnp.asarray(b),
                              jnp.float32(scale))

    adapters = unflatten_params(params, [node(layers[p]) if p in layers else None
                                         for p, _ in flat])
    dtypes = {str(x.dtype) for f in factors.values() for x in f.values()}
    shapes = dict((p, tuple(np.shape(x))) for p, x in flat)
    layouts = {re.escape(p): lay for p, got in layers.items()
               if (lay := _layout(shapes[p], got)) is not None}
    config = LoraConfig(rank=r0, alpha=scale * r0, targets=tuple(re.escape(p) for p in layers),
                        layouts=layouts,
                        dropout=float(pcfg.get("lora_dropout") or 0.0),
                        dtype=jnp.dtype(dtypes.pop()) if len(dtypes) == 1 else jnp.float32)
    try:
        check_adapters(params, adalora_view(adapters), config)
    except ValueError as e:
        raise error(st_path, str(e)) from None
    return adapters, config


def _group_factors(tensors: dict, flat, km, st_path: str):
    """``({module: {"lora_A": .., "lora_E": .., "lora_B": ..}}, {module: (path, layer, n)})``:
    the file's tensors by torch module, each module placed through the key map."""
    by_module = {}
    for path, leaf in flat:
        hf = lookup(km, path)
        if hf is None or hf.kind != "linear":
            continue
        names = layer_names(hf, path, np.shape(leaf))
        for i, name in enumerate(names):
            by_module[name.rsplit(".", 1)[0]] = (path, i if "{i}" in hf.name else None,
                                                 len(names))
    factors: dict[str, dict] = {}
    for key, value in tensors.items():
        m = _FACTOR.fullmatch(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        if m is None or m.group(1) not in by_module:
            raise error(st_path, f"key {key!r} is not {PREFIX}<module>.lora_A / lora_E / lora_B "
                                 f"for a linear module the key map gives params "
                                 f"(e.g. {sorted(by_module)[:3]})",
                        "pass the key map of the model the adapter was trained on")
        factors.setdefault(m.group(1), {})[m.group(2)] = np.asarray(value)
    if not factors:
        raise error(st_path, "no AdaLoRA factors (lora_A / lora_E / lora_B) found",
                    "point at an AdaLoRA adapter's folder")
    return factors, by_module


def _place(module: str, f: dict, pattern: dict, r0: int, cfg_path: str, st_path: str):
    """One module's ``(a, e, b)`` at the initial rank, the kept triplets where
    ``rank_pattern`` says, the pruned ones zero."""
    for which in ("lora_A", "lora_E", "lora_B"):
        if which not in f:
            raise error(st_path, f"{PREFIX}{module}.{which} is missing (the file has "
                                 f"{sorted(f)} for {module})",
                        "re-save the adapter with PEFT's save_pretrained")
    # PEFT saves "<module>.lora_E"; its allocator's own keys end in ".<adapter name>"
    kept = pattern.get(f"{module}.lora_E", pattern.get(f"{module}.lora_E.default", [True] * r0))
    if not (isinstance(kept, list) and all(isinstance(k, bool) for k in kept)) \
            or len(kept) != r0:
        raise error(cfg_path, f"rank_pattern[{module + '.lora_E'!r}] has "
                              f"{len(kept) if isinstance(kept, list) else kept!r} entries, "
                              f"but init_r={r0} (a bool per initial triplet)",
                    "re-save the adapter with PEFT: the pattern and init_r must agree")
    idx = np.flatnonzero(kept)
    k = idx.size
    fa, fe, fb = f["lora_A"], f["lora_E"], f["lora_B"]
    if fa.ndim != 2 or fa.shape[0] != k or fe.shape != (k, 1) or fb.ndim != 2 \
            or fb.shape[1] != k:
        raise error(st_path, f"{PREFIX}{module}: lora_A {fa.shape}, lora_E {fe.shape}, "
                             f"lora_B {fb.shape} don't fit the {k} triplets rank_pattern "
                             f"keeps (want ({k}, in), ({k}, 1), (out, {k}))",
                    "the config and weights don't belong together: re-save the adapter")
    a = np.zeros((fa.shape[1], r0), fa.dtype)
    e = np.zeros((r0,), fe.dtype)
    b = np.zeros((r0, fb.shape[0]), fb.dtype)
    a[:, idx], e[idx], b[idx] = fa.T, fe[:, 0], fb.T
    return a, e, b


def _layout(shape: tuple, got: dict) -> Layout | None:
    """The Layout splitting ``shape`` into (stacked, in, out) axes of the factors' sizes,
    None for the default one (or when nothing fits: check_adapters shows both shapes)."""
    a, _, b = next(v for k, v in got.items() if k != "n")
    s = 0 if None in got else 1
    rest = shape[s:]
    for k in range(1, len(rest)):
        if math.prod(rest[:k]) == a.shape[0] and math.prod(rest[k:]) == b.shape[1]:
            lay = Layout(s, k, len(rest) - k)
            return None if lay == Layout(0, len(shape) - 1, 1) else lay
    return None
