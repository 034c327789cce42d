"""Tied embeddings on export: the ``tied=`` paths, and which exported embeddings PEFT ties."""

from __future__ import annotations

from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.paths import leaves_with_paths
from lora_jax._core.weights import flatten_adapters, is_lora
from lora_jax.interop._keymap import HFName, lookup, tied_head
from lora_jax.interop._peft_format import UnsupportedPeftFeature

__all__ = ["export_ties", "tied_paths"]


def export_ties(adapters, nodes, config: LoraConfig, tied, params, km) -> dict[str, str]:
    """``{our path: head parameter}`` of every exported embedding tied to the output head."""
    declared = tied_paths(tied, "lj.export_peft")
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


def tied_paths(tied, where: str) -> tuple:
    if isinstance(tied, str):
        tied = (tied,)
    if not isinstance(tied, (tuple, list)) or not all(isinstance(p, str) for p in tied):
        raise error(where, f"tied={tied!r} is not a tuple of '/'-joined paths",
                    "pass e.g. tied=('params/model/embed_tokens/embedding',)", kind=TypeError)
    return tuple(tied)
