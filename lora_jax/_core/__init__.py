"""The core layer: config, paths (the one params flattener), leaf containers and the
adapter tree. Imports nothing else of lora_jax."""
