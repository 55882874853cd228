"""ParallelState: the tensor-, pipeline- and data-parallel groups of one process.

Built from DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model), the same object
DeepSpeed's PipelineModule uses, so both agree on which ranks form each group. Nothing is kept
in module globals: the state is an explicit object passed to the layers that need it (as in
nanotron), so tests can build and drop as many as they like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass
class ParallelState:
    world_size: int = 1
    rank: int = 0
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: Any = None  # torch ProcessGroup (None only for ParallelState.single())
    pp_group: Any = None
    dp_group: Any = None
    model_group: Any = None  # all ranks of one model replica (TP x PP), for statistics
    topology: Any = None

    @classmethod
    def single(cls) -> "ParallelState":
        """One process, no communication."""
        return cls()

    @classmethod
    def from_topology(cls, tensor: int = 1, pipeline: int = 1) -> "ParallelState":
        """Create every group on the initialised default process group.

        All ranks must call this in the same order (torch.distributed.new_group is collective).
        """
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        world_size, rank = dist.get_world_size(), dist.get_rank()
        if world_size % (tensor * pipeline):
            raise ValueError(
                f"world size {world_size} is not a multiple of tensor x pipeline = {tensor * pipeline}"
            )
        data = world_size // (tensor * pipeline)
        topo = PipeModelDataParallelTopology(num_pp=pipeline, num_mp=tensor, num_dp=data)
        coord = topo.get_coord(rank)
        state = cls(
            world_size=world_size, rank=rank, tp_size=tensor, pp_size=pipeline, dp_size=data,
            tp_rank=coord.model, pp_rank=coord.pipe, dp_rank=coord.data, topology=topo,
        )
        state.tp_group = _my_group(topo.get_axis_comm_lists("model"), rank)
        state.pp_group = _my_group(topo.get_axis_comm_lists("pipe"), rank)
        state.dp_group = _my_group(topo.get_axis_comm_lists("data"), rank)
        # Ranks sharing a data coordinate hold one full model replica between them.
        replicas = [
            sorted(r for r in range(world_size) if topo.get_coord(r).data == d) for d in range(data)
        ]
        state.model_group = _my_group(replicas, rank)
        return state

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp_size}, "
            f"pp {self.pp_rank}/{self.pp_size}, dp {self.dp_rank}/{self.dp_size}"
        )


def _my_group(rank_lists: list[list[int]], rank: int):
    """new_group for every list (collective on all ranks); return the one containing `rank`."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks=ranks)
        if rank in ranks:
            mine = group
    return mine
