"""Fit check: compile a config's train step ahead of time for a device mesh and report per-device
memory, the shardings of the largest tensors, and whether it fits the named device.

    vlm-jax plan --config configs/llava_so400m_llama3_8b.py --mesh data=1,fsdp=32 --devices tpu_v5p
    vlm-jax plan --config configs/tiny.py --mesh 2x4 --devices h100 --json plan.json
    # with libtpu importable (no TPU needed): the TPU compiler's own numbers for the slice
    vlm-jax plan --config ... --mesh data=1,fsdp=32 --devices tpu_v5p --topology v5p:2x4x4

Nothing is allocated: the train state and the batch are `jax.ShapeDtypeStruct`s carrying the
shardings training would use, and `jit(step).lower(...).compile()` builds the SPMD program of
one device. By default the mesh is made of fake CPU devices (`jax_num_cpu_devices`; the command
sets it itself, re-running itself in a fresh process when jax was already started with another
count). With `--topology` the devices are those of a described TPU slice
(`jax.experimental.topologies`) and libtpu's compiler builds the program, as MaxText's
train_compile.py does.

What the numbers mean: `analytic` rows are exact bytes per device of the params, the
optimizer state and the batch from their shapes and shardings (the same on any backend).
`XLA` rows are `compiled.memory_analysis()`: arguments, outputs not aliased to a donated input,
and temporaries (activations kept for the backward pass, gradients, optimizer temporaries,
collectives' buffers). On fake CPU devices they are what XLA:CPU allocates; a TPU or GPU compile
fuses, schedules and rematerialises differently (the TPU compile of the Llama-3-8B config needs
~20% less), and attention is compiled as plain XLA attention, which materialises the [T, T]
scores that TPU flash / cuDNN kernels never store. Treat the CPU peak as an estimate with a
margin: the verdict says FITS only below `--headroom` of the device memory. There is no GPU
topology compile here: H100 / A100 / H200 numbers are the CPU estimates.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import topologies

from vlm_jax import sharding
from vlm_jax.config import load_config_file
from vlm_jax.data.packing import assemble_batch
from vlm_jax.errors import InputError
from vlm_jax.train import run_config
from vlm_jax.train.checkpoint import abstract_train_state
from vlm_jax.train.loop import batch_keys
from vlm_jax.train.step import TrainStepConfig, make_train_step, plan_training

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Device:
    memory_gib: float       # HBM per device
    per_host: int           # devices per host: the default process count is devices / per_host
    description: str


DEVICES = {
    "tpu_v5p": Device(95, 4, "TPU v5p chip (95 GiB HBM)"),
    "tpu_v5e": Device(16, 4, "TPU v5e chip (16 GiB HBM)"),
    "tpu_v4": Device(32, 4, "TPU v4 chip (32 GiB HBM)"),
    "h100": Device(80, 8, "NVIDIA H100 80GB"),
    "h200": Device(141, 8, "NVIDIA H200 141GB"),
    "a100": Device(80, 8, "NVIDIA A100 80GB"),
}
MESH_AXES = ("data", "fsdp", "tensor")


# ----------------------------------------------------------------------------- arguments

def parse_mesh(text: str) -> dict[str, int]:
    """`16x16` (data x fsdp), `2x4x8` (data x fsdp x tensor) or `data=2,fsdp=16,tensor=2`."""
    text = text.strip()
    try:
        if "=" in text:
            sizes = {}
            for item in text.split(","):
                name, _, value = item.partition("=")
                name = name.strip()
                if name not in MESH_AXES:
                    raise InputError(f"unknown mesh axis {name!r}; axes: {MESH_AXES}")
                sizes[name] = int(value)
        else:
            values = [int(v) for v in text.lower().split("x")]
            if not 1 <= len(values) <= 3:
                raise InputError("expected 1 to 3 sizes")
            sizes = dict(zip(MESH_AXES, values))
    except ValueError as e:
        raise InputError(f"--mesh {text!r}: {e}; write DATAxFSDP[xTENSOR] (e.g. 16x16) or "
                         f"data=..,fsdp=..,tensor=..") from None
    sizes = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    if any(size < 1 for size in sizes.values()):
        raise InputError(f"--mesh {text!r}: every axis size must be >= 1, got {sizes}")
    return sizes


def tpu_topology_devices(topology: str, count: int) -> list:
    """The devices of a TPU slice described by name (`v5p:2x4x4`), for ahead-of-time compiles
    with libtpu's compiler on a machine without TPUs (as MaxText's train_compile.py does)."""
    if importlib.util.find_spec("libtpu") is None:
        raise InputError("--topology compiles with libtpu, which is not importable here: "
                         "pip install 'libtpu==0.0.42.*' (the version jax 0.10.2[tpu] pins), or "
                         "put a directory holding it on PYTHONPATH")
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # libtpu's errors come as several XLA exception types
        raise InputError(f"--topology {topology!r}: libtpu cannot build it ({e}); write "
                         f"GENERATION:SHAPE, e.g. v5p:2x4x4, v4:2x2x4, v5e:4x4") from None
    if len(devices) != count:
        raise InputError(f"--topology {topology} has {len(devices)} chips but the mesh needs "
                         f"{count} devices")
    return list(devices)


# ----------------------------------------------------------------------------- the plan

def abstract_batch(run, global_batch: int, mesh) -> dict:
    """ShapeDtypeStructs of one global training batch in the pipeline's layout, split over the
    data axes as `sharding.global_batch` splits it."""
    phase = run.train.phase.name
    if run.train.phase.reads_pairs:
        size = run.data.image_size
        rows = {"images": np.zeros((1, size, size, 3), np.uint8),
                "text_ids": np.zeros((1, run.data.text_len), np.int32),
                "text_lengths": np.zeros((1,), np.int32)}
        k = run.data.negative_captions
        rows.update(negative_text_ids=np.zeros((1, k, run.data.text_len), np.int32),
                    negative_text_lengths=np.zeros((1, k), np.int32))
    else:
        rows = assemble_batch([], 1, run.data.row_spec)  # one padded row: shapes and dtypes
    return {key: jax.ShapeDtypeStruct((global_batch,) + rows[key].shape[1:], rows[key].dtype,
                                      sharding=sharding.batch_sharding(mesh, rows[key].ndim))
            for key in batch_keys(phase, run.data.negative_captions > 0)}


def per_device_bytes(abstract: Any) -> int:
    total = 0
    for leaf in jax.tree.leaves(abstract):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def largest_tensors(abstract_state, top: int) -> list[dict]:
    rows = []
    for group in ("trainable", "frozen", "opt_state"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(abstract_state, group)):
            shard = leaf.sharding.shard_shape(leaf.shape)
            rows.append({"tensor": group + jax.tree_util.keystr(path), "shape": list(leaf.shape),
                         "dtype": str(leaf.dtype), "sharding": str(leaf.sharding.spec),
                         "per_device_gib": math.prod(shard) * leaf.dtype.itemsize / GIB})
    rows.sort(key=lambda r: -r["per_device_gib"])
    return rows[:top]


def replicated_fallbacks(plan) -> list[str]:
    """Params whose rule named a mesh axis of size > 1 that does not divide the dimension, so
    that dimension stayed replicated (e.g. 8 kv heads under tensor=16)."""
    table = dict(plan.rules)
    found = []
    leaves = jax.tree_util.tree_leaves_with_path(
        plan.abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for path, leaf in leaves:
        if not isinstance(leaf, nn.LogicallyPartitioned):
            continue
        for name, dim in zip(leaf.names, leaf.value.shape):
            axes = table.get(name)
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            size = math.prod(plan.mesh.shape[a] for a in axes)
            if size > 1 and dim % size:
                found.append(f"{jax.tree_util.keystr(path)}: {name}={dim} not divisible by "
                             f"{'x'.join(axes)}={size}")
    return found


def make_plan(config_spec: str, overrides: list[str], mesh_sizes: dict[str, int], device: str,
              memory_gib: float, num_processes: int, headroom: float, top: int,
              topology: str | None = None) -> dict:
    """The report of one fit check (see the module docstring). `topology`: compile with the
    TPU compiler for that slice; None: XLA:CPU on this process's fake CPU devices."""
    num_devices = math.prod(mesh_sizes.values())
    mesh_overrides = [f"mesh.{axis}={size}" for axis, size in mesh_sizes.items()]
    config = run_config.apply_overrides(load_config_file(config_spec),
                                        list(overrides) + mesh_overrides)
    notes = []
    run = run_config.build_run_config(config, num_devices, num_processes)
    backends = {run.model.resolved(part).attention_backend for part in ("vision", "llm")
                if getattr(run.model, part) is not None}
    # 'auto' resolves on this host's backend (CPU): plain XLA attention, as 'auto' on a TPU.
    replaced = backends - {"xla", "auto"} if topology else backends - {"xla"}
    if replaced:
        # The CPU cannot build the TPU flash / cuDNN kernels (nor libtpu the cuDNN one): compile
        # plain XLA attention, which stores the [T, T] scores those kernels avoid (high side).
        config = run_config.apply_overrides(config, ["model.attention_backend=xla"])
        run = run_config.build_run_config(config, num_devices, num_processes)
        notes.append(f"attention_backend {sorted(replaced)} compiled as plain XLA attention (no "
                     f"TPU flash / cuDNN kernel on CPU): the temporaries include the [T, T] "
                     f"attention scores of a layer, which those kernels do not store")
    devices = tpu_topology_devices(topology, num_devices) if topology else None
    mesh = sharding.make_mesh(run.mesh, devices)
    plan = plan_training(run.model, TrainStepConfig.from_train(run.train), mesh)
    state = abstract_train_state(plan)
    global_batch = run.data.batch_size * num_processes
    batch = abstract_batch(run, global_batch, mesh)

    step = make_train_step(plan)
    started = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - started
    compiled = lowered.compile()
    compile_s = time.perf_counter() - started - lower_s
    stats = compiled.memory_analysis()

    params = per_device_bytes(state.trainable) + per_device_bytes(state.frozen)
    optimizer = per_device_bytes(state.opt_state)
    batch_bytes = per_device_bytes(batch)
    xla = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
           "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
           "generated_code": stats.generated_code_size_in_bytes}
    peak = (xla["arguments"] + xla["outputs"] - xla["aliased"] + xla["temporaries"]
            + xla["generated_code"])
    fits, verdict = fit_verdict(peak, memory_gib, headroom, device)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    fallbacks = replicated_fallbacks(plan)
    if fallbacks:
        notes.append(f"{len(fallbacks)} param dimension(s) stay replicated because the mesh "
                     f"axis does not divide them (see replicated)")
    llm = run.model.llm
    return {
        "config": config_spec, "overrides": list(overrides), "device": device,
        "device_memory_gib": memory_gib, "headroom": headroom,
        "mesh": mesh_sizes, "num_devices": num_devices, "num_processes": num_processes,
        "phase": run.train.phase.name,
        "params": {"total": count(state.trainable) + count(state.frozen),
                   "trainable": count(state.trainable)},
        "global_batch": global_batch, "seq_len": run.data.seq_len,
        "micro_batches": run.train.micro_batches,
        "compute_dtype": run.model.dtype or (llm.dtype if llm is not None else None),
        "remat_policy": run.model.remat_policy or (llm.remat_policy if llm is not None else None),
        "per_device_gib": {
            "params": params / GIB, "optimizer_state": optimizer / GIB, "batch": batch_bytes / GIB,
            **{f"xla_{k}": v / GIB for k, v in xla.items()}, "peak_estimate": peak / GIB},
        "fits": fits, "verdict": verdict,
        "largest_tensors": largest_tensors(state, top),
        "replicated": fallbacks,
        "compiled_for": (f"TPU {topology} (libtpu compiler, ahead of time)" if topology
                         else f"XLA:CPU, {num_devices} fake CPU devices"),
        "notes": notes + [
            "analytic = exact bytes from shapes and shardings; xla_* = memory_analysis of one "
            "device's program as " + (
                f"the TPU compiler builds it for {topology}: the buffers the TPU runtime would "
                f"allocate, before the runtime's own reserve" if topology else
                "XLA:CPU builds it on fake CPU devices: a TPU/GPU compile schedules, fuses and "
                "rematerialises differently, so treat the peak as an estimate")],
        "compile_seconds": {"lower": round(lower_s, 1), "compile": round(compile_s, 1)},
    }


