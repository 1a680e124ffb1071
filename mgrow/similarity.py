"""Linear CKA (Kornblith et al., ICML 2019) between the layers of two networks.

The paper's Figures 4-5 compare what two members learn, and what the grown net keeps of
them, with linear centred kernel alignment. For features X (n, p) and Y (n, q) of the same
n images (p and q may differ: a grown layer is wider than a member's),

    CKA(X, Y) = <K_c, L_c>_F / (||K_c||_F ||L_c||_F),   K = X X^T, L = Y Y^T,

with K_c = H K H the Gram matrix centred by H = I - 11^T / n. It lies in [0, 1], is 1 for
identical features and is invariant to orthogonal transforms and isotropic scaling of
either side (not to arbitrary invertible ones).

Features: the output of every convolution and linear layer (the classifier's logits
included), flattened per image, in the order the layers run, on the first n images of a
test split.
One forward pass of all n images computes every layer's Gram matrix inside a hook, so
memory is that of one batch of n images plus n x n per layer, whatever the layer widths:
`check_cka_fits` sizes that on the meta device (footprint.estimate) and refuses, through
limits.check_memory, a count of images whose Gram matrices would not fit, before any is
made (10,000 images of two WRN-10-2 nets: 22 matrices of 800 MB, 17.6 GB in all).

Owns `cka_models`, `linear_cka`, `check_cka_fits`, `heatmap`. Imports mgrow.errors,
limits, footprint, data and mixing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .data import Data, batches
from .errors import MgrowError
from .footprint import estimate
from .limits import check_memory
from .mixing import MixedConv2d, MixedLinear

FEATURE_LAYERS = (nn.Conv2d, nn.Linear, MixedConv2d, MixedLinear)


def centered_gram(features: torch.Tensor) -> torch.Tensor:
    """Return the centred Gram matrix H (X X^T) H (float64, (n, n)) of features (n, ...)."""
    x = features.reshape(len(features), -1).double()  # (n, p)
    x = x - x.mean(0, keepdim=True)  # centring the features centres the Gram matrix
    return x @ x.T


def cka_from_grams(k: torch.Tensor, l: torch.Tensor) -> float:
    """Return linear CKA from two centred Gram matrices (n, n)."""
    den = float(k.norm() * l.norm())
    if den == 0:
        return float("nan")  # a layer whose output does not vary over the images
    return float((k * l).sum()) / den


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Return linear CKA of features x (n, ...) and y (n, ...) of the same n images.

    Example: for x of shape (100, 64) and y = 3 * x @ q with q a 64 x 64 orthogonal
    matrix, linear_cka(x, y) is 1.0 (to float64 round-off).
    """
    if len(x) != len(y):
        raise ValueError(f"features of {len(x)} and {len(y)} images")
    return cka_from_grams(centered_gram(x), centered_gram(y))


def check_count(data: Data, n: int) -> None:
    """Raise MgrowError unless `data`'s test split holds n >= 2 images."""
    if n < 2:
        raise MgrowError(f"--images must be at least 2, not {n}")
    if n > len(data.test_y):
        raise MgrowError(f"--images {n} exceeds the {len(data.test_y)} test images of "
                         f"{data.spec.spec}")


def images(data: Data, n: int) -> torch.Tensor:
    """Return the first n test images of `data`, normalised, as one batch (n, C, H, W)."""
    check_count(data, n)
    x, _ = next(iter(batches(data, False, n, 0, 0)))
    return x


def check_cka_fits(a: nn.Module, b: nn.Module, data: Data, n: int,
                   device: torch.device | None = None) -> None:
    """Raise MgrowError (one line, naming --images and the bytes) unless `cka_models` of
    a and b (built on the meta device: nothing is allocated) on n images of `data` fits
    the memory: the n x n float64 Gram matrix of every feature layer of both nets, all
    held until the matrix is made, and one product of two, plus the two nets, the two
    batches of images (each net sees its own normalisation) and one forward pass at a
    time, with the float64 copies the widest layer's features take while its Gram matrix
    is made."""
    check_count(data, n)
    d = data.spec
    shape = (n, d.channels, d.input_size, d.input_size)
    layers, state, one_pass = 0, 0, 0
    for model in (a, b):
        widest = 0

        def size(_m: nn.Module, _i: object, y: torch.Tensor) -> None:
            nonlocal widest
            widest = max(widest, y.numel())
        hooks = [m.register_forward_hook(size) for m in model.modules()
                 if isinstance(m, FEATURE_LAYERS)]
        try:
            est = estimate(model, shape)  # one meta pass: activations at n images
        finally:
            for h in hooks:
                h.remove()
        layers += len(hooks)
        state += est.state + est.generated
        one_pass = max(one_pass, est.activations + 2 * 8 * widest)
    grams = layers * n * n * 8
    need = grams + n * n * 8 + state + one_pass + 2 * 4 * math.prod(shape)  # + K * L
    check_memory(need, f"linear CKA on --images {n} ({layers} Gram matrices of {n} x {n} "
                 f"float64, {grams:,} bytes, and a forward pass)", device)


@torch.no_grad()
def grams(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return {layer: centred Gram matrix (n, n)} of every feature layer on the batch x."""
    model.eval()
    out: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, y, name=name: out.__setitem__(
        name, centered_gram(y))) for name, m in model.named_modules()
        if isinstance(m, FEATURE_LAYERS)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


@dataclass
class CkaResult:
    layers_a: list[str]
    layers_b: list[str]
    matrix: list[list[float]]  # (len(layers_a), len(layers_b)): CKA of layer i of A, j of B
    images: int

    def matched(self) -> dict[str, float]:
        """Return CKA of the layers that have the same name in A and B, in A's order."""
        col = {name: j for j, name in enumerate(self.layers_b)}
        return {name: self.matrix[i][col[name]] for i, name in enumerate(self.layers_a)
                if name in col}


def cka_models(a: nn.Module, b: nn.Module, x: torch.Tensor,
               xb: torch.Tensor | None = None) -> CkaResult:
    """Return linear CKA between every feature layer of `a` and every one of `b` on x (b on
    `xb` when given: the same images, normalised as b was trained)."""
    ga, gb = grams(a, x), grams(b, x if xb is None else xb)
    matrix = [[cka_from_grams(ka, kb) for kb in gb.values()] for ka in ga.values()]
    return CkaResult(list(ga), list(gb), matrix, len(x))


def heatmap(result: CkaResult, path, a_label: str, b_label: str) -> None:
    """Write the CKA matrix as a PNG heat map (needs matplotlib: the `plot` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MgrowError("--png needs matplotlib: pip install 'mgrow[plot]'") from None
    na, nb = len(result.layers_a), len(result.layers_b)
    fig, ax = plt.subplots(figsize=(2 + 0.35 * nb, 1.5 + 0.35 * na))
    im = ax.imshow(result.matrix, vmin=0, vmax=1, cmap="magma", origin="lower")
    ax.set_xticks(range(nb), result.layers_b, rotation=90, fontsize=7)
    ax.set_yticks(range(na), result.layers_a, fontsize=7)
    ax.set_xlabel(b_label, fontsize=8)
    ax.set_ylabel(a_label, fontsize=8)
    ax.set_title(f"linear CKA, {result.images} test images", fontsize=9)
    fig.colorbar(im, ax=ax, label="linear CKA")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
