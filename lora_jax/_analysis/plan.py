"""Planning a run before it starts: `plan` and architecture shape presets.

`plan` counts what a LoRA run holds in memory (trainable weights, their
gradients and optimizer state, the frozen base) and on disk (one base plus
N adapters), next to full fine-tuning. It reads only shapes and dtypes, so
it takes an abstract tree (``jax.eval_shape`` output or `preset`) and a 7B
model never gets allocated. Activations are not counted: they depend on
batch, sequence length and remat policy, not on the adapter.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._core.config import LoraConfig
from lora_jax._core.errors import error
from lora_jax._core.fmt import fmt_bytes, table
from lora_jax._core.leaf import is_container
from lora_jax._core.paths import leaves_with_paths, resolve

__all__ = ["plan", "Plan", "preset", "PRESETS", "OPTIMIZER_STATES", "BITS_PER_PARAM"]

OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "lion": 1, "momentum": 1, "sgd": 0}
"""State tensors per trainable parameter, by optimizer name (Adam: m and v)."""

BITS_PER_PARAM = {"float32": 32.0, "bfloat16": 16.0, "float16": 16.0, "int8": 8.0,
                  "nf4": 4.127}
"""Storage bits per parameter. NF4 is QLoRA's: 4 bits plus a block-of-64 fp8
absmax with double quantization (8/64 + 32/(64*256) = 0.127 bits)."""

_ALIASES = {"f32": "float32", "fp32": "float32", "bf16": "bfloat16", "f16": "float16",
            "fp16": "float16", "half": "float16"}


def _dtype_name(dtype, what: str, fix: str | None = None) -> str:
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype.lower(), dtype.lower())
    else:
        try:
            name = jnp.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in BITS_PER_PARAM:
        raise error("lj.plan", f"{what}={dtype!r} is not one of {sorted(BITS_PER_PARAM)}",
                    fix or f"e.g. {what}='bfloat16' (or 'nf4' / 'int8' for a quantized base)")
    return name


def _nbytes(n: int, dtype: str) -> int:
    return int(math.ceil(n * BITS_PER_PARAM[dtype] / 8))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Parameter and byte counts of a LoRA run next to full fine-tuning.

    Bytes are exact counts of parameter storage (NF4 at 4.127 bits/param);
    activations are not included. "Full fine-tuning" trains every parameter
    in ``adapter_dtype`` with the same optimizer.
    """

    name: str
    n_params: int            # all parameters of the base
    n_targets: int           # adapted leaves
    lora_params: int         # a + b
    trained_params: int      # leaves trained fully (LoraConfig.train)
    optimizer: str
    states_per_param: int
    base_dtype: str          # "mixed" when the tree's leaves differ and none was given
    adapter_dtype: str
    frozen_bytes: int        # the base, as stored for training
    adapter_bytes: int       # trainable weights
    gradient_bytes: int
    optimizer_bytes: int
    full_weight_bytes: int
    full_gradient_bytes: int
    full_optimizer_bytes: int
    rows: tuple              # (path, shape, rank, adapter params)

    @property
    def trainable(self) -> int:
        """LoRA factors plus fully-trained leaves."""
        return self.lora_params + self.trained_params

    @property
    def reduction(self) -> float:
        """How many times fewer trainable parameters than full fine-tuning."""
        return self.n_params / max(self.trainable, 1)

    @property
    def total_bytes(self) -> int:
        """Frozen base + trainable weights + gradients + optimizer state."""
        return self.frozen_bytes + self.adapter_bytes + self.gradient_bytes + \
            self.optimizer_bytes

    @property
    def full_total_bytes(self) -> int:
        return self.full_weight_bytes + self.full_gradient_bytes + self.full_optimizer_bytes

    def storage(self, n_adapters: int) -> tuple[int, int]:
        """``(one base + n adapters, n full copies)`` in bytes, the base in its format.

        Example:
          >>> import jax, jax.numpy as jnp, lora_jax as lj
          >>> p = lj.plan({"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float16)},
          ...             lj.LoraConfig(rank=8, targets="w"), adapter_dtype="float16")
          >>> p.storage(50)   # 33.5 MB + 50 x 131 kB vs 50 x 33.5 MB
          (40108032, 1677721600)
        """
        if isinstance(n_adapters, bool) or not isinstance(n_adapters, (int, np.integer)) \
                or n_adapters < 1:
            raise error("Plan.storage", f"n_adapters={n_adapters!r} must be a positive int",
                        "e.g. n_adapters=50")
        return (self.frozen_bytes + n_adapters * self.adapter_bytes,
                n_adapters * self.frozen_bytes)

    def table(self, *, n_adapters: int = 50) -> str:
        """The plan as a table, with storage for ``n_adapters`` tasks."""
        lora_disk, full_disk = self.storage(n_adapters)
        b = lambda n: f"{fmt_bytes(n)}"  # noqa: E731
        ranks = sorted({r for _, _, r, _ in self.rows})
        head = (f"{self.name}: {self.n_params:,} parameters, {self.n_targets} targets "
                f"(rank {', '.join(map(str, ranks))}), {self.optimizer} "
                f"({self.states_per_param} state(s)/param), base {self.base_dtype}, "
                f"trainable {self.adapter_dtype}")
        rows = [
            ["trainable parameters", f"{self.trainable:,}", f"{self.n_params:,}"],
            ["  (fewer than full)", f"{self.reduction:,.0f}x", "1x"],
            ["trainable weights", b(self.adapter_bytes), b(self.full_weight_bytes)],
            ["gradients", b(self.gradient_bytes), b(self.full_gradient_bytes)],
            ["optimizer state", b(self.optimizer_bytes), b(self.full_optimizer_bytes)],
            ["frozen base", b(self.frozen_bytes), "-"],
            ["total (no activations)", b(self.total_bytes), b(self.full_total_bytes)],
            [f"storage, {n_adapters} tasks", b(lora_disk), b(full_disk)],
        ]
        return head + "\n" + table(["", "LoRA", "full fine-tuning"], rows, "<>>")

    def __str__(self) -> str:
        return self.table()

    __repr__ = __str__


