"""Template-mixed layers: every weight is a learned linear mix of shared templates.

Layout (one tensor each, stable names in a bundle):
- a bank `banks.N` of shape (m, t, o, i, *k): t templates of the member tile size (o, i, *k)
  for each of the m members whose templates the network holds;
- a layer's coefficients `<path>.alpha` of shape (g_out, g_in, t): one vector per tile of a
  g_out x g_in grid of member-size tiles.

Tile (r, c) is `sum_k alpha[r, c, k] * bank[owner, k]`. The owner is the member of the tile's
row (axis "row": vertical tiling, the stem) or of its column (axis "col": horizontal
tiling, the classifier), counted modulo m. Before growth g = m = 1 and a layer is an
ordinary template-mixed layer, so growth only stacks banks and enlarges coefficient grids.

The weight is summed term by term in a fixed order, elementwise: a tile of a grown layer is
then bit-equal to the member layer it came from, whatever the grid size. The generation
costs t multiply-adds per weight element per forward (about 0.03% of a WRN forward pass at
batch 64, as in the paper) and is not counted in FLOPs.

Banks are owned by the model (`model.banks`, an nn.ParameterList); a layer refers to its
bank by index in that list, so each tensor is registered (and saved, and synchronised by
DDP) exactly once, and `to_empty`, `load_state_dict(assign=True)` and the like never leave
a layer holding a stale tensor.

Builders' networks (torchvision:, timm:) keep their own modules: a `Twin` layer's class is
swapped for one whose weight is generated the same way (arch.twins makes them).

Owns `MixedLayer` (`MixedConv2d`, `MixedLinear`), `Twin`, `Builder`, `plain_state_dict`,
`decompose` (a plain state as templates and coefficients). Imports mgrow.manifest only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .manifest import MixingSpec

Role = Literal["stem", "inner", "head"]


def mix(alpha: torch.Tensor, bank: torch.Tensor, axis: str) -> torch.Tensor:
    """Return the full weight (g_out*o, g_in*i, *k) of a grid of tiles mixed from `bank`."""
    return _Mix.apply(alpha, bank, axis)


def _owned(bank: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the bank of each tile row/column (g, t, o, i, *k) and the owner index (or None)."""
    m = bank.shape[0]
    if g == m:
        return bank, None
    idx = torch.arange(g, device=bank.device) % m  # owners repeat modulo m
    return bank[idx], idx


