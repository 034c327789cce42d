"""Verified adapter checkpoints on Orbax: the record, base fingerprints, the manager."""
