"""Interoperability with the PyTorch ecosystem: PEFT adapter files and key maps.

``lj.export_peft`` / ``lj.import_peft`` (re-exported at the top level) read
and write PEFT's safetensors format; a `KeyMap` translates lora_jax's
'/'-paths to Hugging Face parameter names, with presets for the reference
models in ``KEY_MAPS`` (``"llama"``, ``"gpt2"``, ``"bert"``) -- a template
with ``{i}`` maps a stacked (``nn.scan``) leaf to one module per layer, and
``KeyMap(ties=...)`` names the output head a model may tie to its input
embedding;
`save_params` / `load_params` read and write the flat '/'-path params files
the command line takes; `lora_jax.interop.keras` runs Keras 3 models (JAX
backend) as a params tree and a function of it. The ``safetensors`` package
is imported only when a file is read or written (``pip install
'lora-jax[interop]'``), Keras only when its helpers are called.

>>> import lora_jax as lj
>>> lj.interop.KEY_MAPS["llama"].lookup("params/model/layers_0/self_attn/k_proj/kernel")
HFName(name='model.layers.0.self_attn.k_proj.weight', kind='linear')
"""

from lora_jax.interop import keras as keras
from lora_jax.interop._files import load_params as load_params
from lora_jax.interop._files import save_params as save_params
from lora_jax.interop._keymap import KEY_MAPS as KEY_MAPS
from lora_jax.interop._keymap import HFName as HFName
from lora_jax.interop._keymap import KeyMap as KeyMap
from lora_jax.interop._keymap import from_hf_state_dict as from_hf_state_dict
from lora_jax.interop._keymap import to_hf_state_dict as to_hf_state_dict
from lora_jax.interop.peft import UnsupportedPeftFeature as UnsupportedPeftFeature
from lora_jax.interop.peft import export_peft as export_peft
from lora_jax.interop.peft import import_peft as import_peft

__all__ = [
    "HFName",
    "KEY_MAPS",
    "KeyMap",
    "UnsupportedPeftFeature",
    "export_peft",
    "from_hf_state_dict",
    "import_peft",
    "keras",
    "load_params",
    "save_params",
    "to_hf_state_dict",
]