class _Mix(torch.autograd.Function):
    """Weight generation with a term-by-term forward and a two-einsum backward.

    Forward sums alpha_k * T_k in a fixed order with plain elementwise kernels (a tile's
    value does not depend on the grid around it: carried tiles are bit-equal to the
    member's weight). Backward needs no saved intermediates: d alpha is one batched
    matmul of the weight gradient with the templates, d bank one with the coefficients,
    batched over the owner axis (rows for vertical tiling, columns for horizontal).
    """

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, bank: torch.Tensor, axis: str) -> torch.Tensor:
        g_out, g_in, t = alpha.shape  # (g_out, g_in, t)
        _, _, o, i, *k = bank.shape  # (m, t, o, i, *k)
        owned, _ = _owned(bank, g_out if axis == "row" else g_in)  # (g, t, o, i, *k)
        a = alpha.view(g_out, 1, g_in, 1, *(1,) * len(k), t)
        w = torch.empty(g_out, o, g_in, i, *k, dtype=bank.dtype, device=bank.device)
        term = torch.empty_like(w) if t > 1 else None
        for j in range(t):
            b = (owned[:, j].unsqueeze(2) if axis == "row"  # (g_out, o, 1, i, *k)
                 else owned[:, j].transpose(0, 1).unsqueeze(0))  # (1, o, g_in, i, *k)
            if j == 0:
                torch.mul(a[..., 0], b, out=w)
            else:
                torch.mul(a[..., j], b, out=term)
                w.add_(term)
        ctx.save_for_backward(alpha, bank)
        ctx.axis = axis
        return w.view(g_out * o, g_in * i, *k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        alpha, bank = ctx.saved_tensors
        g_out, g_in, t = alpha.shape
        _, _, o, i, *k = bank.shape
        row = ctx.axis == "row"
        owned, idx = _owned(bank, g_out if row else g_in)  # (g, t, o, i, *k)
        g = owned.shape[0]
        gw = grad.reshape(g_out, o, g_in, -1)  # (g_out, o, g_in, i*K)
        gw = gw.permute(0, 2, 1, 3) if row else gw.permute(2, 0, 1, 3)  # (g, g', o, i*K)
        gw = gw.reshape(g, gw.shape[1], -1)  # (g, g', o*i*K): a copy only when g' > 1
        a = (alpha if row else alpha.transpose(0, 1)).to(grad.dtype)  # (g, g', t)
        d_alpha = d_bank = None
        if ctx.needs_input_grad[0]:
            b = owned.reshape(g, t, -1).to(grad.dtype)  # (g, t, o*i*K)
            d_alpha = torch.bmm(gw, b.transpose(1, 2))  # (g, g', t)
            d_alpha = d_alpha if row else d_alpha.transpose(0, 1)
        if ctx.needs_input_grad[1]:
            d_owned = torch.bmm(a.transpose(1, 2), gw).view(g, t, o, i, *k)
            d_bank = d_owned if idx is None else torch.zeros_like(bank).index_add_(
                0, idx, d_owned.to(bank.dtype))
        return d_alpha, d_bank, None


class Banked:
    """A layer whose weight is mixed from one of the model's banks by its coefficients."""

    grid: tuple[int, int]
    axis: str
    role: Role
    tile_shape: tuple[int, ...]

    def bind(self, banks: nn.ParameterList, index: int, alpha: torch.Tensor,
             trainable: bool) -> None:
        """Attach the model's banks (by index) and this layer's coefficients (g_out, g_in, t)."""
        object.__setattr__(self, "_banks", banks)  # a reference, not a submodule
        self.bank_index = index
        if trainable:
            self.alpha = nn.Parameter(alpha)
        else:
            self.register_buffer("alpha", alpha)

    @property
    def bank(self) -> torch.Tensor:
        """Return this layer's bank (m, t, o, i, *k), looked up in the model's list each time
        so that moving or re-materialising the model's parameters never leaves it stale."""
        return self._banks[self.bank_index]


class MixedLayer(Banked, nn.Module):
    """Shared machinery of template-mixed conv and linear layers."""

    def __init__(self, in_features: int, out_features: int, kernel: tuple[int, ...],
                 grid: tuple[int, int], axis: str, role: Role, bias: bool) -> None:
        super().__init__()
        g_out, g_in = grid
        if out_features % g_out or in_features % g_in:
            raise ValueError(f"a {out_features}x{in_features} layer does not split into a "
                             f"{g_out}x{g_in} grid of tiles")
        self.grid, self.axis, self.role = grid, axis, role
        self.tile_shape = (out_features // g_out, in_features // g_in, *kernel)  # (o, i, *k)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def weight(self) -> torch.Tensor:
        """Return the generated full weight."""
        return mix(self.alpha, self.bank, self.axis)

    def extra_repr(self) -> str:
        return f"tile={self.tile_shape}, grid={self.grid}, axis={self.axis}, role={self.role}"


class Twin(Banked):
    """A builder's layer (a convolution, a Linear, nn.MultiheadAttention's packed input
    projection) whose weight `mixed_attr` is generated as a MixedLayer's is. Its class is
    swapped for a subclass (`twin_class`) in which that attribute is a property, so any code
    that reads it, the layer's own forward or its parent's, gets the generated weight.
    `order` (one index per grown axis, or None): a grown layer's channels are laid out as the
    observed plan duplicates them (arch.widen), not in tiles; row k of the weight is row
    order[0][k] of the tiled one (likewise the columns)."""

    mixed_attr: str
    order: tuple[torch.Tensor | None, torch.Tensor | None]

    def generated(self) -> torch.Tensor:
        w = mix(self.alpha, self.bank, self.axis)
        moved = self.__dict__.setdefault("_order_on", {})  # the order on each device the
        if w.device not in moved:  # weight has been on (moved once, not every forward)
            moved[w.device] = tuple(None if i is None else i.to(w.device) for i in self.order)
        for dim, index in enumerate(moved[w.device]):
            if index is not None:
                w = w.index_select(dim, index)
        return w


_TWINS: dict[tuple[type, str], type] = {}


def twin_class(cls: type, attr: str) -> type:
    """Return the subclass of `cls` whose `attr` is generated (see Twin), one per class."""
    if (cls, attr) not in _TWINS:
        _TWINS[cls, attr] = type(f"Mixed{cls.__name__}", (Twin, cls),
                                 {attr: property(Twin.generated), "__module__": __name__})
    return _TWINS[cls, attr]


class MixedConv2d(MixedLayer):
    def __init__(self, cin: int, cout: int, k: int, stride: int, padding: int, bias: bool,
                 grid: tuple[int, int], axis: str, role: Role) -> None:
        super().__init__(cin, cout, (k, k), grid, axis, role, bias)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding)


class MixedLinear(MixedLayer):
    def __init__(self, cin: int, cout: int, bias: bool, grid: tuple[int, int], axis: str,
                 role: Role) -> None:
        super().__init__(cin, cout, (), grid, axis, role, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


def init_weight_(w: torch.Tensor) -> torch.Tensor:
    """Initialise a plain weight in place: Kaiming normal (fan_out) for convs, as torchvision."""
    if w.dim() > 2:
        return nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
    return nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's default


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return a random n x n orthogonal matrix (Haar-distributed), float64."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


@dataclass
class Group:
    """Consecutive mixed layers that share one template bank."""

    layers: list[MixedLayer]
    templates: int


class Builder:
    """Makes the layers of an architecture, plain or template-mixed, and groups the banks.

    Architectures call `conv`, `linear` and `norm`; they never know how a weight is made.
    """

    def __init__(self, mixing: MixingSpec | None) -> None:
        self.mixing = mixing
        self.mixed: list[MixedLayer] = []

    def _grid(self, role: Role) -> tuple[tuple[int, int], str]:
        g = self.mixing.factor
        if role == "stem":
            return (g, 1), "row"
        if role == "head":
            return (1, g), "col"
        return (g, g), "row" if self.mixing.tiling == "vertical" else "col"

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0,
             bias: bool = False, role: Role = "inner") -> nn.Module:
        if self.mixing is None:
            return nn.Conv2d(cin, cout, k, stride, padding, bias=bias)
        grid, axis = self._grid(role)
        layer = MixedConv2d(cin, cout, k, stride, padding, bias, grid, axis, role)
        self.mixed.append(layer)
        return layer

    def linear(self, cin: int, cout: int, bias: bool = True, role: Role = "inner") -> nn.Module:
        if self.mixing is None:
            return nn.Linear(cin, cout, bias=bias)
        grid, axis = self._grid(role)
        layer = MixedLinear(cin, cout, bias, grid, axis, role)
        self.mixed.append(layer)
        return layer

    @staticmethod
    def norm(channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels)

    def groups(self) -> list[Group]:
        """Return the bank groups: at most two consecutive inner layers of one tile shape."""
        spec, out = self.mixing, []
        for layer in self.mixed:
            if layer.role != "inner":
                out.append(Group([layer], spec.edge_templates))
                continue
            last = out[-1] if out else None
            if (spec.sharing == "pairs" and last is not None and len(last.layers) == 1
                    and last.layers[0].role == "inner"
                    and type(last.layers[0]) is type(layer)
                    and last.layers[0].tile_shape == layer.tile_shape):
                last.layers.append(layer)
                last.templates += spec.templates
            else:
                out.append(Group([layer], spec.templates))
        return out

    def finalize(self, model: nn.Module, init: bool = True) -> nn.Module:
        """Create banks and coefficients, freshly initialised, and register banks on `model`.

        Templates are drawn like plain weights and each group's coefficient vectors are
        orthonormal rows, so every generated weight has the plain layer's initial
        distribution and the layers of a pair start uncorrelated. init=False leaves every
        tensor uninitialised (for shapes, or to load weights into).
        """
        if init:
            init_plain(model)
        if self.mixing is None:
            return model
        banks = nn.ParameterList()
        m = self.mixing.members
        for n, group in enumerate(self.groups()):
            bank = torch.empty(m, group.templates, *group.layers[0].tile_shape)
            if init:
                for member in bank:
                    for template in member:
                        init_weight_(template)
            banks.append(nn.Parameter(bank))
            q = (random_orthogonal(group.templates) if init
                 else torch.empty(group.templates, group.templates)).float()
            for row, layer in enumerate(group.layers):
                alpha = q[row].expand(*layer.grid, -1).clone()  # (g_out, g_in, t)
                layer.bind(banks, n, alpha, trainable=not (layer.role != "inner"
                                                           and self.mixing.freeze_edges))
        model.banks = banks
        return model


def init_plain(model: nn.Module) -> None:
    """Initialise plain layers' weights (as torchvision does), norms to identity, biases to 0."""
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            init_weight_(mod.weight)
        if isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
        if isinstance(mod, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, MixedLayer)):
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


