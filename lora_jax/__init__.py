"""lora_jax: LoRA as a pure transformation over JAX parameter pytrees.

>>> import jax, jax.numpy as jnp, lora_jax as lj
>>> params = {"dense": {"kernel": jnp.ones((16, 16))}}
>>> config = lj.LoraConfig(rank=4, alpha=8, targets=r".*/kernel")
>>> adapters = lj.init(params, config, key=jax.random.key(0))
>>> lj.summary(params, adapters).trainable
128
"""

from importlib import metadata as _metadata

from lora_jax import interop as interop
from lora_jax._adalora import AdaLoraState as AdaLoraState
from lora_jax._adalora import adalora as adalora
from lora_jax._adalora import adalora_init as adalora_init
from lora_jax._adalora import adalora_orthogonality as adalora_orthogonality
from lora_jax._adalora import adalora_ranks as adalora_ranks
from lora_jax._adalora import adalora_to_lora as adalora_to_lora
from lora_jax._adalora import adalora_view as adalora_view
from lora_jax._analysis.analyze import Truncation as Truncation
from lora_jax._analysis.analyze import analyze as analyze
from lora_jax._analysis.analyze import truncate as truncate
from lora_jax._analysis.extract import Extraction as Extraction
from lora_jax._analysis.extract import extract as extract
from lora_jax._analysis.plan import PRESETS as PRESETS
from lora_jax._analysis.plan import Plan as Plan
from lora_jax._analysis.plan import plan as plan
from lora_jax._analysis.plan import preset as preset
from lora_jax._analysis.spectrum import Analysis as Analysis
from lora_jax._analysis.spectrum import Spectrum as Spectrum
from lora_jax._apply.configure import LayoutReport as LayoutReport
from lora_jax._apply.configure import configure as configure
from lora_jax._apply.configure import infer_layouts as infer_layouts
from lora_jax._apply.interp import StrictError as StrictError
from lora_jax._apply.transform import Explanation as Explanation
from lora_jax._apply.transform import apply as apply
from lora_jax._apply.transform import explain as explain
from lora_jax._checkpoint.api import checkpoint_info as checkpoint_info
from lora_jax._checkpoint.api import inspect as inspect
from lora_jax._checkpoint.api import restore as restore
from lora_jax._checkpoint.api import restore_state as restore_state
from lora_jax._checkpoint.api import save as save
from lora_jax._checkpoint.checkpointer import Checkpointer as Checkpointer
from lora_jax._checkpoint.checkpointer import TrainState as TrainState
from lora_jax._checkpoint.fingerprint import BaseMismatchError as BaseMismatchError
from lora_jax._checkpoint.fingerprint import base_fingerprint as base_fingerprint
from lora_jax._checkpoint.fingerprint import check_base as check_base
from lora_jax._checkpoint.info import CheckpointInfo as CheckpointInfo
from lora_jax._checkpoint.record import CheckpointError as CheckpointError
from lora_jax._core.config import INITS as INITS
from lora_jax._core.config import Layout as Layout
from lora_jax._core.config import LoraConfig as LoraConfig
from lora_jax._core.config import LoraWarning as LoraWarning
from lora_jax._core.leaf import LeafContainer as LeafContainer
from lora_jax._core.paths import LeafSpec as LeafSpec
from lora_jax._core.paths import path_str as path_str
from lora_jax._core.weights import AdaLoraWeights as AdaLoraWeights
from lora_jax._core.weights import LoraWeights as LoraWeights
from lora_jax._core.weights import is_adalora as is_adalora
from lora_jax._core.weights import is_lora as is_lora
from lora_jax._init import init as init
from lora_jax._init import subtract_init as subtract_init
from lora_jax._merge import delta as delta
from lora_jax._merge import merge as merge
from lora_jax._merge import unmerge as unmerge
from lora_jax._multi.combine import Combination as Combination
from lora_jax._multi.combine import combine as combine
from lora_jax._multi.combine import merge_weighted as merge_weighted
from lora_jax._multi.io import restore_set as restore_set
from lora_jax._multi.io import save_set as save_set
from lora_jax._multi.mixed import apply_mixed as apply_mixed
from lora_jax._multi.mixture import Router as Router
from lora_jax._multi.mixture import apply_mixture as apply_mixture
from lora_jax._multi.mixture import init_router as init_router
from lora_jax._multi.set import BASE as BASE
from lora_jax._multi.set import AdapterSet as AdapterSet
from lora_jax._multi.set import Member as Member
from lora_jax._multi.set import adapter_ids as adapter_ids
from lora_jax._multi.set import adapter_set as adapter_set
from lora_jax._multi.set import add_adapter as add_adapter
from lora_jax._multi.set import remove_adapter as remove_adapter
from lora_jax._multi.set import select_adapter as select_adapter
from lora_jax._multi.train import make_mixed_train_step as make_mixed_train_step
from lora_jax._multi.train import mixed_opt_state as mixed_opt_state
from lora_jax._multi.train import reset_opt_state as reset_opt_state
from lora_jax._optim import make_train_step as make_train_step
from lora_jax._optim import optimizer as optimizer
from lora_jax._optim import trainable_labels as trainable_labels
from lora_jax._report import Description as Description
from lora_jax._report import Summary as Summary
from lora_jax._report import describe as describe
from lora_jax._report import summary as summary
from lora_jax._shard.rules import adapter_shardings as adapter_shardings
from lora_jax._shard.rules import opt_state_shardings as opt_state_shardings
from lora_jax._shard.rules import param_shardings as param_shardings
from lora_jax._shard.step import TrainShardings as TrainShardings
from lora_jax._shard.step import make_sharded_train_step as make_sharded_train_step
from lora_jax._shard.step import shard_train_state as shard_train_state
from lora_jax._shard.step import train_shardings as train_shardings
from lora_jax._variants.dora import dora_norms as dora_norms
from lora_jax._variants.loftq import loftq_report as loftq_report
from lora_jax._variants.quantize import Int8Weight as Int8Weight
from lora_jax._variants.quantize import NF4Weight as NF4Weight
from lora_jax._variants.quantize import dequantize as dequantize
from lora_jax._variants.quantize import is_quantized as is_quantized
from lora_jax._variants.quantize import nf4_levels as nf4_levels
from lora_jax._variants.quantize import quantize as quantize
from lora_jax.interop.peft import export_peft as export_peft
from lora_jax.interop.peft import export_peft_adalora as export_peft_adalora
from lora_jax.interop.peft import import_peft as import_peft
from lora_jax.interop.peft import import_peft_adalora as import_peft_adalora

