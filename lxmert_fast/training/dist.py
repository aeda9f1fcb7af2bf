"""Processes and nodes: the process group, the per-node facts a job needs, node-local disks.

* :func:`single_process_env` lets ``python train.py`` run without a launcher.
* :func:`init_process_group` starts DeepSpeed's process group with a collective timeout, so a
  dead node ends the job with an error instead of a hang.
* :func:`local_world_size` / :func:`node_rank`: the processes on this node and this node's index,
  from the launcher's variables (torchrun: ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``; DeepSpeed's
  launcher: ``LOCAL_SIZE``, ``CROSS_RANK``; SLURM: ``SLURM_NTASKS_PER_NODE``, ``SLURM_NODEID``),
  else by counting the ranks that share this host name.
* :func:`shared_with_rank0`: is a directory the one global rank 0 sees (one shared filesystem),
  or this node's own (node-local disks)? Rank 0 writes a marker with a fresh token; every rank
  looks for it. :func:`Layout` records the answer for the output and data directories.
"""

from __future__ import annotations

import datetime
import os
import socket
import uuid
from dataclasses import dataclass

import torch

LAYOUT_MARKER = ".lxmert_fast_rank0"


def single_process_env() -> None:
    """Let ``python train.py`` run without the launcher (DeepSpeed otherwise looks for MPI)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def init_process_group(cuda: bool, timeout_minutes: float, shm_comm: bool = False) -> tuple[int, int]:
    """DeepSpeed's process group (NCCL on CUDA, gloo on the CPU) with ``timeout_minutes`` on every
    collective; returns (rank, world size)."""
    import deepspeed
    import torch.distributed as dist

    if not cuda and not shm_comm:
        # DeepSpeed JIT-compiles its shared-memory allreduce op for the CPU (minutes on a small
        # machine, and again whenever its build cache is invalidated); gloo serves without it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if cuda:
        # NCCL reports a collective that timed out (a peer died) as an error, not a hang.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # DeepSpeed builds its data-parallel groups with new_group() and no timeout, which takes
    # torch's defaults (30 minutes for gloo, 10 for NCCL), not the world group's: a hung peer
    # then stalls the gradient reduction for that long. The defaults are module globals read when
    # a group is made, so they are set here, before any group exists (checked by
    # tests/test_multinode.py: a hung node ends the job within --dist_timeout).
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if getattr(distributed_c10d, "default_pg_nccl_timeout", None) is not None:
        distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def start_processes(args) -> tuple[bool, int, int, int]:
    """This process's part of the job, from the run flags: the process group (``--dist_timeout``),
    its GPU (``--local_rank``) or its CPU threads (``--cpu_threads``). Returns (CUDA?, rank, world
    size, processes on this node)."""
    single_process_env()
    cuda = torch.cuda.is_available()
    rank, world = init_process_group(cuda, args.dist_timeout, args.shm_comm)
    local_world = local_world_size()
    if cuda:
        torch.cuda.set_device(args.local_rank)
    else:
        torch.set_num_threads(cpu_threads(args.cpu_threads, local_world))
    return cuda, rank, world, local_world


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return None


def _host_ranks() -> list[str]:
    """Every rank's node identity (the launcher's node index where it gives one, else the host)."""
    import torch.distributed as dist

    node = _env_int("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID")
    mine = f"node{node}" if node is not None else socket.gethostname()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def local_world_size() -> int:
    """Processes on this node: the launcher's count, else the ranks sharing this node's identity.
    Every rank must call it (the fallback is a collective)."""
    count = _env_int("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
    if count is not None:
        return max(1, count)
    every = _host_ranks()
    import torch.distributed as dist

    mine = every[dist.get_rank()] if dist.is_available() and dist.is_initialized() else every[0]
    return max(1, every.count(mine))


def local_rank() -> int:
    return _env_int("LOCAL_RANK") or 0


def cpu_threads(requested: int | None, local_world: int) -> int:
    """Torch threads per process on the CPU: ``--cpu_threads``, else this node's cores over its
    processes minus one (oversubscribed OpenMP threads spin and run many times slower)."""
    if requested is not None:
        return requested
    return max(1, (os.cpu_count() or 1) // local_world - 1)


def shared_with_rank0(directory: str) -> bool:
    """Whether ``directory`` on this rank is the directory global rank 0 sees. Every rank must call
    it (collective). Rank 0 writes a marker holding a fresh token; a rank that reads the token back
    shares rank 0's filesystem there."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_world_size() == 1:
        return True
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LAYOUT_MARKER)
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    if dist.get_rank() == 0:
        from lxmert_fast import atomic

        atomic.atomic_write_text(path, token[0])
    dist.barrier()
    try:
        with open(path) as f:
            seen = f.read().strip() == token[0]
    except FileNotFoundError:
        seen = False
    dist.barrier()  # nobody reads after rank 0 moves on and a later call rewrites the marker
    return seen


@dataclass(frozen=True)
class Layout:
    """Where this rank's files live, decided once at start-up.

    ``output_shared``: this rank's output directory is the one global rank 0 writes, so rank 0
    alone publishes checkpoints; otherwise each node's local rank 0 publishes that node's copy.
    ``data_shared``: likewise for the data directories: rank 0 alone prepares the data (synthetic
    set, feature-store conversion), or each node's local rank 0 prepares its own copy."""

    output_shared: bool
    data_shared: bool
    rank: int
    local_rank: int

    @property
    def publisher(self) -> bool:
        """Does this rank publish checkpoints for the ranks that share its output directory?"""
        return self.rank == 0 if self.output_shared else self.local_rank == 0

    @property
    def data_preparer(self) -> bool:
        """Does this rank prepare the data for the ranks that share its data directories?"""
        return self.rank == 0 if self.data_shared else self.local_rank == 0


def _all_shared(directories: list[str]) -> bool:
    """Whether every rank sees rank 0's ``directories`` (collective)."""
    import torch.distributed as dist

    mine = all([shared_with_rank0(d) for d in directories])  # every rank joins every collective
    every = [mine]
    if dist.is_available() and dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    return all(every)


def detect_layout(storage: str, output_dir: str, data_dirs: list[str]) -> Layout:
    """The layout for ``--storage``: auto (detected: :func:`shared_with_rank0`), shared or
    node-local (both the output and the data directories). Collective."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if storage == "auto":
        output_shared, data_shared = _all_shared([output_dir]), _all_shared(data_dirs)
    else:
        output_shared = data_shared = storage == "shared"
    return Layout(output_shared=output_shared, data_shared=data_shared, rank=rank, local_rank=local_rank())