def fit_verdict(peak_bytes: int, memory_gib: float, headroom: float, device: str
                ) -> tuple[bool, str]:
    """(fits, one line saying so) for a per-device peak against the device's memory."""
    capacity = memory_gib * GIB
    used = (f"{peak_bytes / GIB:.2f} GiB per device ({peak_bytes / capacity:.0%} of "
            f"{memory_gib:g} GiB)")
    if peak_bytes <= headroom * capacity:
        return True, f"FITS: {used}"
    return False, (f"DOES NOT FIT: {used} is more than {headroom:.0%} of a {device} device's "
                   f"memory; shard more (mesh fsdp / tensor), raise train.micro_batches, use "
                   f"model.remat_policy=full, or a smaller batch")


def format_report(report: dict) -> str:
    gib = report["per_device_gib"]
    scale, unit = (1, "GiB") if gib["peak_estimate"] >= 1 else (1024, "MiB")
    size = lambda value: f"{value * scale:9.3f}"  # noqa: E731
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    lines = [
        f"vlm-jax plan: {report['config']} on {report['num_devices']} x {report['device']} "
        f"({report['device_memory_gib']:g} GiB each), mesh {mesh}, "
        f"{report['num_processes']} process(es); compiled for {report['compiled_for']}",
        f"  phase {report['phase']}: {report['params']['total'] / 1e9:.3f} B params "
        f"({report['params']['trainable'] / 1e9:.3f} B trainable); global batch "
        f"{report['global_batch']} x {report['seq_len']} tokens in {report['micro_batches']} "
        f"micro-batch(es); compute {report['compute_dtype']}, remat {report['remat_policy']}",
        f"  per device ({unit})",
        f"    params (analytic)              {size(gib['params'])}",
        f"    optimizer state (analytic)     {size(gib['optimizer_state'])}",
        f"    batch (analytic)               {size(gib['batch'])}",
        f"    XLA arguments                  {size(gib['xla_arguments'])}",
        f"    XLA outputs (not aliased)      {size(gib['xla_outputs'] - gib['xla_aliased'])}",
        f"    XLA temporaries (activations)  {size(gib['xla_temporaries'])}",
        f"    XLA generated code             {size(gib['xla_generated_code'])}",
        f"    peak estimate                  {size(gib['peak_estimate'])}",
        f"  {report['verdict']}",
        f"  largest tensors ({unit} per device):",
    ]
    for row in report["largest_tensors"]:
        lines.append(f"  {size(row['per_device_gib'])}  {row['tensor']} {tuple(row['shape'])} "
                     f"{row['dtype']} {row['sharding']}")
    for text in report["replicated"][:5]:
        lines.append(f"  replicated: {text}")
    lines += [f"  note: {text}" for text in report["notes"]]
    seconds = report["compile_seconds"]
    lines.append(f"  (lowered in {seconds['lower']} s, compiled in {seconds['compile']} s)")
    return "\n".join(lines)
