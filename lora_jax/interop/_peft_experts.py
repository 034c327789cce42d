"""PEFT's ``target_parameters``: LoRA on MoE expert weights stored as 3-D ``nn.Parameter``s.

PEFT 0.21 (``lora.ParamWrapper``) adapts a parameter ``(E, out, in)`` -- or
``(E, in, out)`` when its module has ``is_transposed = True`` -- with

* ``lora_A.weight``: ``(r * E, in)``, expert ``e``'s rows ``[e r, (e + 1) r)``;
* ``lora_B.weight``: ``(out, r * E)``, expert ``e``'s columns ``e, E + e, 2 E + e, ...``
  (the ``r * E`` axis is ``(r, E)``, rank-major);

so expert ``e``'s update is ``scale * B_e @ A_e`` over (out, in). Several
targeted parameters of one module nest: the one the torch module registers
first is innermost, at ``<module>.base_layer.<...>.lora_A.weight`` (one
``.base_layer`` per parameter registered after it). lora_jax holds the same
update as ``a: (E, in, r)``, ``b: (E, r, out)`` on a leaf ``(E, in, out)``
(`lj.Layout(1, 1, 1)`): ``a_e = A_e.T``, ``b_e = B_e.T``.

Key-map kinds: ``"experts"`` (the torch parameter is ``(E, out, in)``, the
lora_jax leaf its transpose ``(E, in, out)``) and ``"experts_in_out"`` (the
torch parameter is ``(E, in, out)``, a module with ``is_transposed``, equal to
the leaf).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lora_jax._core.errors import error
from lora_jax.interop._peft_format import PREFIX

__all__ = ["EXPERT_KINDS", "DEFAULT_ORDER", "expert_factors", "nested_keys", "take_experts",
           "targeted_params"]

EXPERT_KINDS = ("experts", "experts_in_out")
# transformers' MoE expert modules register gate_up_proj (or gate/up) before down_proj
DEFAULT_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "w1", "w3", "down_proj", "w2")


def _order_of(params: Sequence[str], order: Sequence[str], module: str) -> list[str]:
    """``params`` (names of one module's targeted parameters) in registration order."""
    if len(params) == 1:
        return list(params)
    unknown = [p for p in params if p not in order]
    if unknown:
        raise error(module, f"this module has several expert parameters {sorted(params)}; "
                            f"PEFT nests their adapters in the order the torch module "
                            f"registers them, which lora_jax can't see for {unknown}",
                    "pass expert_order=(...) with the module's parameter names in the order "
                    "its __init__ creates them")
    return sorted(params, key=list(order).index)


def nested_keys(param_names: Sequence[str], order: Sequence[str]) -> dict[str, str]:
    """``{torch parameter name: key prefix of its lora_A / lora_B}`` (PEFT's nesting)."""
    by_module: dict[str, list[str]] = {}
    for name in param_names:
        module, _, param = name.rpartition(".")
        by_module.setdefault(module, []).append(param)
    out = {}
    for module, params in by_module.items():
        ordered = _order_of(params, order, module)
        for j, param in enumerate(ordered):
            out[f"{module}.{param}"] = module + ".base_layer" * (len(ordered) - 1 - j)
    return out


def expert_factors(path: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``(lora_A.weight, lora_B.weight)`` of per-expert factors ``a: (E, in, r)``,
    ``b: (E, r, out)``."""
    if a.ndim != 3 or b.ndim != 3:
        raise error(path, f"expert factors must be a (E, in, r) and b (E, r, out), got "
                          f"{a.shape} and {b.shape}",
                    "give the expert weight lj.Layout(1, 1, 1) (lj.configure reads it), one "
                    "stacked axis: the experts")
    n_exp, d_in, r = a.shape
    lora_a = np.transpose(a, (0, 2, 1)).reshape(n_exp * r, d_in)         # (E r, in)
    lora_b = np.transpose(b, (2, 1, 0)).reshape(b.shape[2], r * n_exp)   # (out, r E)
    return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)


def _from_peft(name: str, lora_a: np.ndarray, lora_b: np.ndarray, n_exp: int, where: str):
    """``(a (E, in, r), b (E, r, out))`` from PEFT's two tensors of ``name``."""
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] % n_exp or \
            lora_a.shape[0] != lora_b.shape[1]:
        raise error(where, f"{name}: lora_A {lora_a.shape} / lora_B {lora_b.shape} are not "
                           f"PEFT's (r * {n_exp}, in) / (out, r * {n_exp}) expert factors",
                    "re-save the adapter with PEFT's save_pretrained")
    r = lora_a.shape[0] // n_exp
    a = np.transpose(lora_a.reshape(n_exp, r, -1), (0, 2, 1))
    b = np.transpose(lora_b.reshape(-1, r, n_exp), (2, 1, 0))
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def targeted_params(pcfg, by_param: dict) -> list[str]:
    """The torch parameter names ``target_parameters`` selects (PEFT matches a full
    name or a ``.``-suffix of one) among the expert parameters the key map maps."""
    wanted = list(pcfg.get("target_parameters") or [])
    return sorted(name for name, (_, hf) in by_param.items() if hf.kind in EXPERT_KINDS
                  and any(name == t or name.endswith("." + t) for t in wanted))


def take_experts(tensors: dict, pcfg, by_param: dict, leaves: dict, order, where: str) -> dict:
    """Removes the expert adapters from ``tensors``; returns ``{our path: (a, b)}``.

    ``by_param``: torch parameter name -> (our path, HFName); ``leaves``: our
    path -> the base leaf (for the number of experts)."""
    names = targeted_params(pcfg, by_param)
    wanted = list(pcfg.get("target_parameters") or [])
    matched = {t for t in wanted for n in names if n == t or n.endswith("." + t)}
    if set(wanted) - matched:
        raise error(where, f"target_parameters {sorted(set(wanted) - matched)} match no "
                           f"parameter the key map maps as an expert weight",
                    "map them with kind 'experts' ((E, out, in) in torch) or "
                    "'experts_in_out' in the key map")
    out = {}
    for name, prefix in nested_keys(names, order).items():
        path, _ = by_param[name]
        keys = [f"{PREFIX}{prefix}.lora_A.weight", f"{PREFIX}{prefix}.lora_B.weight"]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise error(where, f"{name}: target_parameters selects it but the file has no "
                               f"{missing[0]}; the file is incomplete (or the module registers "
                               f"its parameters in another order than expert_order)",
                        "re-export the adapter, or pass expert_order=")
        lora_a, lora_b = (tensors.pop(k) for k in keys)
        out[path] = _from_peft(name, np.asarray(lora_a), np.asarray(lora_b),
                               int(np.shape(leaves[path])[0]), where)
    return out
