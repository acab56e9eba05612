"""Device meshes and logical-axis sharding rules for minimax-jax."""

from sharding.mesh import batch_sharding, initialize_distributed, make_mesh, param_shardings
from sharding.rules import DEFAULT_RULES, MESH_AXES, logical_to_spec

__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "batch_sharding", "initialize_distributed", "logical_to_spec",
    "make_mesh", "param_shardings",
]
