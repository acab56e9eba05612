"""Device meshes and logical-axis sharding rules for minimax-jax."""

from sharding.rules import DEFAULT_RULES, MESH_AXES, logical_to_spec

__all__ = ["DEFAULT_RULES", "MESH_AXES", "logical_to_spec"]
