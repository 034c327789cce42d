"""A PyTorch twin of the reference decoder (examples/gpt.py), for PEFT comparisons.

Same math as `examples.gpt.GPT` (pre-LayerNorm blocks with eps 1e-6, tanh
GELU as ``jax.nn.gelu``, causal softmax attention in float32 with -1e9
masking, learned positions, untied output head) and module names that
mirror the Flax paths, so PEFT's ``target_modules=["q", "k", "v", "o",
"fc1", "fc2"]`` hits the same projections as `examples.gpt.TARGETS`::

    wte.weight                         params/wte/embedding
    wpe                                params/wpe
    blocks.{i}.attn.{q,k,v,o}.weight   params/block_{i}/attn/{q,k,v,o}/kernel (transposed)
    blocks.{i}.mlp.{fc1,fc2}.weight    params/block_{i}/mlp/{fc1,fc2}/kernel (transposed)
    blocks.{i}.ln{1,2}.weight, bias    params/block_{i}/ln{1,2}/scale, bias
    ln_f.weight, bias                  params/ln_f/scale, bias
    lm_head.weight                     params/lm_head/kernel (transposed)

`from_flat` builds the model from a flat ``{linen path: array}`` dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["TorchGPT", "from_flat", "torch_path", "loss_fn"]


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.n_heads = n_heads

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.n_heads
        q = self.q(x).view(b, t, self.n_heads, hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.n_heads, hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_heads, hd).transpose(1, 2)
        s = (q @ k.transpose(-1, -2)) / np.float32(math.sqrt(hd))
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        s = s.float().masked_fill(~mask, -1e9)
        p = torch.softmax(s, dim=-1).to(v.dtype)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int, d_mlp: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d_mlp), nn.Linear(d_mlp, d)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn, self.mlp = Attention(d, n_heads), MLP(d, d_mlp)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchGPT(nn.Module):
    """``logits = TorchGPT(...)(tokens)``, the twin of `examples.gpt.GPT` (untied)."""

    def __init__(self, *, vocab: int, d_model: int, n_heads: int, n_layers: int, d_mlp: int,
                 max_len: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Parameter(torch.zeros(max_len, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_mlp) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, eps=1e-6)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens):
        x = self.wte(tokens) + self.wpe[: tokens.shape[1]][None]
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def torch_path(linen_path: str) -> tuple[str, bool]:
    """``(torch state-dict name, transpose?)`` of a Linen parameter path.

    Example:
      >>> torch_path("params/block_2/attn/q/kernel")
      ('blocks.2.attn.q.weight', True)
      >>> torch_path("params/ln_f/scale")
      ('ln_f.weight', False)
    """
    parts = linen_path.split("/")
    if parts[0] == "params":
        parts = parts[1:]
    if parts[0].startswith("block_"):
        parts = ["blocks", parts[0][len("block_"):]] + parts[1:]
    leaf = parts[-1]
    if parts == ["wte", "embedding"]:
        return "wte.weight", False
    if parts == ["wpe"]:
        return "wpe", False
    name = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join(parts[:-1] + [name]), leaf == "kernel"


def from_flat(flat: Mapping[str, np.ndarray], *, n_heads: int) -> TorchGPT:
    """The torch twin holding the weights of a flat ``{linen path: array}`` dict.

    Every state-dict entry must be filled, with its shape checked.
    """
    emb = flat["params/wte/embedding"]
    n_layers = 1 + max(int(k.split("/")[1][len("block_"):]) for k in flat
                       if k.startswith("params/block_"))
    model = TorchGPT(vocab=emb.shape[0], d_model=emb.shape[1], n_heads=n_heads,
                     n_layers=n_layers, d_mlp=flat["params/block_0/mlp/fc1/kernel"].shape[1],
                     max_len=flat["params/wpe"].shape[0])
    state = model.state_dict()
    new = {}
    for path, value in flat.items():
        name, transpose = torch_path(path)
        if name not in state:
            raise ValueError(f"{path}: no torch parameter {name!r} in the twin.")
        value = np.asarray(value, np.float32)
        value = value.T if transpose else value
        if tuple(value.shape) != tuple(state[name].shape):
            raise ValueError(f"{path} -> {name}: shape {value.shape} != {tuple(state[name].shape)}")
        new[name] = torch.from_numpy(np.ascontiguousarray(value))
    missing = set(state) - set(new)
    if missing:
        raise ValueError(f"torch parameters not filled from the flat dict: {sorted(missing)}")
    model.load_state_dict(new)
    return model


def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, as `examples.gpt.loss_fn`."""
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                       tokens[:, 1:].reshape(-1))
