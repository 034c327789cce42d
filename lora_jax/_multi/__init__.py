"""Many adapters on one base: adapter sets, mixed batches, composition."""
