"""Sharded training: sharding rules for adapters and optimizer state, the sharded step."""
