"""Linear CKA (Kornblith et al., ICML 2019) between the layers of two networks.

The paper's Figures 4-5 compare what two members learn, and what the grown net keeps of
them, with linear centred kernel alignment. For features X (n, p) and Y (n, q) of the same
n images (p and q may differ: a grown layer is wider than a member's),

    CKA(X, Y) = <K_c, L_c>_F / (||K_c||_F ||L_c||_F),   K = X X^T, L = Y Y^T,

with K_c = H K H the Gram matrix centred by H = I - 11^T / n: the biased HSIC estimator
(the default, and the paper's). It lies in [0, 1], is 1 for identical features and is
invariant to orthogonal transforms and isotropic scaling of either side (not to arbitrary
invertible ones). It is not 0 for unrelated features: its expectation when the images of
Y are shuffled is tr(K_c) tr(L_c) / ((n - 1) ||K_c|| ||L_c||) (0.03-0.14 for the conv
layers of two WRN-16-1 x0.5 on 512 CIFAR-10 images; 0.14-0.41 against Gaussian noise of a
layer's shape). `debiased=True` replaces K_c by the U-centred matrix of Song et al. (JMLR
2012) in the form of Szekely and Rizzo (Ann. Stat. 2014), as Kornblith's reference code
does:

    U_ij = K_ij - r_i / (n - 2) - r_j / (n - 2) + s / ((n - 1)(n - 2))  (i != j),  U_ii = 0,

with r_i the row sums of K with its diagonal set to 0 and s their total; <U_K, U_L> /
(n (n - 3)) is Song et al.'s unbiased HSIC_1, whose expectation for shuffled images is
exactly 0, so debiased CKA can be slightly negative. It needs n >= 4; U of the centred
Gram matrix is U of the raw one, so both estimators start from the same matrices.
`cka_models` also reports the floor: every entry again with B's images in a shuffled
order (one fixed seeded permutation): what the entry reads when B's features say nothing
about which image A saw, with each layer's own spectrum.

Features: the output of every convolution and linear layer (the classifier's logits
included), flattened per image, in the order the layers run, on the first n images of a
test split.
One forward pass of all n images computes every layer's Gram matrix inside a hook, so
memory is that of one batch of n images plus n x n per layer, whatever the layer widths:
`check_cka_fits` sizes that on the meta device (footprint.estimate) and refuses, through
limits.check_memory, a count of images whose Gram matrices would not fit, before any is
made (10,000 images of two WRN-10-2 nets: 22 matrices of 800 MB, 17.6 GB in all).

Owns `cka_models`, `linear_cka`, `u_centre`, `check_cka_fits`, `heatmap`. Imports
mgrow.errors, limits, footprint, data and mixing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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


def u_centre(gram: torch.Tensor) -> torch.Tensor:
    """U-centre a symmetric Gram matrix (n, n), n >= 4, in place and return it: U_ii = 0,
    U_ij = K_ij - r_i / (n - 2) - r_j / (n - 2) + s / ((n - 1)(n - 2)) for i != j, with r
    the row sums of K off its diagonal and s = sum(r). <U_K, U_L> / (n (n - 3)) is the
    unbiased HSIC of Song et al. (2012)."""
    n = len(gram)
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 images, not {n}")
    gram.fill_diagonal_(0)
    rows = gram.sum(1)
    shift = rows / (n - 2) - rows.sum() / (2 * (n - 1) * (n - 2))  # half of s's term each
    gram -= shift[:, None]
    gram -= shift[None, :]
    return gram.fill_diagonal_(0)


def cka_from_grams(k: torch.Tensor, l: torch.Tensor) -> float:
    """Return linear CKA from two centred (or two U-centred: debiased) Gram matrices."""
    den = float(k.norm() * l.norm())
    if den == 0:
        return float("nan")  # a layer whose output does not vary over the images
    return float(torch.dot(k.reshape(-1), l.reshape(-1))) / den


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Return linear CKA of features x (n, ...) and y (n, ...) of the same n images, with
    the unbiased HSIC estimator if `debiased` (n >= 4).

    Example: for x of shape (100, 64) and y = 3 * x @ q with q a 64 x 64 orthogonal
    matrix, linear_cka(x, y) is 1.0 (to float64 round-off), debiased or not.
    """
    if len(x) != len(y):
        raise ValueError(f"features of {len(x)} and {len(y)} images")
    k, l = centered_gram(x), centered_gram(y)
    return cka_from_grams(u_centre(k), u_centre(l)) if debiased else cka_from_grams(k, l)


