"""The dense model's own activations, carried beside the pruned model's (``--model-correction``).

Reconstruction that matches (in part) the dense *model* needs, for every Linear, the inputs the
same calibration tokens have in the dense model. The driver keeps a second pair of activation buffers:
each decoder layer, still dense when it is calibrated, is run once more on the dense stream's inputs,
and that forward both feeds the Linears' hooks (the dense inputs, paired token by token with the pruned
model's) and writes the dense stream's next inputs. One more layer forward and two more activation
buffers per run; nothing else is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class DenseStream:
    hidden: torch.Tensor  # the current decoder layer's inputs in the dense model, (nsamples, L, hidden)
    out: torch.Tensor  # where that layer's dense outputs go

    def swap(self) -> None:
        """After a layer: its outputs become the next layer's inputs."""
        self.hidden, self.out = self.out, self.hidden

    def to(self, device: torch.device | str) -> None:
        self.hidden, self.out = self.hidden.to(device), self.out.to(device)


def open_dense_stream(hidden: torch.Tensor,
                      allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]) -> DenseStream:
    """A dense stream starting from the first layer's inputs (the same in both models)."""
    start = allocate(tuple(hidden.shape), hidden.dtype)
    start.copy_(hidden)
    return DenseStream(start, allocate(tuple(hidden.shape), hidden.dtype))
