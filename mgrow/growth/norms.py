"""BatchNorm statistics after growth: a data-free correction (`fuse --bn-correct`) and a
recalibration on training batches (`finetune --bn-recalibrate N`).

Why: `fuse` carries every member's BN running statistics onto its channel block, but the new
tiles add to every BN's input, so the statistics no longer describe it and a grown net
evaluates far below what its weights can do (on CIFAR-10 the orthogonal init falls to
chance until BN is recalibrated).

The correction, derived. Channel k of a grown BN belongs to block b = k // C, whose
statistics were carried from block `sources[b]` of member j (growth.grid.block_sources: the
map of the method that built the grid, e.g. member b mod m for a first fuse); its input is
u = u_c + u_n, what member j's own layers compute plus what the new tiles add. Member
j's running statistics (mu, sigma^2) are the moments of u_c on the training data; those
of u are wanted without data. Model the grown input, per
channel, as an affine function of the member's, u ~ a u_c + b. Then

    E[u] = a mu + b,   Var[u] = a^2 sigma^2                                       (1)

and a, b are fitted on a *proxy*: n inputs passed through member j and through the grown
net in eval mode. With proxy moments (m_c, v_c) of u_c in the member and (m, v) of u in the
grown net, matching the first two moments gives

    a = sqrt(v / v_c),   b = m - a m_c.                                            (2)

The grown net's BN layers are corrected in network order during one proxy pass (a forward
pre-hook sets each layer's statistics by (1)-(2) before it runs), so each layer's u is
measured downstream of layers already corrected, as it will be at evaluation. On the proxy,
every corrected layer then standardises its input exactly as the member's layer does:
(m - E[u]) / sqrt(Var[u]) = (m_c - mu) / sigma and v / Var[u] = v_c / sigma^2. Where new
tiles add nothing (`--init zero`, Net2Net without noise) a = 1 and b = 0 up to round-off:
the correction changes nothing. Weights and BN affine parameters are never touched.

The proxy must excite the members' filters as data would, or (2) is fitted on the wrong
inputs: white noise (the normalised data's first two moments, mean 0 and variance 1 per
channel) leaves the statistics off by a factor of ~3 in variance on real images. So the
proxy is *distilled* from the members themselves (as ZeroQ, Cai et al. 2020, does for
quantisation): starting from white noise, PROXY_STEPS Adam steps on the inputs minimise,
over every BN layer of every member, mean((m_c - mu)^2 / sigma^2) + mean(log(v_c /
sigma^2)^2), plus the same terms for the inputs against mean 0, variance 1. The members'
BN layers then see inputs whose statistics are their running ones, as on data; no data is
read. Measured on real CIFAR-10 images (tests/test_bn_growth.py): mean |log(actual /
running variance)| over a grown net's BN channels 4.5 raw, 1.1 corrected on white noise,
0.2 corrected on the distilled proxy (recalibrating on data: 0.04).

Owns `correct_norms`, `fit_norms`, `recalibrate`. Imports mgrow.data (batches) and
growth.grid.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..data import Data, batches
from .grid import Sources

PROXY_IMAGES = 64  # proxy inputs for the correction
PROXY_STEPS = 30  # Adam steps that distil them from the members' BN statistics
PROXY_LR = 0.1
EPS = 1e-12  # floor of a proxy variance (a channel that is always 0)

Norm = nn.modules.batchnorm._BatchNorm


def norm_layers(model: nn.Module) -> dict[str, Norm]:
    """Return the model's BatchNorm layers by name, in network order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Norm)}


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-channel mean and (biased) variance of a (N, C, ...) tensor, float64."""
    x = x.double().transpose(0, 1).reshape(x.shape[1], -1)  # (C, N * ...)
    return x.mean(1), x.var(1, unbiased=False)


def proxy_inputs(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Return standard normal inputs (N, C, H, W): the normalised data's first two moments
    per channel."""
    return torch.randn(shape, generator=gen)


def distilled_inputs(members: list[nn.Module], shape: tuple[int, ...], gen: torch.Generator,
                     steps: int) -> torch.Tensor:
    """Return proxy inputs (N, C, H, W) that make every member's BN layers see their running
    statistics (the module docstring's distillation); the members are left unchanged."""
    x = proxy_inputs(shape, gen).requires_grad_()
    opt = torch.optim.Adam([x], lr=PROXY_LR)
    frozen = [(p, p.requires_grad) for m in members for p in m.parameters()]
    modes = [m.training for m in members]
    for p, _ in frozen:
        p.requires_grad_(False)

    def misfit(u: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        u = u.transpose(0, 1).flatten(1)  # (C, N * H * W)
        return (((u.mean(1) - mu) ** 2 / var).mean()
                + (u.var(1, unbiased=False).clamp_min(EPS) / var).log().pow(2).mean())

    terms: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(
        lambda layer, args: terms.append(misfit(args[0], layer.running_mean,
                                                layer.running_var.clamp_min(EPS))))
        for m in members for layer in norm_layers(m).values()]
    ones = torch.ones(shape[1])
    try:
        for _ in range(steps):
            terms.clear()
            for m in members:
                m.eval()(x)
            loss = torch.stack(terms).mean() + misfit(x, 0 * ones, ones)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
        for m, mode in zip(members, modes):
            m.train(mode)
    return x.detach()


