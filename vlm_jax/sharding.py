"""Device mesh, logical-axis rules, and the shardings of params and batches.

One model definition serves data parallelism, FSDP and tensor parallelism: parameters and
activations carry logical axis names (see `vlm_jax/models/layers.py`) and a rule table maps
those names onto the mesh axes ('data', 'fsdp', 'tensor'). A dimension that the mapped mesh axes
do not divide is replicated instead (e.g. a single MQA kv head under tensor=2), and
`describe_shardings` shows where that happened.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated). First match wins in flax.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("batch_over_data", "data"),  # the token-embedding lookup's rows before their fsdp all-to-all
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("patch", None),
    ("pos", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. One axis may be -1: it takes all devices the others leave."""
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1, got data={self.data}, "
                              f"fsdp={self.fsdp}, tensor={self.tensor}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh: axis sizes must be positive or -1, got {sizes}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(f"mesh: fixed axes {dict(zip(MESH_AXES, sizes))} use {known} "
                                  f"devices, which does not divide the {num_devices} devices")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} "
                              f"({dict(zip(MESH_AXES, sizes))}) but there are {num_devices} devices")
        return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axes (Linen logical constraints need Auto)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (the 'batch' rule maps onto data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _mesh_axes_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
    """PartitionSpec for one array from its logical names, replicating any dimension the mesh
    axes do not divide and never using one mesh axis twice."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
        axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if axes_tuple and (dim % _mesh_axes_size(mesh, axes_tuple) or used & set(axes_tuple)):
            axes = None
        if axes:
            used |= set(axes_tuple)
        spec.append(axes)
    return P(*spec)


def param_shardings(boxed_params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a (possibly abstract) param tree still boxed in nn.LogicallyPartitioned.

    Pass the output of `jax.eval_shape(model.init, ...)` (before `nn.unbox`); returns a tree of
    the unboxed structure.
    """
    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh, rules))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Each process's local batch -> one global array per key, split over the data axes."""
    dp = data_parallel_size(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_rows = value.shape[0] * jax.process_count()
        if global_rows % dp:
            raise ConfigError(f"batch key {key!r}: global batch {global_rows} is not divisible by "
                              f"the data-parallel size {dp} (mesh data x fsdp)")
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out


def describe_shardings(params: Any, top: int = 10) -> list[str]:
    """The largest arrays with their shapes and shardings, for logs and `plan` reports."""
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        sharding = getattr(leaf, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
        rows.append((math.prod(leaf.shape), jax.tree_util.keystr(path), leaf.shape, spec))
    rows.sort(key=lambda r: -r[0])
    return [f"{name} {tuple(shape)} {spec}" for _, name, shape, spec in rows[:top]]


def rules_context(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """`with rules_context(mesh):` activates the mesh and the logical rules for Linen constraints.
    (`with mesh:` would silently turn logical constraints into no-ops; see ENVIRONMENT.md.)"""
    import contextlib
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(list(rules)))
    return stack