def plan(shapes_or_params, config: LoraConfig, *, optimizer: str | int = "adamw",
         base_dtype=None, adapter_dtype=None, name: str | None = None) -> Plan:
    """What a LoRA run costs in parameters and bytes, before allocating anything.

    Args:
      shapes_or_params: the model's parameters: a pytree of arrays or of
        ``jax.ShapeDtypeStruct`` (``jax.eval_shape(model.init, ...)``), or a
        preset name (see `preset`: ``"gpt2"``, ``"bert-base"``, ``"llama-7b"``).
      config: the `LoraConfig` (targets, ranks; fully-trained leaves count as
        trainable).
      optimizer: ``"adamw"``/``"adam"`` (2 states per parameter), ``"lion"``,
        ``"momentum"`` (1), ``"sgd"`` (0), or a number of states.
      base_dtype: how the frozen base is held: ``"float32"``, ``"bfloat16"``,
        ``"float16"``, ``"int8"`` or ``"nf4"``; default: the tree's dtypes.
      adapter_dtype: dtype of trainable weights, their gradients and optimizer
        state (optax keeps state in the parameter dtype); default
        ``config.dtype``.
      name: a label for the table.

    Returns:
      A `Plan`; ``str`` is a table (storage shown for 50 tasks; see
      `Plan.storage` for other counts).

    Example:
      >>> import lora_jax as lj
      >>> cfg = lj.LoraConfig(rank=8, targets=r".*/(q_proj|v_proj)/kernel")
      >>> p = lj.plan("llama-7b", cfg, adapter_dtype="float16")
      >>> p.trainable, p.adapter_bytes, p.n_params
      (4194304, 8388608, 6738415616)
      >>> print(p)  # doctest: +NORMALIZE_WHITESPACE
      llama-7b: 6,738,415,616 parameters, 64 targets (rank 8), adamw (2 state(s)/param),
      base float16, trainable float16
                              LoRA       full fine-tuning
      ----------------------  ---------  ----------------
      trainable parameters    4,194,304     6,738,415,616
        (fewer than full)        1,607x                1x
      trainable weights          8.4 MB           13.5 GB
      gradients                  8.4 MB           13.5 GB
      optimizer state           16.8 MB           27.0 GB
      frozen base               13.5 GB                 -
      total (no activations)    13.5 GB           53.9 GB
      storage, 50 tasks         13.9 GB          673.8 GB
    """
    if isinstance(shapes_or_params, str):
        name = name or shapes_or_params
        shapes_or_params = preset(shapes_or_params)
    if isinstance(optimizer, str):
        if optimizer.lower() not in OPTIMIZER_STATES:
            raise error("lj.plan", f"optimizer={optimizer!r} is unknown; known: "
                        f"{sorted(OPTIMIZER_STATES)}",
                        "pick one, or pass the number of state tensors per parameter, e.g. "
                        "optimizer=2")
        opt_name, states = optimizer.lower(), OPTIMIZER_STATES[optimizer.lower()]
    elif isinstance(optimizer, (int, np.integer)) and not isinstance(optimizer, bool) \
            and optimizer >= 0:
        opt_name, states = f"{int(optimizer)}-state optimizer", int(optimizer)
    else:
        raise error("lj.plan", f"optimizer={optimizer!r} must be a name "
                    f"({sorted(OPTIMIZER_STATES)}) or an int >= 0",
                    "e.g. optimizer='adamw', or optimizer=2 (state tensors per parameter)")
    adapter_dtype = _dtype_name(config.dtype if adapter_dtype is None else adapter_dtype,
                                "adapter_dtype")
    if adapter_dtype in ("int8", "nf4"):
        raise error("lj.plan", f"adapter_dtype={adapter_dtype!r}: trainable weights must be "
                    f"floating point", "adapter_dtype='float32' or 'bfloat16'")

    resolved = resolve(shapes_or_params, config)
    leaves = [(p, x) for p, x in leaves_with_paths(shapes_or_params) if hasattr(x, "shape")]
    sizes = {p: math.prod(x.shape) for p, x in leaves}
    n_params = sum(sizes.values())
    if base_dtype is None:
        # a quantized leaf counts as stored (codes and scales), named by its method
        names = {x.method if is_container(x) else np.dtype(x.dtype).name for _, x in leaves}
        for n in names:
            _dtype_name(n, "a params leaf dtype",
                        "pass base_dtype= to count the base in one of these formats, e.g. "
                        "base_dtype='bfloat16'")
        frozen = sum(x.nbytes if is_container(x) else
                     math.prod(x.shape) * np.dtype(x.dtype).itemsize for _, x in leaves)
        base_name = names.pop() if len(names) == 1 else "mixed"
    else:
        base_name = _dtype_name(base_dtype, "base_dtype")
        frozen = _nbytes(n_params, base_name)

    rows = tuple((s.path, s.shape, s.rank, s.n_adapter_params)
                 for s in resolved.targets.values())
    lora = sum(r[3] for r in rows)
    trained = sum(sizes[p] for p in resolved.train)
    trainable = lora + trained
    return Plan(
        name=name or "model", n_params=n_params, n_targets=len(rows), lora_params=lora,
        trained_params=trained, optimizer=opt_name, states_per_param=states,
        base_dtype=base_name, adapter_dtype=adapter_dtype, frozen_bytes=frozen,
        adapter_bytes=_nbytes(trainable, adapter_dtype),
        gradient_bytes=_nbytes(trainable, adapter_dtype),
        optimizer_bytes=states * _nbytes(trainable, adapter_dtype),
        full_weight_bytes=_nbytes(n_params, adapter_dtype),
        full_gradient_bytes=_nbytes(n_params, adapter_dtype),
        full_optimizer_bytes=states * _nbytes(n_params, adapter_dtype),
        rows=rows)


