"""Template-mixed twins of builders' networks: their own modules, every weight mixed.

A builder's network (torchvision:, timm:) keeps its modules and its code; `twin` makes the
weight of every convolution and Linear, and nn.MultiheadAttention's packed input
projection, a learned mix of templates, as mgrow's own families' layers are (mgrow.mixing:
banks `banks.N`, a layer's coefficients `<path>.alpha`, the weight a property of the layer,
so code that reads it anywhere gets the generated one). Roles: the first weighted layer to
run is the stem and the last the classifier (edge templates, coefficients frozen unless
the spec says otherwise); every other is inner, and under `sharing pairs` two consecutive
inner layers (in the builder's module order) of one tile shape share a bank.

A network grown by g along an observed plan (arch.widen) is twinned with each layer's grid
read off the plan: along a grown axis the k-th copy of old channel i is channel i of tile
k, so tile (r, c) maps the r-th copies of its outputs from the c-th copies of its inputs,
and the tiled weight is reordered into the plan's layout (Twin.order). A depthwise
convolution, whose inputs are not a grown axis of its weight, is a g x 1 grid like the
stem; the classifier, whose outputs are kept, 1 x g.

Owns `twin`, `init_twin`. Imports mgrow.errors, manifest, mixing and arch.plans.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MgrowError
from ..manifest import MixingSpec
from ..mixing import Role, init_weight_, mixed_layers, random_orthogonal, twin_class
from .plans import Plan

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)


def _mixed_attr(m: nn.Module) -> str | None:
    """Return the name of the weight of `m` that a twin generates, or None."""
    if isinstance(m, nn.MultiheadAttention):
        return "in_proj_weight" if isinstance(m._parameters.get("in_proj_weight"),
                                              nn.Parameter) else None
    if isinstance(m, nn.modules.conv._ConvNd) and m.transposed:
        return None
    return "weight" if isinstance(m, _WEIGHTED) and isinstance(
        m._parameters.get("weight"), nn.Parameter) else None


def copies(index: torch.Tensor) -> torch.Tensor:
    """Return, for each new index, which copy of its old index it is (0 for the first)."""
    order = torch.argsort(index, stable=True)
    ranked = index[order]
    start = torch.ones_like(ranked, dtype=torch.bool)
    start[1:] = ranked[1:] != ranked[:-1]
    first = torch.cummax(torch.where(start, torch.arange(len(index)), 0), 0).values
    out = torch.empty_like(index)
    out[order] = torch.arange(len(index)) - first
    return out


def _layout(plan: Plan | None, key: str, shape: tuple[int, ...]
            ) -> tuple[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Return a weight's grid (g_out, g_in) and its order (see Twin.order) from the plan."""
    grid, order = [1, 1], [None, None]
    for axis in (plan.axes.get(key, []) if plan is not None else []):
        if axis.dim > 1:
            continue
        k = copies(axis.index)
        g = int(k.max()) + 1
        old = len(axis.index) // g
        if g == 1:
            continue
        if bool((torch.bincount(axis.index, minlength=old) != g).any()):
            raise MgrowError(f"{key}: its channels are not each copied {g} times; a template-"
                             "mixed twin cannot tile it")
        grid[axis.dim], order[axis.dim] = g, k * old + axis.index
    if grid[1] > 1 and shape[1] % grid[1] or shape[0] % grid[0]:
        raise MgrowError(f"{key}: a {tuple(shape)} weight does not split into a "
                         f"{grid[0]} x {grid[1]} grid of tiles")
    return (grid[0], grid[1]), (order[0], order[1])


def _call_order(model: nn.Module, shape: tuple[int, ...]) -> list[nn.Module]:
    """Return the weighted layers in the order one forward pass runs them."""
    ran: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: ran.append(m))
             for m in model.modules() if _mixed_attr(m) is not None]
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(shape, device=device))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return ran


def twin(model: nn.Module, mixing: MixingSpec, shape: tuple[int, ...],
         plan: Plan | None = None) -> nn.Module:
    """Make `model` template-mixed in place and return it: banks and coefficients are
    uninitialised (mixing.decompose or `init_twin` fills them). `shape`: an input batch's
    shape (one forward pass finds the stem and the classifier); `plan`: how the network
    was grown (its factor must be the spec's), None for an ungrown grid."""
    if plan is not None and plan.factor != mixing.factor:
        raise MgrowError(f"a network grown by {plan.factor} cannot hold a grid of "
                         f"{mixing.factor} x {mixing.factor} tiles")
    # a container at the top would run (or list) the banks as one of its layers
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise MgrowError(f"a network whose top module is an nn.{type(model).__name__} "
                         "cannot hold template banks (its banks would be one of its layers)")
    ran = _call_order(model, shape)
    stem, head = (ran[0], ran[-1]) if ran else (None, None)
    banks, groups = nn.ParameterList(), []  # groups: [templates, layers, device]
    for path, m in model.named_modules():
        attr = _mixed_attr(m)
        if attr is None:
            continue
        w = m._parameters[attr]
        grid, order = _layout(plan, f"{path}.{attr}".lstrip("."), tuple(w.shape))
        role: Role = "head" if m is head else "stem" if m is stem else "inner"
        tile = (w.shape[0] // grid[0], w.shape[1] // grid[1], *w.shape[2:])
        del m._parameters[attr]
        m.__class__ = twin_class(type(m), attr)
        m.mixed_attr, m.grid, m.role, m.tile_shape, m.order = attr, grid, role, tile, order
        m.axis = "col" if role == "head" or (role == "inner" and mixing.tiling == "horizontal"
                                             and grid[1] > 1) else "row"
        last = groups[-1][1] if groups else None
        if (role == "inner" and mixing.sharing == "pairs" and last is not None
                and len(last) == 1 and last[0].role == "inner"
                and type(last[0]) is type(m) and last[0].tile_shape == tile):
            last.append(m)
            groups[-1][0] += mixing.templates
        else:
            t = mixing.templates if role == "inner" else mixing.edge_templates
            groups.append([t, [m], w.device])
    for t, layers, device in groups:
        banks.append(nn.Parameter(torch.empty(mixing.members, t, *layers[0].tile_shape,
                                              device=device)))
    model.banks = banks
    for n, (t, layers, _) in enumerate(groups):
        for m in layers:
            m.bind(banks, n, torch.empty(*m.grid, t, device=banks[n].device),
                   trainable=not (m.role != "inner" and mixing.freeze_edges))
    return model


def init_twin(model: nn.Module, gen: torch.Generator) -> None:
    """Initialise a twin's banks and coefficients afresh, as mgrow's own families are
    (templates drawn like plain weights, each bank's layers orthonormal coefficient rows)."""
    layers: dict[int, list[nn.Module]] = {}
    for m in mixed_layers(model).values():
        layers.setdefault(m.bank_index, []).append(m)
    with torch.no_grad():
        for n, bank in enumerate(model.banks):
            for member in bank:
                for template in member:
                    init_weight_(template)
            q = random_orthogonal(bank.shape[1], gen).float()
            for row, m in enumerate(layers[n]):
                m.alpha.copy_(q[row].expand(*m.grid, -1))
