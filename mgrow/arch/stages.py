"""The stages of a builder's network, made deeper: found, extended, new blocks zeroed.

A stage is an `nn.Sequential` (its own forward: children in order) whose children are
all blocks of one class defined outside torch.nn, and which holds no such stage itself:
torchvision's ResNet `layer1`, ConvNeXt's `features.1`, ViT's `encoder.layers`, Swin's
`features.1`, EfficientNet's `features.2`, RegNet's `trunk_output.block1`; timm's `blocks`,
`stages.0.blocks`, `layer1`. Stages are numbered 1, 2, ... in module order; a network
with none (MobileNetV2 mixes block classes in one Sequential; DenseNet, GoogLeNet) has
nothing to deepen.

A new block is a copy of the stage's last block (fresh: every layer's own
`reset_parameters`) appended to the stage, named after it (`3` after `2`,
`encoder_layer_12` after `encoder_layer_11`). It starts as the identity map: torch.fx
traces the block, every residual addition (one operand the block's input, or an earlier
residual sum) has its branch followed back to the last layer that carries weights, and
that layer is zeroed: a Linear, conv or norm (weight and bias), a layer scale (the
parameter a branch is multiplied by), or an attention module's output projection (its
last Linear). The block's output on the stage's real output is then checked to equal its
input, or the block is refused, naming it.

Owns `find_stages`, `extend`, `zero_residual`. Imports mgrow.errors.
"""

from __future__ import annotations

import copy
import operator
import re

import torch
import torch.fx as fx
from torch import nn

from ..errors import MgrowError

_ADDS = (operator.add, operator.iadd, torch.add)
_MULS = (operator.mul, operator.imul, torch.mul, "mul", "mul_")


def find_stages(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """Return the stages of `model` (path, container), in module order."""
    found = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.Sequential) or type(m).forward is not nn.Sequential.forward \
                or len(m) == 0:
            continue
        kinds = {type(c) for c in m}
        (kind,) = kinds if len(kinds) == 1 else (None,)
        if kind is not None and not kind.__module__.startswith("torch.nn") and \
                any(True for _ in m.parameters()):
            found.append((path, m))
    inner = [(p, m) for p, m in found
             if not any(q.startswith(p + ".") if p else q for q, _ in found if q != p)]
    return inner


def _next_name(names: list[str]) -> str:
    """Return the name after the last child's: its trailing number + 1."""
    head, digits = re.fullmatch(r"(.*?)(\d*)", names[-1]).groups()
    return f"{head}{int(digits) + 1 if digits else len(names)}"


def extend(model: nn.Module, depths: tuple[int, ...], fresh: bool) -> list[str]:
    """Append copies of each stage's last block until stage s holds depths[s] blocks;
    `fresh`: re-initialise each copy (every layer's own `reset_parameters`). Return the
    paths of the new blocks."""
    stages = find_stages(model)
    if len(depths) != len(stages):
        raise MgrowError(f"depths {list(depths)} need one count per stage ({len(stages)}: "
                         f"{', '.join(p for p, _ in stages) or 'none'})")
    added = []
    for (path, stage), n in zip(stages, depths):
        if n < len(stage):
            raise MgrowError(f"{path}: depth {n} is below the builder's {len(stage)} blocks")
        while len(stage) < n:
            names = [name for name, _ in stage.named_children()]
            block = copy.deepcopy(stage[-1])
            if fresh:
                for m in block.modules():
                    reset = getattr(m, "reset_parameters",
                                    getattr(m, "_reset_parameters", None))
                    if reset is not None and any(True for _ in m.parameters(False)):
                        reset()
            name = _next_name(names)
            stage.add_module(name, block)
            added.append(f"{path}.{name}" if path else name)
    return added


class _Tracer(fx.Tracer):
    """torch.nn's layers are leaves, and so is any attention module (torchvision's Swin
    attention calls a function fx cannot look into)."""

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return super().is_leaf_module(m, name) or type(m).__name__.endswith("Attention")


def zero_residual(block: nn.Module, x: torch.Tensor, where: str) -> list[str]:
    """Zero the last weighted layer of every residual branch of `block` so that it maps
    `x` (what it will be given) to itself; return what was zeroed."""
    try:
        graph = _Tracer().trace(block)
    except Exception as e:  # fx's own errors are many
        raise MgrowError(f"{where}: torch.fx cannot trace {type(block).__name__} "
                         f"({type(e).__name__}); it cannot be made the identity") from None
    stream = {n for n in graph.nodes if n.op == "placeholder"}
    ends = []
    for n in graph.nodes:
        if n.op == "call_module" and n.args and n.args[0] in stream and not any(
                True for _ in block.get_submodule(n.target).parameters()):
            stream.add(n)  # an identity shortcut (timm's `self.shortcut`), or a ReLU of it
        if n.op == "call_function" and n.target in _ADDS and len(n.args) >= 2:
            a, b = n.args[:2]
            if a in stream or b in stream:
                ends.append(_branch_end(b if a in stream else a, block))
                stream.add(n)
    if not ends or None in ends:
        raise MgrowError(f"{where}: {type(block).__name__} has no residual branch ending in "
                         "a weighted layer beside an identity shortcut, so a copy would not "
                         "start as the identity (mgrow deepens blocks computing x + f(x))")
    params, modules = dict(block.named_parameters()), dict(block.named_modules())
    with torch.no_grad():
        for end in ends:  # a parameter (a layer scale), or a layer's own weights
            names = [end] if end in params else [f"{end}.{k}" for k, _ in modules[
                end].named_parameters(recurse=False)] if end in modules else []
            if not names:  # a buffer, say: nothing trainable to start at zero
                raise MgrowError(f"{where}: {type(block).__name__}'s residual branch ends in "
                                 f"{end}, which holds no weights to zero; refused")
            for name in names:
                params[name].zero_()
        y = block(x)
    if y.shape != x.shape or not torch.allclose(y, x, rtol=1e-6, atol=1e-6 * x.abs().max()):
        raise MgrowError(f"{where}: {type(block).__name__} with its residual branches "
                         "zeroed does not pass its input through; refused")
    return ends


def _branch_end(node: fx.Node, block: nn.Module) -> str | None:
    """Return the module path (or parameter name) of the last weights on a branch."""
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return node.target
        if node.op == "placeholder":
            return None
        if node.op == "call_module":
            m = block.get_submodule(node.target)
            inner = [k for k, c in m.named_modules() if k and isinstance(c, nn.Linear)]
            if inner and any(True for _ in m.parameters(recurse=False)) or \
                    type(m).__name__.endswith("Attention"):
                return f"{node.target}.{inner[-1]}" if inner else None  # its output projection
            if any(True for _ in m.parameters(recurse=False)):
                return node.target
        elif node.target in _MULS:
            scale = [_parameter(a) for a in node.args[1:2] + node.args[:1]]
            if any(scale):
                return next(s for s in scale if s)
        node = node.args[0] if node.args else None
    return None


def _parameter(node: object) -> str | None:
    """Return the parameter a node reshapes (a layer scale), or None."""
    while isinstance(node, fx.Node) and node.op in ("call_method", "call_function") and \
            node.args and node.target not in _ADDS + _MULS:
        node = node.args[0]
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None
