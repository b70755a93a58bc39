"""Exponential moving average of a model's weights, kept in float32.

    shadow <- decay * shadow + (1 - decay) * param        for every floating-point parameter/buffer
    shadow <- value                                       for integer buffers (counters)

The shadow is keyed like `model.state_dict()`, so it loads into a fresh copy of the architecture
(`copy_to`) and exports as is.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class EMA:
    """float32 EMA of `model`'s state, initialised to a copy of it."""

    def __init__(self, model: nn.Module):
        self.shadow: dict[str, torch.Tensor] = {
            name: (v.detach().float() if v.is_floating_point() else v.detach()).clone()
            for name, v in model.state_dict().items()
        }

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """One EMA step towards `model`'s current weights (decay 1 = frozen, 0 = copy)."""
        state = model.state_dict()
        if state.keys() != self.shadow.keys():
            raise ValueError("EMA.update: the model's state_dict keys differ from the ones the EMA was built with")
        shadows, targets = [], []
        for name, value in state.items():
            if value.is_floating_point():
                shadows.append(self.shadow[name])
                targets.append(value.detach().float())
            else:
                self.shadow[name].copy_(value)
        if shadows:
            torch._foreach_lerp_(shadows, targets, 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights into `model` (cast to its dtypes); returns it."""
        model.load_state_dict(self.shadow)
        return model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys())[:3]
            extra = sorted(state.keys() - self.shadow.keys())[:3]
            raise ValueError(f"EMA state does not fit the model: missing {missing}, unexpected {extra}")
        for name, value in state.items():
            self.shadow[name].copy_(value)
