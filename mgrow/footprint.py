"""What a network costs in memory before it is built: `estimate` on the meta device.

Owns `Estimate` and `estimate`, which size a network's state, generated weights and the
activations of one pass; `limits.check_memory` then refuses what would not fit. It sits
above mixing (it counts the weights template-mixed layers generate) and below arch, whose
`build` sizes every network it makes.

Worked example: a plain wrn-16-1 (10 classes) has 176,007 parameters and buffers
(704,080 bytes); one training step on a batch of 128 32 x 32 images has 140.5 MB of
layer outputs, so `estimate(model, (128, 3, 32, 32), True).need(True)` is 283.1 MB
(state, gradients and momentum, outputs and their gradients).

Imports mgrow.errors and mgrow.mixing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import MgrowError
from .mixing import Banked


@dataclass(frozen=True)
class Estimate:
    """Bytes a network takes: its state, generated weights, activations of one pass."""

    state: int  # parameters and buffers (template banks included)
    generated: int  # weights generated from templates (one forward holds them all)
    trainable: int  # trainable parameters (each gets a gradient and a momentum buffer)
    activations: int  # outputs of every leaf module in one forward pass at the batch size

    def need(self, train: bool) -> int:
        """Return the bytes one forward (train=False) or one training step needs."""
        if not train:
            return self.state + self.generated + self.activations
        # gradients and momentum of the trainable parameters; generated weights and their
        # gradients; activations kept for backward plus their gradients
        return self.state + 2 * self.trainable + 2 * self.generated + 2 * self.activations


def estimate(model: nn.Module, shape: tuple[int, ...] | None, train: bool = False) -> Estimate:
    """Return the memory estimate of `model` (on the meta device) for a batch of `shape`.

    Runs one meta forward pass (train or eval mode, as asked), so an input the network
    cannot take raises here (MgrowError, naming the input) instead of mid-run.
    """
    size = 4  # float32
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * size for p in model.parameters() if p.requires_grad)
    generated = sum(math.prod(m.tile_shape) * m.grid[0] * m.grid[1] * size
                    for m in model.modules() if isinstance(m, Banked))
    acts = 0
    if shape is not None:
        def count(mod: nn.Module, inp: Any, out: Any) -> None:
            nonlocal acts
            if isinstance(out, torch.Tensor):
                acts += out.numel() * size

        leaves = [m for m in model.modules() if not list(m.children())]
        hooks = [m.register_forward_hook(count) for m in leaves]
        was = model.training
        try:
            model.train(train)
            with torch.no_grad():
                model(torch.empty(shape, device="meta"))
        except (RuntimeError, ValueError) as e:
            raise MgrowError(_input_problem(shape, e)) from None
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
    return Estimate(state, generated, trainable, acts)


def _input_problem(shape: tuple[int, ...], e: Exception) -> str:
    """Return why the network cannot take a batch of `shape`, in one line."""
    b, c, h, w = shape
    msg = " ".join(str(e).split())[:160]
    if "more than 1 value per channel" in msg:
        return (f"a batch of {b} cannot be normalised by BatchNorm in training (a layer sees "
                f"one value per channel); use a larger --batch-size")
    return f"the network cannot take {c} x {h} x {w} inputs ({msg})"