def shuffled_order(n: int, seed: int = 0) -> torch.Tensor:
    """Return a seeded uniformly random permutation of range(n): the permutation test's
    null, under which the expected debiased CKA is exactly 0 and the biased one is
    tr(K_c) tr(L_c) / ((n - 1) ||K_c|| ||L_c||)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


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
    held until the matrix and its floor are made, and two more (one of B's, shuffled for
    the floor), plus the two nets, the two batches of images (each net sees its own
    normalisation) and one forward pass at a time, with the float64 copies the widest
    layer's features take while its Gram matrix is made."""
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
    need = grams + 2 * n * n * 8 + state + one_pass + 2 * 4 * math.prod(shape)  # + shuffled
    check_memory(need, f"linear CKA on --images {n} ({layers} Gram matrices of {n} x {n} "
                 f"float64, {grams:,} bytes, and a forward pass)", device)


@torch.no_grad()
def grams(model: nn.Module, x: torch.Tensor, debiased: bool = False
          ) -> dict[str, torch.Tensor]:
    """Return {layer: centred (U-centred if debiased) Gram matrix (n, n)} of every feature
    layer on the batch x."""
    model.eval()
    out: dict[str, torch.Tensor] = {}

    def keep(name: str, y: torch.Tensor) -> None:
        out[name] = u_centre(centered_gram(y)) if debiased else centered_gram(y)
    hooks = [m.register_forward_hook(lambda _m, _i, y, name=name: keep(name, y))
             for name, m in model.named_modules() if isinstance(m, FEATURE_LAYERS)]
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
    floor: list[list[float]] | None = None  # the same with B's images shuffled
    debiased: bool = False
    # B's name of a block of A where they differ: the same block of a deepened net
    renamed: dict[str, str] = field(default_factory=dict)

    def matched(self, matrix: list[list[float]] | None = None) -> dict[str, float]:
        """Return CKA (or the entries of `matrix`, e.g. the floor) of the layers that A and B
        both have (under one name, or in the same block of a deepened net), in A's order."""
        m = self.matrix if matrix is None else matrix
        col = {name: j for j, name in enumerate(self.layers_b)}
        out = {}
        for i, name in enumerate(self.layers_a):
            head = ".".join(name.split(".")[:2])
            twin = self.renamed[head] + name[len(head):] if head in self.renamed else name
            if twin in col:
                out[name] = m[i][col[twin]]
        return out


def cka_models(a: nn.Module, b: nn.Module, x: torch.Tensor,
               xb: torch.Tensor | None = None, debiased: bool = False) -> CkaResult:
    """Return linear CKA between every feature layer of `a` and every one of `b` on x (b on
    `xb` when given: the same images, normalised as b was trained), debiased or not, with
    its floor: every entry again with B's features of the images in a shuffled order."""
    if debiased and len(x) < 4:
        raise MgrowError(f"--debiased needs --images of at least 4, not {len(x)}")
    ga, gb = grams(a, x, debiased), grams(b, x if xb is None else xb, debiased)
    matrix = [[cka_from_grams(ka, kb) for kb in gb.values()] for ka in ga.values()]
    perm = shuffled_order(len(x)).to(x.device)
    floor_t = []
    for name in list(gb):
        gb[name] = gb[name].index_select(0, perm).index_select(1, perm)  # = grams(b, x[perm])
        floor_t.append([cka_from_grams(ka, gb[name]) for ka in ga.values()])
    floor = [list(row) for row in zip(*floor_t)]
    return CkaResult(list(ga), list(gb), matrix, len(x), floor, debiased)


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
    kind = "debiased linear CKA" if result.debiased else "linear CKA"
    ax.set_title(f"{kind}, {result.images} test images", fontsize=9)
    fig.colorbar(im, ax=ax, label=kind)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
