"""Multi-host start-up: join a multi-process JAX job, or stay a single process.

Each setting comes from, in order: an explicit value (`train.py --coordinator-address ...`, the
config's `distributed:` keys), the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`), then the launcher the process runs under:

- SLURM (`srun`), Open MPI (`mpirun`) and Cloud TPU pods (GKE, or multislice): JAX's own
  cluster detection, chosen by name once the launcher's environment is seen here;
- a Kubernetes indexed Job (or a JobSet of one Job): the process id is the pod's
  `JOB_COMPLETION_INDEX`, the coordinator the index-0 pod in the same headless-service
  subdomain; Kubernetes does not tell a pod how many pods its Job has, so the process count
  must be given (`JAX_NUM_PROCESSES` in the pod spec, or `--num-processes`).

`cluster` picks one of JAX's detection methods by name instead (e.g. "gcetpu" on Cloud TPU VMs,
whose topology only the metadata server knows), or "off" to never join. Without any of these
the process stays single-process and `initialize` changes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
from typing import Any, Mapping

import jax

log = logging.getLogger("sharding")

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
DEFAULT_PORT = 8476  # the coordinator's port when the launcher gives none (JAX_COORDINATOR_PORT overrides)
JAX_METHODS = ("slurm", "ompi", "mpi4py", "gcetpu", "gketpu", "k8s")  # JAX's cluster detection names


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How to join a multi-process job; every field None means "from the environment".

    coordinator_address: "host:port" of process 0; num_processes: the job's process count;
    process_id: this process's index in [0, num_processes); cluster: "auto" (detect the launcher),
    "off" (stay single-process), or one of JAX's detection methods (`JAX_METHODS`).
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cluster: str = "auto"

    def __post_init__(self) -> None:
        for name in ("num_processes", "process_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"distributed {name} must be an integer, got {value!r}")
        if self.coordinator_address is not None and not isinstance(self.coordinator_address, str):
            raise ValueError(f"distributed coordinator_address must be 'host:port', got {self.coordinator_address!r}")
        if self.cluster not in ("auto", "off", *JAX_METHODS):
            raise ValueError(f"distributed cluster {self.cluster!r} is not known; "
                             f"valid: {['auto', 'off', *JAX_METHODS]}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"distributed num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.process_id < 0:
            raise ValueError(f"distributed process_id must be >= 0, got {self.process_id}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> DistributedConfig:
        """From a config's `distributed:` mapping; an unknown key is a ValueError listing the valid ones."""
        values = dict(values or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown distributed key(s) {unknown}; valid: {names}")
        return cls(**values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the multi-process flags (`--coordinator-address`, `--num-processes`, `--process-id`,
    `--cluster`) to a command's parser; they override the config and what is detected."""
    group = parser.add_argument_group("multi-process start-up (default: detected from the launcher)")
    group.add_argument("--coordinator-address", metavar="HOST:PORT", help="process 0's address and a free port")
    group.add_argument("--num-processes", type=int, metavar="N", help="number of processes in the job")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    group.add_argument("--cluster", choices=("auto", "off", *JAX_METHODS),
                       help="launcher detection: auto (default), off, or one of JAX's methods")


def from_arguments(args: argparse.Namespace, base: DistributedConfig = DistributedConfig()) -> DistributedConfig:
    """`base` (e.g. a config's `distributed:` keys) with the flags of `add_arguments` that were given."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistributedConfig)}
    return dataclasses.replace(base, **{k: v for k, v in flags.items() if v is not None})


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _count_above_one(name: str) -> bool:
    return (_env_int(name) or 1) > 1


def detect_launcher() -> str | None:
    """The JAX detection method for the multi-process launcher this process runs under
    ("slurm", "ompi", "gketpu"), "indexed-job" for a Kubernetes indexed Job, or None when
    none with more than one process is seen."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in os.environ for k in slurm) and _count_above_one("SLURM_NTASKS"):
        return "slurm"
    if _count_above_one("OMPI_COMM_WORLD_SIZE"):
        return "ompi"
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h]) > 1 or _count_above_one("MEGASCALE_NUM_SLICES"):
        return "gketpu"
    if "JOB_COMPLETION_INDEX" in os.environ:
        return "indexed-job"
    return None


