"""Loss and gradient smoothness along the gradient direction, as Santurkar et al. (2018, "How does batch
normalization help optimization?") measure it.

At a training step with parameters w, mini-batch loss L and gradient g = grad L(w), for a few step sizes eta:

    loss_range  = max_eta L(w - eta g) - min_eta L(w - eta g)            (variation of the loss along g)
    grad_change = max_eta ||grad L(w - eta g) - g||                       ("gradient predictiveness")
    beta        = max_eta ||grad L(w - eta g) - g|| / ||eta g||           (effective beta-smoothness)

Smaller is smoother. Santurkar et al. report all three smaller with BatchNorm (a VGG on CIFAR-10).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["STEP_MULTIPLES", "smoothness"]

#: the step sizes, as multiples of the run's learning rate
STEP_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)


def _flat_grad(params: list[Tensor]) -> Tensor:
    return torch.cat([p.grad.detach().flatten().double() for p in params])


def smoothness(model: nn.Module, loss_of: Callable[[], Tensor], lr: float) -> dict[str, float]:
    """``loss_range``, ``grad_change`` and ``beta`` (see the module docstring) at the current parameters, whose
    ``.grad`` must hold the gradient of ``loss_of()``. The model's state (parameters, buffers) and gradients are
    restored afterwards."""
    params = [p for p in model.parameters() if p.grad is not None]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = [p.grad.detach().clone() for p in params]
    g = torch.cat([x.flatten().double() for x in grads])
    g_norm = torch.linalg.vector_norm(g).item()
    losses, changes, betas = [], [], []
    for multiple in STEP_MULTIPLES:
        eta = multiple * lr
        with torch.no_grad():
            for p, grad in zip(params, grads, strict=True):
                p.sub_(eta * grad)
        model.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        change = torch.linalg.vector_norm(_flat_grad(params) - g).item()
        losses.append(loss.item())
        changes.append(change)
        betas.append(change / (eta * g_norm) if g_norm > 0 else float("nan"))
        model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad
    return {"loss_range": max(losses) - min(losses), "grad_change": max(changes), "beta": max(betas)}
