"""Device helpers shared by the benchmark, the training loops and the distributed runs."""

from __future__ import annotations

import torch

__all__ = ["synchronize"]


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPU, where every op has finished when it returns)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
