"""PEFT-format adapters: `export_peft` and `import_peft` (safetensors, never pickle).

The files are what ``peft.PeftModel.save_pretrained`` writes and
``PeftModel.from_pretrained`` loads::

    <directory>/adapter_config.json          LoraConfig fields (r, lora_alpha, target_modules, ...)
    <directory>/adapter_model.safetensors    base_model.model.<module>.lora_A.weight  (r, in)
                                             base_model.model.<module>.lora_B.weight  (out, r)
    <directory>/<name>/...                   adapters other than "default"

``lora_A.weight`` is ``a.T`` and ``lora_B.weight`` is ``b.T`` for every
layer kind (PEFT uses the ``nn.Linear`` orientation even for GPT-2's
``Conv1D``); embeddings use ``lora_embedding_A`` / ``lora_embedding_B``
with the same transposes. DoRA's magnitude ``m`` is
``<module>.lora_magnitude_vector`` (shape ``(out,)``, PEFT's per output
unit norm, the same orientation for every kind; ``use_dora`` in the
config). Scaling is not stored: PEFT recomputes it from
``lora_alpha`` / ``r`` (``/ sqrt(r)`` with ``use_rslora``), per module via
``rank_pattern`` / ``alpha_pattern``, which the export fills for every
module whose rank or alpha differs from the defaults. Fully-trained leaves
(``LoraConfig.train``) become ``modules_to_save``: PEFT stores the whole
module, so the export needs ``params`` for the module's untrained
parameters. The mapping between our paths and torch module names is a
`lora_jax.interop.KeyMap` (presets ``"llama"``, ``"gpt2"``, ``"bert"``).

Tied embeddings. A model may use its input embedding also as the output
head (``logits = h @ E.T``; ``tie_word_embeddings`` in transformers). An
adapter on such an embedding changes both uses; PEFT does the same only
with ``ensure_weight_tying=true``, and then stores the head's entries as
copies of the embedding's (``lm_head.lora_A.weight`` is
``lora_embedding_B.T``, ``lm_head.lora_B.weight`` is
``lora_embedding_A.T``; a fully-trained embedding's head copy is
``lm_head.weight``). `export_peft` writes that for every exported
embedding that is tied -- listed in ``LoraConfig.tied`` (`lj.configure`
fills it), passed as ``tied=``, or found from ``params`` (they hold the
embedding but no leaf for the head the key map's ``ties`` name).
`import_peft` reads such files exactly, and refuses an adapter trained with
the tie broken (``ensure_weight_tying=false`` and only the embedding, or
only the head, changed), which one tied embedding can't express.

Stacked layers. A key map template with ``{i}`` maps a stacked (``nn.scan``)
leaf to one module per layer. A PEFT file that adapts only some layers
(``layers_to_transform``) imports with zero adapters (no change) in the
others.

lora_jax adds, in the safetensors metadata (PEFT ignores it), a sha256 of
every tensor and the base fingerprint; `import_peft` verifies both when
present.

AdaLoRA. `export_peft_adalora` / `import_peft_adalora` read and write
PEFT's AdaLoRA files (``lora_A`` / ``lora_E`` / ``lora_B``, the kept
triplets of each module, and ``rank_pattern``).
"""

from lora_jax.interop._peft_adalora import export_peft_adalora as export_peft_adalora
from lora_jax.interop._peft_adalora import import_peft_adalora as import_peft_adalora
from lora_jax.interop._peft_export import export_peft as export_peft
from lora_jax.interop._peft_format import CONFIG_NAME as CONFIG_NAME
from lora_jax.interop._peft_format import WEIGHTS_NAME as WEIGHTS_NAME
from lora_jax.interop._peft_format import UnsupportedPeftFeature as UnsupportedPeftFeature
from lora_jax.interop._peft_import import import_peft as import_peft

__all__ = ["export_peft", "import_peft", "export_peft_adalora", "import_peft_adalora",
           "UnsupportedPeftFeature", "CONFIG_NAME", "WEIGHTS_NAME"]
