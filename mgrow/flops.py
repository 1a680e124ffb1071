"""FLOPs, parameter counts and the training-FLOPs ledger.

Conventions (fvcore's, stated once): one fused multiply-add counts as one flop; counts are
for one image, the materialised plain network, eval mode. Template mixing adds t
multiply-adds per weight element per forward (batch-independent, about 0.03% of a
WRN forward pass at batch 64) and is not counted, as in the paper. Training one image
costs 3 x forward (forward + backward for activations and weights).

Worked example: `forward_flops(ArchSpec(name="wrn-16-1"))` is 26,923,648 (about 26.9M:
convolutions, batch norm, pooling and the classifier), so one epoch of 50,000 CIFAR images
costs 3 x 26,923,648 x 50,000 = 4.04e12 training FLOPs.

Owns `forward_flops`, `param_counts`, `ledger`, `epochs_for_budget`, `report`. Imports
mgrow.errors, manifest, arch and bundle.
"""

from __future__ import annotations

import logging
import warnings
from functools import lru_cache

import torch
from torch import nn

from .manifest import ArchSpec, Manifest, MixingSpec

REFERENCE_EPOCHS = 200  # the paper's full CIFAR schedule


def _analysis(model: nn.Module, arch: ArchSpec):
    with warnings.catch_warnings():  # fvcore uses torch.jit, which warns that it is old
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis
        logging.getLogger("fvcore").setLevel(logging.ERROR)
        x = torch.zeros(1, arch.in_channels, arch.input_size, arch.input_size)
        fca = FlopCountAnalysis(model.eval(), x)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()
    return fca


@lru_cache(maxsize=64)
def _forward(arch_json: str) -> tuple[int, tuple[tuple[str, str, int, int], ...]]:
    from .arch import build
    arch = ArchSpec.model_validate_json(arch_json)
    model = build(arch)
    fca = _analysis(model, arch)
    by_module = fca.by_module()
    rows = []
    for name, mod in model.named_modules():
        if name and not list(mod.children()) and by_module.get(name, 0):
            params = sum(p.numel() for p in mod.parameters())
            rows.append((name, type(mod).__name__, int(by_module[name]), params))
    return int(fca.total()), tuple(rows)


def forward_flops(arch: ArchSpec) -> int:
    """Return fvcore's forward FLOPs for one image of the plain network `arch` (eval mode)."""
    return _forward(arch.model_dump_json())[0]


def layer_table(arch: ArchSpec) -> list[tuple[str, str, int, int]]:
    """Return (module, type, forward FLOPs, plain parameters) for every counted leaf module."""
    return list(_forward(arch.model_dump_json())[1])


def param_counts(tensors: dict[str, torch.Tensor], arch: ArchSpec,
                 mixing: MixingSpec | None) -> dict[str, int]:
    """Return parameter counts by kind: templates, coefficients, weights, norms, biases, total.

    `plain_equivalent` is the parameter count of the plain network with the same shapes;
    buffers (running statistics) are not parameters.
    """
    from .arch import build
    model = build(arch, mixing, meta=True)  # names and shapes only
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)}
    counts = dict.fromkeys(("templates", "coefficients", "weights", "norms", "biases"), 0)
    params = {n for n, _ in model.named_parameters()} | {
        n for n in tensors if n.endswith(".alpha")}  # frozen coefficients are buffers
    for name in params:
        mod, _, leaf = name.rpartition(".")
        kind = ("templates" if mod == "banks" else "coefficients" if leaf == "alpha"
                else "norms" if mod in norms else "biases" if leaf == "bias" else "weights")
        counts[kind] += tensors[name].numel()
    counts["total"] = sum(counts.values())
    counts["plain_equivalent"] = sum(p.numel() for p in build(arch, meta=True).parameters())
    return counts


def reference_epochs_of(manifest: Manifest, reference_epochs: float | None = None) -> float:
    """Return the epochs of the 1.00X: those given, else the bundle's recorded reference (the
    one its `--budget` was set against), else REFERENCE_EPOCHS."""
    if reference_epochs is not None:
        return reference_epochs
    return manifest.reference_epochs or REFERENCE_EPOCHS


