"""Device meshes, logical-axis sharding rules and multi-host start-up (`sharding.distributed`) for
minimax-jax."""

from sharding.mesh import batch_sharding, make_mesh, param_shardings
from sharding.rules import DEFAULT_RULES, MESH_AXES, logical_to_spec

__all__ = ["DEFAULT_RULES", "MESH_AXES", "batch_sharding", "logical_to_spec", "make_mesh", "param_shardings"]
