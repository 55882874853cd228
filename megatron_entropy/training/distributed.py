"""Start torch.distributed under whatever launcher started us (DESIGN.md decision 10).

  no launcher       one process; we pick a free local port
  deepspeed/torchrun RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT are already set
  mpirun            no RANK: DeepSpeed's MPI discovery asks mpi4py (OMPI_* / PMI environment)
  srun              SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID become RANK / WORLD_SIZE / LOCAL_RANK;
                    MASTER_ADDR is the first host of SLURM_JOB_NODELIST unless already set
gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20)
        hosts = out.stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodelist.split(",")[0].split("[")[0]


def detect_launcher() -> str:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun/deepspeed" if "SLURM_PROCID" not in env else "srun(env)"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env or "PMIX_RANK" in env and "SLURM_PROCID" not in env:
        return "mpirun"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "srun"
    return "none"


def init_distributed() -> DistInfo:
    """Initialise the default process group (idempotent) and pick this rank's device."""
    import deepspeed
    import torch.distributed as dist

    env = os.environ
    launcher = detect_launcher()
    if launcher == "srun":
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_ADDR", _first_slurm_host())
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
    elif launcher == "none":
        env.setdefault("RANK", "0")
        env.setdefault("WORLD_SIZE", "1")
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        # Under mpirun DeepSpeed's discovery sets MASTER_PORT to distributed_port (29500 unless
        # given): pass the user's MASTER_PORT on, or two jobs on one node collide.
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo",
                                   auto_mpi_discovery=launcher == "mpirun", verbose=False,
                                   distributed_port=int(env.get("MASTER_PORT", 29500)))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(env.get("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, launcher=launcher)


def exit_process(code: int) -> NoReturn:
    """End a process that used torch.distributed with exit status `code`, without interpreter finalization.

    A Gloo worker thread drops its reference to a finished collective (and so to the collective's
    tensors) after the caller has already moved on; freeing those tensors needs the GIL. If that
    happens while the interpreter is finalizing, CPython ends the thread inside a noexcept C++
    destructor and the whole process aborts ("terminate called without an active exception",
    SIGABRT) although the run succeeded: 2 in 20 two-rank torchrun runs of the tiny job here, and
    pytorch/pytorch#179291 for the same race. destroy_process_group() cannot prevent it (it does
    not join Gloo's worker threads), so after it we run the atexit handlers (wandb, logging) and
    MPI_Finalize while the interpreter is fully alive, flush stdout/stderr (Python's and C's), and
    leave with os._exit. Non-daemon threads are not waited for: join your own before calling this.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    atexit._run_exitfuncs()  # noqa: SLF001 -- what finalization would run; os._exit skips it
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun DeepSpeed's rank discovery initialised MPI;
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # mpi4py would finalize at interpreter exit, and mpirun counts a rank without it as failed
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to save
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # what C/C++ code (DeepSpeed ops, Gloo) left in stdio buffers
    except (OSError, AttributeError):
        pass
    os._exit(code)
