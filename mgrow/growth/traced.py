"""Growth along an observed plan: builders' networks (torchvision:, timm:) and `zero`.

mgrow.arch.widen watches a probe copy of the network run and grows every channel axis by
g, whatever Python code wires its layers; this module turns that into `fuse`'s output:
`net2net` (every unit copied, its readers share the weight: the function is kept, also
with --noise, which perturbs the shares), `zero` (new units with zero fan-out: the function
is kept unless a LayerNorm or GroupNorm averages over grown channels), `random`.

Owns `grow`. Imports mgrow.arch (widen, plans), bundle, errors, manifest.
"""

from __future__ import annotations

import torch

from ..arch.plans import METHODS, apply
from ..arch.widen import plan
from ..bundle import Bundle
from ..errors import MgrowError
from ..manifest import Growth, Manifest


def grow(members: list[Bundle], factor: int, method: str, noise: float, seed: int,
         bn_correct: bool) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Return the manifest and tensors of members[0] grown `factor` times wider."""
    if len(members) != 1:
        raise MgrowError(f"--method {method} widens one network; give only A")
    first = members[0]
    name = first.manifest.arch.name
    if method not in METHODS:
        raise MgrowError(f"--method {method} does not grow {name} yet: use one of "
                         f"{', '.join(METHODS)}")
    if first.manifest.mixing is not None:
        raise MgrowError(f"{first.path}: template-mixed; --method {method} grows a plain "
                         "network (`mgrow export` writes one)")
    if bn_correct:
        raise MgrowError("--bn-correct corrects mixture and grid growth; --method "
                         f"{method} copies every unit's statistics with it")
    arch = first.manifest.arch
    model = first.model().eval()
    example = torch.zeros(2, arch.in_channels, arch.input_size, arch.input_size)
    grown = apply(model, plan(model, factor, example), method, noise, seed)
    growth = Growth(method=method, init=None, factor=factor, members=1, tiling="none",
                    seed=seed, noise=noise)
    options = {"factor": factor, "method": method, "seed": seed, "noise": noise}
    manifest = first.manifest.derived("fuse", options, (first.parent(),),
                                      arch=arch.widened(factor), growth=growth)
    return manifest, {k: v.detach().clone() for k, v in grown.state_dict().items()}
