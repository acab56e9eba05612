"""Device meshes over the named axes `data, fsdp, expert, tensor, sequence` and parameter placement
from logical axis names."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sharding.rules import DEFAULT_RULES, MESH_AXES, MeshAxes, logical_to_spec


def make_mesh(shape: Mapping[str, int]) -> Mesh:
    """A mesh over all devices with axes `MESH_AXES`; `shape` gives the sizes (missing axes are 1,
    one axis may be -1 to take the remaining devices). Sizes must multiply to the device count."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; valid: {list(MESH_AXES)}")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    n = jax.device_count()
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fill}")
    if fill:
        rest = math.prod(s for s in sizes.values() if s != -1)
        if n % rest:
            raise ValueError(f"{n} devices cannot be split into mesh {dict(shape)}")
        sizes[fill[0]] = n // rest
    if math.prod(sizes.values()) != n:
        raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices but {n} are visible")
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def param_shardings(state: Any, mesh: Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES) -> Any:
    """NamedShardings for an nnx.State of Params, from each Param's logical axis names
    (`out_sharding` metadata) through `rules`. A mesh axis group that does not divide the
    dimension it shards is a ValueError naming the parameter, the dimension and the axes."""

    def one(path, v: nnx.Variable) -> NamedSharding:
        names = v.get_metadata().get("out_sharding") or (None,) * v.ndim
        spec = logical_to_spec(names, rules)
        dims = []
        for size, name, axes in zip(v.shape, names, spec):
            group = (axes,) if isinstance(axes, str) else tuple(axes or ())
            group = tuple(a for a in group if mesh.shape[a] > 1)
            ways = math.prod(mesh.shape[a] for a in group)
            if size % ways:
                raise ValueError(f"parameter {jax.tree_util.keystr(path, simple=True, separator='.')}: its "
                                 f"{name} dimension ({size}) cannot be split {ways} ways over mesh axes "
                                 f"{list(group)} (sizes {dict(mesh.shape)})")
            dims.append((group if len(group) > 1 else group[0]) if group else None)
        return NamedSharding(mesh, PartitionSpec(*dims))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a `[batch, time]` input: batch over the `activation_batch` mesh axes."""
    return NamedSharding(mesh, logical_to_spec(("activation_batch", None), rules))


def local_devices_first(mesh: Mesh) -> list[jax.Device]:
    """The mesh's devices, this process's first (`minimax_jax.memory.require_memory` reads the
    memory of the first one)."""
    return sorted(mesh.devices.flat, key=lambda d: d.process_index != jax.process_index())


def placed_bytes(shapes: Any, shardings: Any) -> int:
    """Bytes that arrays of `shapes` (a pytree of leaves with `shape` and `dtype`) placed as
    `shardings` (the same pytree of NamedShardings) take on all their meshes' devices together:
    each device's shard counted on every device that holds it (replicated parts once per device)."""
    leaves, placements = jax.tree.leaves(shapes), jax.tree.leaves(shardings)
    if len(leaves) != len(placements):
        raise ValueError(f"{len(leaves)} arrays but {len(placements)} shardings")
    return sum(math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize * s.mesh.size
               for x, s in zip(leaves, placements))


def placed_mesh(tree: Any) -> Mesh | None:
    """The mesh the arrays of `tree` (e.g. a model's state) are placed on: the one Mesh of their
    NamedShardings, or None when none has one (arrays on one device). Arrays on different meshes
    are a ValueError."""
    meshes = {x.sharding.mesh for x in jax.tree.leaves(tree)
              if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)}
    if len(meshes) > 1:
        raise ValueError(f"the arrays are placed on {len(meshes)} different meshes: "
                         f"{sorted(str(dict(m.shape)) for m in meshes)}")
    return meshes.pop() if meshes else None
