"""Key maps: lora_jax '/'-paths <-> Hugging Face (PyTorch) parameter names.

A `KeyMap` is an ordered list of rules ``(regex, template, kind)``. The
first regex that fullmatches a leaf's path wins; the template is expanded
with its groups (``\\1``), every ``/`` in the result becomes ``.``, and the
map's ``prefix`` is prepended, giving the torch parameter name. ``kind``
says how the arrays correspond:

* ``"linear"``: a Flax ``(in, out)`` kernel is the transposed torch
  ``nn.Linear`` weight ``(out, in)``;
* ``"conv1d"``: GPT-2's ``Conv1D`` stores ``(in, out)`` like Flax (no
  transpose; PEFT's ``fan_in_fan_out``);
* ``"embedding"``: ``(vocab, dim)`` in both;
* ``"vector"``: 1-D (biases, norm weights), identical.
* ``"experts"``: MoE expert weights, a 3-D torch ``nn.Parameter`` ``(E, out, in)``
  (PEFT's ``target_parameters``; transformers' experts run ``F.linear`` per expert)
  whose lora_jax leaf is ``(E, in, out)``;
* ``"experts_in_out"``: a torch ``(E, in, out)`` expert parameter (a module with
  ``is_transposed = True``), identical to the leaf.

The reverse direction never parses names: it maps every path of a
skeleton (the params) forward and inverts that table.

A template may contain ``{i}`` for a leaf with one stacked (``nn.scan``)
axis: stacked layer ``i`` becomes its own module (`layer_names`), in
`to_hf_state_dict` / `from_hf_state_dict` as in `lj.export_peft` /
`lj.import_peft`.

``ties`` records which torch parameters a model may tie (Hugging Face's
``_tied_weights_keys``): ``{"lm_head.weight": "model.embed_tokens.weight"}``
says the output head can be the input embedding. A params tree holding the
embedding but no leaf for the head uses the embedding as its head (tied);
the PEFT export and import read this to keep adapters on both uses.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from lora_jax._core.errors import error
from lora_jax._core.leaf import is_container
from lora_jax._core.paths import leaves_with_paths, unflatten_params

__all__ = ["KeyMap", "HFName", "KEY_MAPS", "resolve_key_map", "to_hf_state_dict",
           "from_hf_state_dict", "layer_names", "tied_head"]

KINDS = ("linear", "conv1d", "embedding", "vector", "experts", "experts_in_out")
_LEAF_KIND = {"kernel": "linear", "embedding": "embedding"}


class HFName(NamedTuple):
    """Where a leaf lives in a torch model: parameter name and array correspondence."""

    name: str   # e.g. "model.layers.0.self_attn.q_proj.weight" ("{i}" if stacked)
    kind: str   # one of KINDS

    @property
    def module(self) -> str:
        """The module owning the parameter (the name without ``.weight``/``.bias``)."""
        return self.name.rsplit(".", 1)[0]


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """Rules mapping '/'-paths to Hugging Face parameter names.

    Args:
      rules: ``((regex, template, kind), ...)``; ``kind`` may be None to
        infer it from the path's last key (``kernel`` -> ``"linear"``,
        ``embedding`` -> ``"embedding"``, otherwise ``"vector"``).
      prefix: prepended to every name (e.g. ``"bert."`` for ``BertFor*``).
      name: shown in messages.
      ties: ``{head parameter: embedding parameter}``, torch names without
        ``prefix``: the output head the model may tie to an input embedding
        (``{"lm_head.weight": "model.embed_tokens.weight"}`` for Llama).
        When params hold the embedding and no leaf for the head, the head
        is that embedding; `lj.export_peft` / `lj.import_peft` then keep an
        adapter of the embedding on both uses (PEFT's
        ``ensure_weight_tying``).

    Example:
      >>> km = KeyMap(((r"params/layers_(\\d+)/(\\w+)/kernel", r"model.layers.\\1.\\2.weight",
      ...               None),))
      >>> km.lookup("params/layers_3/q_proj/kernel")
      HFName(name='model.layers.3.q_proj.weight', kind='linear')
      >>> km.lookup("params/norm/scale") is None
      True
    """

    rules: tuple
    prefix: str = dataclasses.field(default="", kw_only=True)
    name: str = dataclasses.field(default="custom", kw_only=True)
    ties: Any = dataclasses.field(default=(), kw_only=True)

    def __post_init__(self):
        rules = []
        for rule in self.rules:
            if not (isinstance(rule, (tuple, list)) and len(rule) in (2, 3)):
                raise error("KeyMap", f"rule {rule!r} is not (regex, template[, kind])",
                            "write each rule as (regex, template) or (regex, template, kind)")
            pattern, template = rule[0], rule[1]
            kind = rule[2] if len(rule) == 3 else None
            try:
                re.compile(pattern)
            except re.error as e:
                raise error("KeyMap", f"rule regex {pattern!r} is invalid: {e}",
                            "correct the regex (re.escape literal text)") from None
            if kind is not None and kind not in KINDS:
                raise error("KeyMap", f"rule {rule!r}: kind {kind!r} is not one of {KINDS}",
                            "use one of those, or None to infer it from the path")
            rules.append((pattern, template, kind))
        object.__setattr__(self, "rules", tuple(rules))
        object.__setattr__(self, "ties", _check_ties(self.ties))

    def lookup(self, path: str) -> HFName | None:
        """The HF parameter of ``path``, or None when no rule matches."""
        for pattern, template, kind in self.rules:
            m = re.fullmatch(pattern, path)
            if m:
                name = m.expand(template).replace("/", ".")
                if kind is None:
                    kind = _LEAF_KIND.get(path.rsplit("/", 1)[-1], "vector")
                return HFName(self.prefix + name, kind)
        return None

    def tied_head(self, embedding: str) -> str | None:
        """The head parameter the model may tie to ``embedding`` (both prefixed), or None.

        Example:
          >>> KEY_MAPS["llama"].tied_head("model.embed_tokens.weight")
          'lm_head.weight'
        """
        for head, emb in self.ties:
            if self.prefix + emb == embedding:
                return self.prefix + head
        return None

    def with_prefix(self, prefix: str) -> KeyMap:
        """A copy with another ``prefix`` (``"bert."`` for ``BertForSequenceClassification``)."""
        return dataclasses.replace(self, prefix=prefix)


def _check_ties(ties) -> tuple:
    pairs = tuple(ties.items()) if isinstance(ties, Mapping) else ties
    if not isinstance(pairs, (tuple, list)) or not all(
            isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(n, str) for n in p)
            for p in pairs):
        raise error("KeyMap.ties", f"{ties!r} is not {{head parameter: embedding parameter}}",
                    "pass e.g. ties={'lm_head.weight': 'model.embed_tokens.weight'}",
                    kind=TypeError)
    return tuple((head, emb) for head, emb in pairs)


def _vec(pattern, template):
    return (pattern, template, "vector")


KEY_MAPS: dict[str, KeyMap] = {
    # examples/llama.py <-> transformers LlamaForCausalLM (GQA: narrower k/v_proj).
    "llama": KeyMap((
        (r"params/model/embed_tokens/embedding", "model.embed_tokens.weight", "embedding"),
        (r"params/model/layers_(\d+)/(self_attn|mlp)/(\w+_proj)/kernel",
         r"model.layers.\1.\2.\3.weight", "linear"),
        _vec(r"params/model/layers_(\d+)/(self_attn|mlp)/(\w+_proj)/bias",
             r"model.layers.\1.\2.\3.bias"),
        _vec(r"params/model/layers_(\d+)/(input_layernorm|post_attention_layernorm)/weight",
             r"model.layers.\1.\2.weight"),
        _vec(r"params/model/norm/weight", "model.norm.weight"),
        (r"params/lm_head/kernel", "lm_head.weight", "linear"),
    ), name="llama", ties={"lm_head.weight": "model.embed_tokens.weight"}),
    # examples/gpt2.py <-> transformers GPT2LMHeadModel (Conv1D: (in, out) weights).
    "gpt2": KeyMap((
        (r"params/(wte|wpe)/embedding", r"transformer.\1.weight", "embedding"),
        (r"params/h_(\d+)/(attn|mlp)/(c_attn|c_proj|c_fc)/kernel",
         r"transformer.h.\1.\2.\3.weight", "conv1d"),
        _vec(r"params/h_(\d+)/(attn|mlp)/(c_attn|c_proj|c_fc)/bias",
             r"transformer.h.\1.\2.\3.bias"),
        _vec(r"params/h_(\d+)/(ln_1|ln_2)/scale", r"transformer.h.\1.\2.weight"),
        _vec(r"params/h_(\d+)/(ln_1|ln_2)/bias", r"transformer.h.\1.\2.bias"),
        _vec(r"params/ln_f/scale", "transformer.ln_f.weight"),
        _vec(r"params/ln_f/bias", "transformer.ln_f.bias"),
    ), name="gpt2", ties={"lm_head.weight": "transformer.wte.weight"}),
    # examples/bert.py <-> transformers BertModel (use .with_prefix("bert.") for BertFor*).
    "bert": KeyMap((
        (r"params/embeddings/(word|position|token_type)_embeddings/embedding",
         r"embeddings.\1_embeddings.weight", "embedding"),
        _vec(r"params/embeddings/LayerNorm/scale", "embeddings.LayerNorm.weight"),
        _vec(r"params/embeddings/LayerNorm/bias", "embeddings.LayerNorm.bias"),
        _vec(r"params/encoder/layer_(\d+)/(.+)/LayerNorm/scale",
             r"encoder/layer/\1/\2/LayerNorm/weight"),
        (r"params/encoder/layer_(\d+)/(.+)/kernel", r"encoder/layer/\1/\2/weight", "linear"),
        _vec(r"params/encoder/layer_(\d+)/(.+)/bias", r"encoder/layer/\1/\2/bias"),
        (r"params/pooler/dense/kernel", "pooler.dense.weight", "linear"),
        _vec(r"params/pooler/dense/bias", "pooler.dense.bias"),
        (r"params/classifier/kernel", "classifier.weight", "linear"),
        _vec(r"params/classifier/bias", "classifier.bias"),
    ), name="bert"),
}
"""Key maps for the reference models: ``"llama"`` (examples/llama.py),
``"gpt2"`` (examples/gpt2.py) and ``"bert"`` (examples/bert.py, MiniLM)."""


def resolve_key_map(key_map, where: str = "key_map") -> KeyMap | Callable[[str], HFName | None]:
    """A preset name, a `KeyMap`, ``{regex: template}``, or ``path -> HFName | str | None``.

    Errors name ``where`` (the function taking ``key_map``).
    """
    if isinstance(key_map, KeyMap):
        return key_map
    if isinstance(key_map, str):
        if key_map not in KEY_MAPS:
            raise error(where, f"key_map={key_map!r} is not a preset; presets are "
                               f"{sorted(KEY_MAPS)}",
                        "pass one of those, or a lj.interop.KeyMap for your model's paths")
        return KEY_MAPS[key_map]
    if isinstance(key_map, Mapping):
        return KeyMap(tuple((p, t, None) for p, t in key_map.items()))
    if callable(key_map):
        def lookup(path, _f=key_map):
            out = _f(path)
            if out is None or isinstance(out, HFName):
                return out
            if isinstance(out, str):
                return HFName(out, _LEAF_KIND.get(path.rsplit("/", 1)[-1], "vector"))
            raise error(f"key_map({path!r})", f"returned {type(out).__name__}",
                        "return an HF parameter name (str), an HFName, or None",
                        kind=TypeError)
        return lookup
    raise error(where, f"key_map must be a preset name {sorted(KEY_MAPS)}, a KeyMap, a "
                       f"{{regex: template}} dict or a callable; got {type(key_map).__name__}",
                "e.g. key_map='llama', or lj.interop.KeyMap(rules)", kind=TypeError)


def lookup(key_map, path: str) -> HFName | None:
    return key_map.lookup(path) if isinstance(key_map, KeyMap) else key_map(path)


def tied_head(key_map, embedding: str) -> str | None:
    """The head parameter ``key_map`` says may be tied to ``embedding`` (None for
    callables and dicts, which declare no ties)."""
    return key_map.tied_head(embedding) if isinstance(key_map, KeyMap) else None


def layer_names(hf: HFName, path: str, shape) -> list[str]:
    """The torch names of a leaf: ``[hf.name]``, or one per layer of its leading
    (stacked) axis when the template has ``{i}``.

    Example:
      >>> layer_names(HFName("model.layers.{i}.mlp.up_proj.weight", "linear"),
      ...             "params/layers/up/kernel", (2, 16, 32))
      ['model.layers.0.mlp.up_proj.weight', 'model.layers.1.mlp.up_proj.weight']
    """
    if "{i}" not in hf.name:
        return [hf.name]
    if len(shape) == 0:
        raise error(path, f"the key map gives {hf.name!r} with '{{i}}' but the leaf is a "
                          f"scalar, with no stacked axis",
                    "drop '{i}' from that rule")
    return [hf.name.replace("{i}", str(i)) for i in range(shape[0])]


def to_torch_layout(value: np.ndarray, kind: str, name: str) -> np.ndarray:
    if kind == "linear":
        if value.ndim != 2:
            raise error(name, f"a 'linear' weight must be 2-D, got shape {value.shape}",
                        "give this leaf another kind in the key map, or '{i}' in its "
                        "template for a stacked (nn.scan) leaf")
        return np.ascontiguousarray(value.T)
    if kind == "experts":
        if value.ndim != 3:
            raise error(name, f"an 'experts' weight must be 3-D (E, in, out), got shape "
                              f"{value.shape}", "give this leaf another kind in the key map")
        return np.ascontiguousarray(np.swapaxes(value, 1, 2))
    return np.ascontiguousarray(value)


def from_torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "experts":
        return np.ascontiguousarray(np.swapaxes(value, 1, 2))
    return np.ascontiguousarray(value.T) if kind == "linear" else value


def to_hf_state_dict(params, key_map, *, strict: bool = True) -> dict[str, np.ndarray]:
    """Params as a Hugging Face state dict: name -> numpy array (torch layout).

    A leaf whose template has ``{i}`` is stacked (``nn.scan``): its leading
    axis is the layer, and layer ``i`` becomes its own entry.

    Args:
      params: the params tree.
      key_map: a preset name (``"llama"``, ``"gpt2"``, ``"bert"``) or a `KeyMap`.
      strict: raise for leaves the key map doesn't cover (else skip them).

    Example:
      >>> import numpy as np
      >>> params = {"params": {"lm_head": {"kernel": np.ones((4, 10), np.float32)}}}
      >>> to_hf_state_dict(params, "llama")["lm_head.weight"].shape
      (10, 4)
      >>> stacked = {"params": {"layers": {"up": {"kernel": np.ones((3, 4, 8), np.float32)}}}}
      >>> km = KeyMap(((r"params/layers/(\\w+)/kernel", r"model.layers.{i}.mlp.\\1_proj.weight",
      ...               "linear"),))
      >>> sd = to_hf_state_dict(stacked, km)   # layer i -> model.layers.i....
      >>> len(sd), sd["model.layers.2.mlp.up_proj.weight"].shape
      (3, (8, 4))
    """
    km = resolve_key_map(key_map, "lj.interop.to_hf_state_dict")
    out, unmapped = {}, []
    for path, leaf in leaves_with_paths(params):
        hf = lookup(km, path)
        if hf is None:
            unmapped.append(path)
            continue
        # a quantized weight is written as the dense weight it stands for
        value = np.asarray(leaf.dequantize() if is_container(leaf) else leaf)
        names = layer_names(hf, path, value.shape)
        layers = list(value) if "{i}" in hf.name else [value]
        for name, layer in zip(names, layers, strict=True):
            out[name] = to_torch_layout(layer, hf.kind, path)
    if unmapped and strict:
        more = f" and {len(unmapped) - 6} more" if len(unmapped) > 6 else ""
        raise error("lj.interop.to_hf_state_dict",
                    f"the key map has no rule for {unmapped[:6]}{more}",
                    "add rules for them, or pass strict=False to leave them out")
    return out


def from_hf_state_dict(state: Mapping[str, Any], like, key_map, *, strict: bool = True):
    """Params in the structure of ``like`` from a Hugging Face state dict.

    Each leaf of ``like`` (arrays or ``jax.ShapeDtypeStruct``) is looked up
    by its HF name, put into Flax layout, shape-checked and cast to the
    leaf's dtype. A leaf whose template has ``{i}`` gathers layers
    ``0 .. n-1`` (``n`` = its leading axis) and stacks them.

    Args:
      state: HF name -> array (numpy, or torch tensors' ``.numpy()``).
      like: the skeleton, e.g. ``jax.eval_shape(model.init, key, x)``.
      key_map: a preset name or a `KeyMap`.
      strict: raise on state entries no leaf uses.

    Example:
      >>> import jax, numpy as np
      >>> like = {"params": {"lm_head": {"kernel": jax.ShapeDtypeStruct((4, 10), np.float32)}}}
      >>> p = from_hf_state_dict({"lm_head.weight": np.zeros((10, 4))}, like, "llama")
      >>> p["params"]["lm_head"]["kernel"].shape
      (4, 10)
    """
    where = "lj.interop.from_hf_state_dict"
    km = resolve_key_map(key_map, where)
    leaves, missing, used = [], [], set()
    for path, want in leaves_with_paths(like):
        hf = lookup(km, path)
        if hf is None:
            raise error(where, f"the key map has no rule for {path}",
                        "add one (lj.interop.KeyMap)")
        names = layer_names(hf, path, want.shape)
        absent = [n for n in names if n not in state]
        if absent:
            missing += absent
            leaves.append(None)
            continue
        used.update(names)
        layers = [from_torch_layout(np.asarray(state[n]), hf.kind) for n in names]
        value = np.stack(layers) if "{i}" in hf.name else layers[0]
        if tuple(value.shape) != tuple(want.shape):
            shown = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} (stacked)"
            raise error(where, f"{shown} -> {path}: shape {tuple(value.shape)} (Flax "
                               f"layout) != expected {tuple(want.shape)}",
                        "build the model with the checkpoint's dimensions")
        if is_container(want):   # a quantized skeleton: quantize like it
            leaves.append(want.requantize(jnp.asarray(value, want.dtype)))
        else:
            leaves.append(jnp.asarray(value, want.dtype))
    if missing:
        raise error(where, f"{len(missing)} weights missing, e.g. {missing[:4]}; the state "
                           f"dict has e.g. {sorted(state)[:4]}",
                    "check the model dimensions and the key map's prefix")
    unused = sorted(set(state) - used)
    if unused and strict:
        raise error(where, f"{len(unused)} entries are not used by the model, e.g. "
                           f"{unused[:4]}",
                    "pass strict=False to ignore them")
    return unflatten_params(like, leaves)