@torch.no_grad()
def proxy_moments(model: nn.Module, x: torch.Tensor,
                  on_input: Callable[[str, Norm, torch.Tensor], None] | None = None
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return each BN layer's input moments (mean, var) (C,) on `x`, in eval mode.

    `on_input(name, layer, input)` runs first (before the layer computes), and may change
    the layer's statistics.
    """
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str) -> Callable:
        def pre(layer: Norm, args: tuple) -> None:
            found[name] = _moments(args[0])
            if on_input is not None:
                on_input(name, layer, args[0])
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in norm_layers(model).items()]
    was = model.training
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return found


def correct_norms(grown: nn.Module, members: list[nn.Module], input_shape: tuple[int, ...],
                  gen: torch.Generator, steps: int | None = None,
                  sources: Sources | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Set the grown net's BN running statistics by (1)-(2) of the module docstring on a
    proxy distilled in `steps` steps (None: PROXY_STEPS; 0: white noise); return
    fit_norms's record (`sources`: where each block came from, see fit_norms).

    `input_shape` (C, H, W) is one input's; PROXY_IMAGES proxy inputs are drawn from `gen`.
    """
    if not norm_layers(members[0]):
        return {}
    shape = (PROXY_IMAGES, *input_shape)
    steps = PROXY_STEPS if steps is None else steps
    x = distilled_inputs(members, shape, gen, steps) if steps else proxy_inputs(shape, gen)
    return fit_norms(grown, members, x, sources)


def fit_norms(grown: nn.Module, members: list[nn.Module], x: torch.Tensor,
              sources: Sources | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Set the grown net's BN running statistics by (1)-(2) fitted on proxy inputs `x`;
    return the proxy moments per layer: {name: {a, b, member_mean, member_var, mean, var}}.

    Channel block b of the grown net is fitted against `sources[b]` = (member, block of that
    member): the map the method that built the grid carried the statistics by
    (growth.grid.block_sources, Result.sources). None: block b is member b mod m's whole width."""
    m = len(members)
    ref = [proxy_moments(member, x) for member in members]
    stats = [{n: (layer.running_mean.double(), layer.running_var.double())
              for n, layer in norm_layers(member).items()} for member in members]
    fits: dict[str, dict[str, torch.Tensor]] = {}

    def correct(name: str, layer: Norm, u: torch.Tensor) -> None:
        srcs = sources or [(b % m, 0) for b in range(
            layer.num_features // ref[0][name][0].numel())]
        size = layer.num_features // len(srcs)  # channels of one block

        def blocks(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([parts[i].reshape(-1, size)[k] for i, k in srcs])
        m_c, v_c = (blocks([r[name][i] for r in ref]) for i in (0, 1))
        mu, var = (blocks([s[name][i] for s in stats]) for i in (0, 1))
        mean_u, var_u = _moments(u)
        a = (var_u.clamp_min(EPS) / v_c.clamp_min(EPS)).sqrt()
        b = mean_u - a * m_c
        layer.running_mean.copy_(a * mu + b)
        layer.running_var.copy_(a * a * var)
        fits[name] = {"a": a, "b": b, "member_mean": m_c, "member_var": v_c,
                      "mean": mean_u, "var": var_u}

    proxy_moments(grown, x, correct)
    return fits


@torch.no_grad()
def recalibrate(model: nn.Module, data: Data, n_batches: int, batch_size: int, seed: int,
                device: torch.device | str = "cpu") -> int:
    """Re-estimate every BN layer's running statistics from `n_batches` training batches
    (forward in train mode, no weight update); return the images seen.

    The statistics are reset and averaged over the batches with equal weight (momentum
    None), so the result does not depend on what they held before. The batches are the
    first of the run's epoch 0 (same order and augmentation).
    """
    layers = list(norm_layers(model).values())
    if not layers or n_batches <= 0:
        return 0
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    was = model.training
    model.to(device).train()
    seen = 0
    try:
        for b, (x, _) in enumerate(batches(data, True, batch_size, 0, seed)):
            if b == n_batches:
                break
            model(x.to(device))
            seen += len(x)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was)
    return seen
