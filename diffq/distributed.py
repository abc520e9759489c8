"""Processes of a launched run (``accelerate launch`` on GPUs, ``torchrun`` on CPU): this process's
state, its shard of the work, and barriers. Used by sampling, finetuning and the job alike."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Shard", "current_shard", "process_state", "wait_for_everyone"]


@dataclass(frozen=True)
class Shard:
    """This process's share of the sample ids: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process evaluates and writes results."""
        return self.rank == 0

    def ids(self, n: int) -> list[int]:
        """Sample ids of this shard among ``n``."""
        return list(range(self.rank, n, self.world))


def process_state():
    """accelerate's view of this process (gloo across CPU processes when there is no GPU)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def current_shard() -> Shard:
    """The shard of this process under ``accelerate launch`` / ``torchrun`` (one shard otherwise)."""
    state = process_state()
    return Shard(state.process_index, state.num_processes)


def wait_for_everyone() -> None:
    """Barrier across launched processes (no-op in one process)."""
    process_state().wait_for_everyone()
