"""Collectives over the data-parallel processes, checked the way NCCL checks them.

Under gloo, our CPU tests' backend, ``accelerator.reduce`` takes a tensor on any device; under NCCL
a CPU tensor raises, at the first epoch of a GPU run. Every collective of the trainer goes through
``Collectives``, which refuses a tensor that is not on the accelerator's device on every backend and
with one process as well, so a CPU test fails where a GPU run would.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor


class WrongDevice(RuntimeError):
    pass


def on_device(actual: torch.device, expected: torch.device) -> bool:
    """Whether a tensor on ``actual`` is on ``expected``. Without an index ("cuda") any index will do;
    the CPU is one device whatever its index (accelerate's multi-process CPU device is "cpu:0", while
    tensors made there report "cpu")."""
    if actual.type != expected.type:
        return False
    return expected.type == "cpu" or expected.index is None or actual.index == expected.index


class Collectives:
    def __init__(self, accelerator: Any = None) -> None:
        """``accelerator``: an accelerate Accelerator, or None for one process on the CPU."""
        self.accelerator = accelerator
        self.processes = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.device = torch.device(accelerator.device) if accelerator is not None else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce(self, tensor: Tensor, op: Literal["sum", "mean"]) -> Tensor:
        """The elementwise sum or mean over processes (the tensor itself with one process)."""
        self._check(tensor)
        if self.processes == 1:
            return tensor
        return self.accelerator.reduce(tensor, op)

    def any(self, flag: bool) -> bool:
        """Whether any process says True: a decision one process takes (its clock, a signal it got)
        must be taken by all, or the processes fall out of step at the next collective."""
        if self.processes == 1:
            return flag
        votes = torch.tensor([float(flag)], dtype=torch.float64, device=self.device)
        return bool(self.accelerator.reduce(votes, "sum").item() > 0)

    def barrier(self) -> None:
        if self.processes > 1:
            self.accelerator.wait_for_everyone()

    def gather(self, values: Tensor) -> Tensor:
        """Every process's 1-D ``values`` (lengths may differ), concatenated in rank order."""
        self._check(values)
        if self.processes == 1:
            return values
        lengths = self.accelerator.gather(torch.tensor([values.numel()], device=self.device)).tolist()
        padded = torch.zeros(max(lengths), dtype=values.dtype, device=self.device)
        padded[: values.numel()] = values
        rows = self.accelerator.gather(padded).view(self.processes, -1)
        return torch.cat([row[:n] for row, n in zip(rows, lengths, strict=True)])

    def _check(self, tensor: Tensor) -> None:
        if not on_device(tensor.device, self.device):
            raise WrongDevice(
                f"a collective got a tensor on {tensor.device}, but the processes communicate on "
                f"{self.device} (NCCL takes only CUDA tensors): create it with device=collectives.device "
                f"or move it there with .to(collectives.device)"
            )
