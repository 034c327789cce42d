"""Adapter and base variants built on the core: DoRA, quantized bases (QLoRA)."""