try:
    __version__ = _metadata.version("lora-jax")
except _metadata.PackageNotFoundError:   # a source tree on sys.path, not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "adalora",
    "adalora_init",
    "adalora_orthogonality",
    "adalora_ranks",
    "adalora_to_lora",
    "adalora_view",
    "AdaLoraState",
    "AdaLoraWeights",
    "adapter_ids",
    "adapter_set",
    "adapter_shardings",
    "AdapterSet",
    "add_adapter",
    "Analysis",
    "analyze",
    "apply",
    "apply_mixed",
    "apply_mixture",
    "BASE",
    "base_fingerprint",
    "BaseMismatchError",
    "check_base",
    "checkpoint_info",
    "Checkpointer",
    "CheckpointError",
    "CheckpointInfo",
    "Combination",
    "combine",
    "configure",
    "delta",
    "dequantize",
    "describe",
    "Description",
    "dora_norms",
    "explain",
    "Explanation",
    "export_peft",
    "export_peft_adalora",
    "extract",
    "Extraction",
    "import_peft",
    "import_peft_adalora",
    "infer_layouts",
    "init",
    "init_router",
    "INITS",
    "inspect",
    "Int8Weight",
    "interop",
    "is_adalora",
    "is_lora",
    "is_quantized",
    "Layout",
    "LayoutReport",
    "LeafContainer",
    "LeafSpec",
    "loftq_report",
    "LoraConfig",
    "LoraWarning",
    "LoraWeights",
    "make_mixed_train_step",
    "make_sharded_train_step",
    "make_train_step",
    "Member",
    "merge",
    "merge_weighted",
    "mixed_opt_state",
    "nf4_levels",
    "NF4Weight",
    "opt_state_shardings",
    "optimizer",
    "param_shardings",
    "path_str",
    "plan",
    "Plan",
    "preset",
    "PRESETS",
    "quantize",
    "remove_adapter",
    "reset_opt_state",
    "restore",
    "restore_set",
    "restore_state",
    "Router",
    "save",
    "save_set",
    "select_adapter",
    "shard_train_state",
    "Spectrum",
    "StrictError",
    "subtract_init",
    "summary",
    "Summary",
    "train_shardings",
    "trainable_labels",
    "TrainShardings",
    "TrainState",
    "truncate",
    "Truncation",
    "unmerge",
]
