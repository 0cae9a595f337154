"""Internal covariate shift as Santurkar et al. (2018, "How does batch normalization help optimization?") define it.

For layer i at step t, with the same mini-batch (x, y):

    G_i  = grad of the loss w.r.t. W_i at (W_1^t, ..., W_k^t)
    G'_i = grad of the loss w.r.t. W_i at (W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t)

i.e. how much layer i's gradient changes when only the layers before it take their step. The shift is reported as
``||G_i - G'_i||_2``, as the relative shift ``||G_i - G'_i|| / ||G_i||`` (comparable across networks whose
gradients differ in scale, as they do with and without BN) and as the cosine between G_i and G'_i (1 = no shift). Santurkar et al. found that BN does not
reduce it (and may increase it); the paper's motivation for BN was that it does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["gradient_shift", "layer_index"]


def layer_index(key: str, n_blocks: int) -> int:
    """Which layer a state_dict key belongs to: ``blocks.<i>.*`` -> i, ``head.*`` -> n_blocks."""
    parts = key.split(".")
    if parts[0] == "blocks":
        return int(parts[1])
    if parts[0] == "head":
        return n_blocks
    raise ValueError(f"state_dict key {key!r} belongs to no layer (expected blocks.<i>.* or head.*)")


def _weights(model: nn.Module) -> list[Tensor]:
    return [block.layer.weight for block in model.blocks] + [model.head.weight]


def gradient_shift(
    model: nn.Module,
    loss_of: Callable[[], Tensor],
    before: dict[str, Tensor],
    after: dict[str, Tensor],
    grads_before: list[Tensor],
) -> list[tuple[int, float, float, float]]:
    """For every layer i >= 1 (layer 0 has no earlier layer): ``(i, ||G_i - G'_i||, ||G_i - G'_i|| / ||G_i||,
    cos(G_i, G'_i))``.

    ``before``/``after`` are state_dict copies around the optimizer step, ``grads_before`` the weights' gradients
    at ``before`` (G), ``loss_of()`` recomputes the loss on the same batch. The model is left at ``after`` with
    zeroed gradients; running statistics touched by the extra forwards are restored from ``after``.
    """
    n_blocks = len(model.blocks)
    out = []
    for i in range(1, n_blocks + 1):
        mixed = {k: (after[k] if layer_index(k, n_blocks) < i else before[k]) for k in before}
        model.load_state_dict(mixed)
        model.zero_grad(set_to_none=True)
        loss_of().backward()
        g, g2 = grads_before[i].flatten().double(), _weights(model)[i].grad.flatten().double()
        diff, g_norm = torch.linalg.vector_norm(g - g2).item(), torch.linalg.vector_norm(g).item()
        denom = g_norm * torch.linalg.vector_norm(g2).item()
        cos = float(torch.dot(g, g2).item() / denom) if denom > 0 else float("nan")
        out.append((i, diff, diff / g_norm if g_norm > 0 else float("nan"), cos))
    model.load_state_dict(after)
    model.zero_grad(set_to_none=True)
    return out
