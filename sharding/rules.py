"""One table from logical axis names to mesh axes.

Every parameter of the model carries logical axis names (`vocab`, `embed`, `heads`, ...); this table
maps them to the mesh axes `data, fsdp, expert, tensor, sequence`. Another layout is another table,
not other code. A logical name without a rule is an error, never a silent replication.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor", "sequence")

MeshAxes = str | tuple[str, ...] | None

# Logical name -> mesh axis (or axes, or None for replicated).
DEFAULT_RULES: Mapping[str, MeshAxes] = {
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "qkv": None,
    "mlp": "tensor",
    "expert": "expert",
    # activations
    "activation_batch": ("data", "fsdp", "expert"),  # attention runs data parallel over the experts' devices
    "activation_length": "sequence",
    "activation_embed": None,
    "activation_heads": "tensor",
    "activation_vocab": "tensor",
}


def logical_to_spec(
    names: Sequence[str | None], rules: Mapping[str, MeshAxes] = DEFAULT_RULES
) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names; `None` entries stay replicated.

    Raises KeyError naming the logical axis and the known ones when a name has no rule.
    """
    out = []
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(
                f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}"
            )
        out.append(rules[name])
    return PartitionSpec(*out)