def indexed_job_settings(num_processes: int | None) -> DistributedConfig:
    """Coordinator and process id of a pod of a Kubernetes indexed Job (hostname `<job>-<index>`,
    reachable as `<job>-<index>.<subdomain>`), or of a JobSet's single Job. The count cannot be
    read from the pod's environment, so it must be given."""
    index = _env_int("JOB_COMPLETION_INDEX")
    if (_env_int("JOB_INDEX") or 0) > 0:
        raise ValueError(f"JobSet Job index {os.environ['JOB_INDEX']}: with several Jobs the process id "
                         "cannot be derived from JOB_COMPLETION_INDEX alone; pass --process-id")
    if num_processes is None:
        raise ValueError(f"Kubernetes indexed Job (JOB_COMPLETION_INDEX={index}): the pod's environment does "
                         "not say how many pods the Job has; set JAX_NUM_PROCESSES in the pod spec (the Job's "
                         "completions) or pass --num-processes")
    host = os.environ.get("HOSTNAME") or socket.gethostname()
    suffix = f"-{index}"
    if not host.endswith(suffix):
        raise ValueError(f"Kubernetes indexed Job: pod hostname {host!r} does not end in -{index} "
                         "(JOB_COMPLETION_INDEX); pass --coordinator-address")
    fqdn = socket.getfqdn(host)
    domain = fqdn[len(host):] if fqdn.startswith(host + ".") else ""
    if not domain:
        raise ValueError(f"Kubernetes indexed Job: pod {host!r} has no subdomain, so the other pods cannot "
                         "reach it; give the Job's pod template a `subdomain:` naming a headless Service, "
                         "or pass --coordinator-address")
    port = os.environ.get("JAX_COORDINATOR_PORT") or DEFAULT_PORT
    return DistributedConfig(coordinator_address=f"{host[: -len(suffix)]}-0{domain}:{port}",
                             num_processes=num_processes, process_id=index)


def initialize(settings: DistributedConfig = DistributedConfig()) -> bool:
    """Join the multi-process job described by `settings`, the environment or the launcher (see
    the module docstring) with `jax.distributed.initialize`; stay single-process when none
    describes one. Call before anything touches a device. Returns whether it joined; a missing
    or inconsistent setting is a ValueError naming it."""
    if settings.cluster == "off":
        return False
    coordinator = settings.coordinator_address or os.environ.get(ENV["coordinator_address"]) or None
    count = settings.num_processes if settings.num_processes is not None else _env_int(ENV["num_processes"])
    index = settings.process_id if settings.process_id is not None else _env_int(ENV["process_id"])
    given = (coordinator, count, index)
    method = None if settings.cluster == "auto" else settings.cluster
    if method is None and None in given:
        launcher = detect_launcher()
        if launcher == "indexed-job":
            if given == (None, None, None) and _env_int("JOB_COMPLETION_INDEX") == 0:
                log.warning("Kubernetes indexed Job pod 0 without JAX_NUM_PROCESSES: running as one process")
                return False
            found = indexed_job_settings(count)
            coordinator, index = coordinator or found.coordinator_address, found.process_id if index is None else index
        elif launcher is not None:
            method = launcher
        elif given == (None, None, None):
            return False
        else:
            missing = [f"{k} ({ENV[k]})" for k, v in zip(ENV, given) if v is None]
            raise ValueError(f"multi-process start-up needs a coordinator address, a process count and a "
                             f"process id, and no launcher was detected to supply the rest; missing: "
                             f"{', '.join(missing)}")
    if count is not None and index is not None and not 0 <= index < count:
        raise ValueError(f"process id {index} is outside [0, {count}) for a {count}-process job")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=count, process_id=index,
                                   cluster_detection_method=method or "deactivate")
    except (ValueError, TypeError) as e:
        via = f" (cluster detection {method!r})" if method else ""
        raise ValueError(f"multi-process start-up{via} failed: {e}") from None
    log.info("joined a %d-process job as process %d (%d of %d devices here)", jax.process_count(),
             jax.process_index(), jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """Whether this is process 0, the one that logs and writes the run's files."""
    return jax.process_index() == 0