def mixed_layers(model: nn.Module) -> dict[str, Banked]:
    """Return the model's template-mixed layers (MixedLayer, Twin) by module path, in
    construction order."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, Banked)}


def weight_key(name: str, layer: Banked) -> str:
    """Return the key of mixed layer `name`'s weight in the plain network's state_dict."""
    return f"{name}.{layer.mixed_attr}" if isinstance(layer, Twin) else f"{name}.weight"


def generated(layer: Banked) -> torch.Tensor:
    """Return a mixed layer's full weight."""
    return layer.generated() if isinstance(layer, Twin) else layer.weight()


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the state_dict of the plain network this model computes (weights generated)."""
    out: dict[str, torch.Tensor] = {}
    mixed = mixed_layers(model)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            owner, _, leaf = name.rpartition(".")
            if owner == "banks" or (owner in mixed and leaf == "alpha"):
                continue
            out[name] = tensor.detach().clone()
        for name, layer in mixed.items():
            out[weight_key(name, layer)] = generated(layer).detach().clone()
    return out


SPARES = ("random", "permuted")
CHUNK_BYTES = 64 << 20  # float64 working set of `decompose` per slice


def spare_tensor(ws: list[torch.Tensor], j: int, kind: str, gen: torch.Generator
                 ) -> torch.Tensor:
    """Return spare tensor j of a bank group with weights `ws` (mgrow.convert's docstring:
    `random`, standard normal at the weights' mean norm; `permuted`, a weight with its
    output and input channels shuffled)."""
    w = ws[j % len(ws)]
    if kind == "permuted":
        rows = torch.randperm(w.shape[0], generator=gen)
        cols = torch.randperm(w.shape[1], generator=gen)
        return w[rows][:, cols]
    scale = torch.stack([torch.linalg.vector_norm(x, dtype=torch.float64) for x in ws]).mean()
    r = torch.randn(w.shape, dtype=torch.float64, generator=gen)
    return r * (scale / r.norm().clamp_min(1e-30))


def bank_groups(model: nn.Module) -> list[list[str]]:
    """Return the paths of the mixed layers of each bank, bank by bank."""
    groups: dict[int, list[str]] = {}
    for name, layer in mixed_layers(model).items():
        groups.setdefault(layer.bank_index, []).append(name)
    return [groups[n] for n in range(len(groups))]


def decompose(mixed: nn.Module, state: dict[str, torch.Tensor], gen: torch.Generator,
              spare: str = "random", keep: tuple[nn.Module, dict[str, torch.Tensor]] | None = None
              ) -> dict[str, torch.Tensor]:
    """Return the tensors of the ungrown template-mixed network `mixed` (shapes only) that
    computes the plain state_dict `state` (mgrow.convert's docstring: templates Q^T X of
    each bank group's weights and spares X, coefficients the rows of Q; exact up to float32
    round-off). Memory: the result, the spares and float64 slices of about CHUNK_BYTES.

    `keep` (a template-mixed network and its tensors, which `state` extends: a deepened
    copy's source): a bank whose layers are exactly one of its banks' (same paths, in
    order) keeps that bank and those coefficients bit-equal instead."""
    layers = mixed_layers(mixed)
    out = {k: state[k].detach().to(v.dtype, copy=True) for k, v in mixed.state_dict().items()
           if k in state}
    kept = {}
    if keep is not None:
        kept = {tuple(names): n for n, names in enumerate(bank_groups(keep[0]))}
    for n, (bank, names) in enumerate(zip(mixed.banks, bank_groups(mixed))):
        if tuple(names) in kept and keep[1][f"banks.{kept[tuple(names)]}"].shape == bank.shape:
            out[f"banks.{n}"] = keep[1][f"banks.{kept[tuple(names)]}"].clone()
            out.update({f"{name}.alpha": keep[1][f"{name}.alpha"].clone() for name in names})
            continue
        t = bank.shape[1]
        if t < len(names):
            raise ValueError(f"{t} templates cannot represent {len(names)} layers exactly")
        ws = [state[weight_key(name, layers[name])] for name in names]
        spares = [spare_tensor(ws, j, spare, gen) for j in range(t - len(ws))]
        q = torch.eye(1, dtype=torch.float64) if t == 1 else random_orthogonal(t, gen)
        rows = max(1, CHUNK_BYTES // max(1, 8 * t * ws[0][0].numel()))
        templates = torch.empty(1, t, *ws[0].shape)  # (m=1, t, o, i, *k) float32
        for lo in range(0, ws[0].shape[0], rows):  # output channels, a slice at a time
            x = torch.stack([w[lo:lo + rows].double() for w in ws + spares])  # (t, rows, ...)
            templates[0, :, lo:lo + rows] = torch.einsum("jk,j...->k...", q, x)  # Q^T X
        out[f"banks.{n}"] = templates
        for row, name in enumerate(names):
            out[f"{name}.alpha"] = q[row].float().view(1, 1, t)  # (g_out, g_in, t)
    return out