def reference_flops(manifest: Manifest, reference_epochs: float | None = None) -> int:
    """Return the training FLOPs of one full-schedule run of this architecture from scratch.

    = 3 x forward FLOPs x training images x reference epochs (the "1.00X" of the paper;
    see reference_epochs_of).
    """
    images = manifest.data.train_size if manifest.data else 0
    return int(3 * forward_flops(manifest.arch) * images
               * reference_epochs_of(manifest, reference_epochs))


def ledger(manifest: Manifest, reference_epochs: float | None = None) -> dict:
    """Return the ledger rows and totals, normalised to one full run of this architecture
    (its recorded reference unless `reference_epochs` is given)."""
    reference_epochs = reference_epochs_of(manifest, reference_epochs)
    ref = reference_flops(manifest, reference_epochs)
    base = sum(p.train_flops for p in manifest.phases if p.stage == "base")
    growth = sum(p.train_flops for p in manifest.phases if p.stage == "growth")
    norm = (lambda f: f / ref) if ref else (lambda f: None)
    return {
        "reference_flops": ref, "reference_epochs": reference_epochs,
        "rows": [{**p.model_dump(), "norm": norm(p.train_flops)} for p in manifest.phases],
        "base_flops": base, "growth_flops": growth, "base_norm": norm(base),
        "growth_norm": norm(growth), "total_norm": norm(base + growth),
        "growth_steps": growth_steps(manifest),
    }


def growth_steps(manifest: Manifest) -> list[str]:
    """Return how the net was grown, oldest first, from its lineage: each `fuse` (wider)
    and `deepen` (deeper) step in a phrase ("deepen: blocks per stage -> 2-2-2, mixture")."""
    steps = []
    for step in (*manifest.lineage.history, manifest.lineage.model_dump(exclude={"history"})):
        o = step.get("options", {})
        if step.get("operation") == "fuse":
            steps.append(f"fuse: x{o.get('factor', 2)} wider, {o.get('method', 'mixture')}")
        elif step.get("operation") == "deepen":
            depths = "-".join(map(str, o.get("depths", [])))
            steps.append(f"deepen: blocks per stage -> {depths}, {o.get('init')}")
    return steps


def epochs_for_budget(manifest: Manifest, budget: float,
                      reference_epochs: float | None = None,
                      train_size: int | None = None, input_size: int | None = None,
                      spent_now: int = 0) -> float:
    """Return the epochs of training that bring the growth FLOPs to `budget` x reference.

    The reference is the recorded training-set size; an epoch of the run being planned
    trains `train_size` images (default: the recorded size; the engine trains whole
    batches only, so pass the images of those) at `input_size` (default: the recorded
    architecture's). `spent_now`: FLOPs this run spent before training (a BN recalibration),
    charged to the budget whatever the stage.

    Worked example: a grown net whose sibling spent 0.10X, with budget 0.45X and the
    paper's 200 reference epochs, gets (0.45 - 0.10) x 200 = 70 epochs.
    """
    from .errors import MgrowError
    if manifest.data is None or manifest.data.train_size == 0:
        raise MgrowError("--budget needs the bundle's data set (pass --data)")
    ref = reference_flops(manifest, reference_epochs)
    spent = sum(p.train_flops for p in manifest.phases if p.stage == "growth") + spent_now
    left = budget * ref - spent
    if left <= 0:
        raise MgrowError(f"--budget {budget:g}X is already spent: growth so far used "
                         f"{spent / ref:.3f}X of a full run")
    arch = manifest.arch if input_size is None else manifest.arch.model_copy(
        update={"input_size": input_size})
    per_epoch = 3 * forward_flops(arch) * (train_size or manifest.data.train_size)
    return left / per_epoch


def report(path, input_size: int | None = None,
           reference_epochs: float | None = None) -> dict:
    """Return everything `mgrow flops` prints: FLOPs per layer, parameters, ledger."""
    from .bundle import load
    bundle = load(path)
    man = bundle.manifest
    arch = man.arch if input_size is None else man.arch.model_copy(
        update={"input_size": input_size})
    return {
        "bundle": str(path), "arch": man.describe(), "input_size": arch.input_size,
        "convention": "fvcore: one multiply-add = one flop; per image; eval mode; weight "
                      "generation from templates not counted",
        "forward_flops": forward_flops(arch),
        "layers": [dict(zip(("module", "type", "flops", "params"), row))
                   for row in layer_table(arch)],
        "params": param_counts(bundle.tensors, man.arch, man.mixing),
        "ledger": ledger(man, reference_epochs),
    }