# ----------------------------------------------------------------------------- presets


def _s(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _gpt2(dtype):
    # transformers' FlaxGPT2LMHeadModel (124M; the LM head is tied to wte).
    d, v, ctx, n = 768, 50257, 1024, 12
    ln = lambda: {"scale": _s((d,), dtype), "bias": _s((d,), dtype)}  # noqa: E731
    dense = lambda i, o: {"kernel": _s((i, o), dtype), "bias": _s((o,), dtype)}  # noqa: E731
    block = lambda: {"ln_1": ln(), "ln_2": ln(),  # noqa: E731
                     "attn": {"c_attn": dense(d, 3 * d), "c_proj": dense(d, d)},
                     "mlp": {"c_fc": dense(d, 4 * d), "c_proj": dense(4 * d, d)}}
    return {"transformer": {"wte": {"embedding": _s((v, d), dtype)},
                            "wpe": {"embedding": _s((ctx, d), dtype)},
                            "h": {str(i): block() for i in range(n)}, "ln_f": ln()}}


def _bert_base(dtype):
    # transformers' FlaxBertModel, bert-base-uncased (110M, with the pooler).
    d, v, ctx, n, mlp = 768, 30522, 512, 12, 3072
    ln = lambda: {"scale": _s((d,), dtype), "bias": _s((d,), dtype)}  # noqa: E731
    dense = lambda i, o: {"kernel": _s((i, o), dtype), "bias": _s((o,), dtype)}  # noqa: E731
    layer = lambda: {  # noqa: E731
        "attention": {"self": {"query": dense(d, d), "key": dense(d, d), "value": dense(d, d)},
                      "output": {"dense": dense(d, d), "LayerNorm": ln()}},
        "intermediate": {"dense": dense(d, mlp)},
        "output": {"dense": dense(mlp, d), "LayerNorm": ln()}}
    return {"embeddings": {"word_embeddings": {"embedding": _s((v, d), dtype)},
                           "position_embeddings": {"embedding": _s((ctx, d), dtype)},
                           "token_type_embeddings": {"embedding": _s((2, d), dtype)},
                           "LayerNorm": ln()},
            "encoder": {"layer": {str(i): layer() for i in range(n)}},
            "pooler": {"dense": dense(d, d)}}


def _llama_7b(dtype):
    # transformers' FlaxLlamaForCausalLM for Llama-2-7B: 32 layers, hidden 4096,
    # intermediate 11008, vocab 32000, untied head; kernels are (in, out).
    d, v, n, mlp = 4096, 32000, 32, 11008
    k = lambda i, o: {"kernel": _s((i, o), dtype)}  # noqa: E731
    layer = lambda: {  # noqa: E731
        "self_attn": {"q_proj": k(d, d), "k_proj": k(d, d), "v_proj": k(d, d),
                      "o_proj": k(d, d)},
        "mlp": {"gate_proj": k(d, mlp), "up_proj": k(d, mlp), "down_proj": k(mlp, d)},
        "input_layernorm": {"weight": _s((d,), dtype)},
        "post_attention_layernorm": {"weight": _s((d,), dtype)}}
    return {"model": {"embed_tokens": {"embedding": _s((v, d), dtype)},
                      "layers": {str(i): layer() for i in range(n)},
                      "norm": {"weight": _s((d,), dtype)}},
            "lm_head": k(d, v)}


_PRESETS = {"gpt2": (_gpt2, "float32"), "bert-base": (_bert_base, "float32"),
            "llama-7b": (_llama_7b, "float16")}
PRESETS = tuple(_PRESETS)
"""Names accepted by `preset` and `plan`."""


def preset(name: str, *, dtype=None):
    """An abstract params tree (``jax.ShapeDtypeStruct`` leaves) of a public model.

    Paths and ``(in, out)`` kernel shapes follow the transformers Flax
    implementations: ``"gpt2"`` (GPT-2 small, 124,439,808 params, float32),
    ``"bert-base"`` (bert-base-uncased with pooler, 109,482,240, float32),
    ``"llama-7b"`` (Llama-2-7B, 6,738,415,616, float16).

    Args:
      name: one of `PRESETS`.
      dtype: override the leaves' dtype (default: the released checkpoint's).

    Example:
      >>> import jax, math, lora_jax as lj
      >>> tree = lj.preset("llama-7b")
      >>> tree["model"]["layers"]["0"]["mlp"]["gate_proj"]["kernel"]
      ShapeDtypeStruct(shape=(4096, 11008), dtype=float16)
      >>> sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
      6738415616
    """
    if name not in _PRESETS:
        raise error("lj.preset", f"unknown preset {name!r}; known presets: {list(PRESETS)}",
                    "use one of them, or pass jax.eval_shape(model.init, ...) to plan")
    build, default = _PRESETS[name]
    return build(default if dtype is None else dtype)


# ----------------------------------------------------------------------------- CLI


def targets_regex(names: str) -> str:
    """A targets regex from a comma-separated list of module names.

    Bare names match that module's ``kernel`` or ``weight``; anything with a
    ``/`` or regex syntax is used as a regex as is.

    Example:
      >>> targets_regex("q_proj,v_proj")
      '.*/(q_proj|v_proj)/(kernel|weight)'
    """
    parts = [p.strip() for p in names.split(",") if p.strip()]
    if not parts:
        raise error("python -m lora_jax plan", "--targets is empty",
                    "e.g. --targets q_proj,v_proj")
    if any(re.search(r"[/\\.*+?()\[\]|^$]", p) for p in parts):
        return "|".join(f"(?:{p})" for p in parts) if len(parts) > 1 else parts[0]
    return f".*/({'|'.join(parts)})/(kernel|weight)"


def add_plan_command(subparsers) -> None:
    """Registers ``plan`` on an argparse subparsers object (see ``__main__``)."""
    p = subparsers.add_parser(
        "plan", help="memory and storage of a LoRA run vs full fine-tuning",
        description="Count trainable parameters, memory and storage of a LoRA run on a "
                    "preset architecture, next to full fine-tuning. Nothing is allocated.")
    p.add_argument("--preset", required=True, choices=PRESETS)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None,
                   help="does not change the counts (default: the rank)")
    p.add_argument("--targets", default="q_proj,v_proj",
                   help="comma-separated module names (q_proj,v_proj) or a regex")
    p.add_argument("--optimizer", default="adamw", help=f"one of {sorted(OPTIMIZER_STATES)}")
    p.add_argument("--base-dtype", default=None, help=f"one of {sorted(BITS_PER_PARAM)}")
    p.add_argument("--adapter-dtype", default="float32",
                   help="trainable weights, gradients and optimizer state")
    p.add_argument("--n-adapters", type=int, default=50, help="tasks for the storage row")
    p.set_defaults(func=run_plan_command)


def run_plan_command(args) -> int:
    """Runs ``python -m lora_jax plan`` from parsed arguments; prints the table."""
    config = LoraConfig(rank=args.rank, alpha=args.alpha or args.rank,
                        targets=targets_regex(args.targets))
    p = plan(args.preset, config, optimizer=args.optimizer, base_dtype=args.base_dtype,
             adapter_dtype=args.adapter_dtype)
    print(p.table(n_adapters=args.n_adapters))
    return 0
