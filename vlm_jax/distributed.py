"""Joining the processes of a multi-host run with `jax.distributed`, before anything else uses JAX.

    from vlm_jax import distributed
    distributed.initialize()                                  # auto: TPU VM slice, SLURM, or nothing
    distributed.initialize("10.0.0.2:8476", num_processes=4, process_id=1)   # explicit

One process per host. How the processes find each other:

  * explicit: all three of coordinator ("host:port" of process 0), num_processes and process_id.
    JAX's own cluster detection is switched off then, so nothing overrides them (JAX's SLURM
    detection would otherwise restrict every process to one GPU).
  * a Cloud TPU VM (libtpu installed and TPU chips attached, or the TPU_WORKER_HOSTNAMES /
    MEGASCALE_COORDINATOR_ADDRESS variables of GKE / multislice): `jax.distributed.initialize()`
    with no arguments; JAX reads the slice's workers from the TPU metadata.
  * a SLURM step with more than one task (`srun`): JAX reads SLURM_* variables. With one task
    per node, the process gets all of its node's GPUs (SLURM_GPUS_ON_NODE or CUDA_VISIBLE_DEVICES),
    not JAX's default of one GPU per task.
  * anything else is a single machine: nothing is initialised.

`initialize` must run before the first JAX computation (even `jax.devices()`); it raises
otherwise, as `jax.distributed.initialize` does.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
from typing import Mapping

from vlm_jax.errors import InputError

# Variables that only a TPU cluster sets (GKE TPU pods, multislice).
_TPU_ENV_HINTS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")
# What SLURM sets inside an `srun` step (the same set JAX's SLURM detection requires).
_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID")


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """'tpu', 'slurm' (a step of more than one task), or None for a single machine."""
    environ = os.environ if environ is None else environ
    if any(environ.get(name) for name in _TPU_ENV_HINTS) or _tpu_chips_attached():
        return "tpu"
    if all(name in environ for name in _SLURM_STEP_VARS) and int(environ["SLURM_NTASKS"]) > 1:
        return "slurm"
    return None


def _tpu_chips_attached() -> bool:
    """libtpu installed and TPU devices present (/dev/accel* on v2-v4, /dev/vfio/N on v5+)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def slurm_local_device_ids(environ: Mapping[str, str] | None = None) -> list[int] | None:
    """All of this node's GPUs when the step runs one task per node, else None (JAX's default:
    the task's SLURM_LOCALID, i.e. one GPU per task)."""
    environ = os.environ if environ is None else environ
    nodes = environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES")
    if nodes is None or int(environ["SLURM_NTASKS"]) != int(nodes):
        return None
    if environ.get("SLURM_GPUS_ON_NODE"):
        count = int(environ["SLURM_GPUS_ON_NODE"])
    elif environ.get("CUDA_VISIBLE_DEVICES"):
        count = len(environ["CUDA_VISIBLE_DEVICES"].split(","))
    else:
        return None  # no GPUs allocated: CPU nodes see all their devices anyway
    return list(range(count))


def check_explicit(coordinator: str | None, num_processes: int | None,
                   process_id: int | None) -> bool:
    """True when the three explicit settings are given (and valid), False when none is."""
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    missing = [flag for flag, value in given.items() if value is None]
    if len(missing) == len(given):
        return False
    if missing:
        raise InputError(f"multi-process flags go together: {', '.join(missing)} missing "
                         f"(given: {', '.join(f for f in given if f not in missing)})")
    if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator):
        raise InputError(f"--coordinator={coordinator!r}: expected HOST:PORT of process 0, "
                         f"e.g. 10.0.0.2:8476")
    if num_processes < 1:
        raise InputError(f"--num-processes={num_processes}: must be >= 1")
    if not 0 <= process_id < num_processes:
        raise InputError(f"--process-id={process_id}: must be in [0, {num_processes})")
    return True


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str:
    """Join this process to its peers; returns how: 'explicit', 'tpu', 'slurm' or 'single'."""
    import jax

    if jax.distributed.is_initialized():
        raise RuntimeError("jax.distributed is already initialized in this process")
    if check_explicit(coordinator, num_processes, process_id):
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id, cluster_detection_method="deactivate")
        return "explicit"
    cluster = detect_cluster()
    if cluster == "tpu":
        jax.distributed.initialize()
    elif cluster == "slurm":
        jax.distributed.initialize(local_device_ids=slurm_local_device_ids(),
                                   cluster_detection_method="slurm")
    return cluster or "single"
