"""The paper's Table 1 (and its ablations) at a chosen scale, on real CIFAR-10 or ImageNet.

    python examples/replicate.py --scale cpu --seeds 3 --out examples/results/cpu
    python examples/replicate.py --scale imagenet --data imagefolder:/data/imagenet \
        --out runs/imagenet     # ResNet-50 at width 0.5 -> ResNet-50, 90 epochs, 0.35X

Every row trains through mgrow's own library (the functions behind the CLI), so every
number comes with its ledger. Rows:
  small           the starting template-mixed half-width net (E epochs; not charged)
  small-plain     the same net, plain, same recipe (to compare starting points)
  small-match     the half-width net trained from scratch for the growth rows' budget
  large           the full-width net from scratch, E epochs (1.00X), plain
  large-match     the full-width net from scratch for the growth budget, plain
  random, net2net growth baselines from `small` alone, then finetune --budget
  gradmax, firefly
                  data-driven growth baselines from `small` alone: their growth step
                  reads `growth_steps` batches and is charged to the budget, then
                  finetune --budget
  mg-nofusion     MixtureGrowth without a sibling
  mg              MixtureGrowth: sibling trained for growth point p of E epochs, fuse
                  (orthogonal, vertical), finetune --budget
  mg-init-random, mg-init-copy, mg-init-zero, mg-horizontal
                  ablations of `mg` (same sibling); zero: the grown net starts as the
                  mean of the two members (function-preserving)
  mg-point-P      the growth-point sweep (sibling trained for P x E epochs)
  mg-templates-T  `mg` from a small net and sibling with T templates per layer (a bank of a
                  pair holds 2T; `small` has 2): the lever "more templates" (issue 24)
  mg-warmup-W     `mg`'s grown net finetuned with a W-epoch warm-up (the engine clips it to
                  10% of the run; 0: the lr restarts straight at its peak after growth): the
                  lever "warm-up after growth" (issue 24)
  mg-lr-X         `mg` finetuned with peak lr X instead of the rule's (the sweep that
                  chooses the post-growth rule, down to the official code's 1e-3 and 1e-4;
                  its cost is reported per row)
  mg-converted    growth from a converted plain checkpoint: `small-plain` exported,
                  `convert`ed (default spare templates) and grown alone
  random-plain, net2net-plain   the baselines grown from the same plain checkpoint
  mg-converted-sibling
                  what README tells a user with a plain checkpoint to do: convert it, train
                  a sibling, fuse the two (the sibling is `mg`'s: train-sibling on the
                  converted bundle trains the very same weights, a fresh net of the same
                  architecture and mixing spec on the same data and seed; CI checks that)
  mg-best         the best recipe measured (BEST below) under the same post-growth rule
  ROW-lr-X        any growth row finetuned at peak lr X instead of the rule's (the same
                  grown net: net2net-lr-0.02 finetunes net2net.grown); to choose the rule
The builder scales (`mbv2-cpu`: torchvision's MobileNetV2; `builder-tiny` for CI) grow a
torchvision/timm network by 2 (small is the builder's net, large its grown layout trained
from scratch) and default to the rows its growth takes: small, mg, random, net2net,
large, small-match, large-match.
The ImageNet scales (`imagenet`, and `imagenet-tiny` for CI on a generated image folder)
grow resnet50 at half width into resnet50 on a streamed image folder (train/ and val/,
RandomResizedCrop + flip, Resize + CenterCrop at the scale's input size) and default to
the paper's ImageNet rows: small, large, large-match, random, net2net, mg.
Growth rows spend the same budget B (growth FLOPs / one large run, from the ledger: the
sibling plus the finetune) with one post-growth rule for all (the scale's `rule`: peak lr,
BN handling; `finetune`'s defaults otherwise).
Finished runs are not rerun (delete a bundle to redo it) and interrupted ones resume from
their checkpoints; rows already in --out's results.json are kept even where their bundles
are gone (a committed results.json lets a run that spans sessions and machines go on
where it stopped; a later row retrains what it needs, with the same seeds); every seed of
the main table runs before the ablations. Outputs in
--out: results.json (every run: accuracies and ledger), results.md (mean +- std per
row) and, with matplotlib, accuracy_vs_flops.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from mgrow.arch import build
from mgrow.bundle import load, save_model
from mgrow.engine import TrainConfig, evaluate
from mgrow.flops import forward_flops, reference_flops
from mgrow.growth import INITS
from mgrow.phases import fuse_files
from mgrow.manifest import ArchSpec, Lineage, Manifest, MixingSpec
from mgrow.data import DataSource
from mgrow.phases import finetune, side_files, train_new

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
RULE = dict(lr=0.1, bn_correct=False, bn_recalibrate=0)  # the 0.1.0 post-growth rule
SCALES = {  # arch (full width), train subset, E = epochs of a full run, batch, growth budget
    # tiny: the CI test's scale, laid out like cpu-v2 (pairs of blocks, BN per block); a
    # larger budget (1.2X: Firefly's search, two passes of a 2.25x-wide net over one batch,
    # costs 0.75X of this 6-step run) leaves room for finetuning steps
    "tiny": dict(arch="wrn-16-1", norm="block", subset=300, epochs=1, batch=50, budget=1.2,
                 point=0.8, growth_steps=1, rule=dict(RULE, bn_recalibrate=1)),
    "cpu": dict(arch="wrn-10-2", subset=4000, epochs=8, batch=64, budget=0.45, point=0.8),
    # the cpu scale trained ~4x longer: closer to convergence, ~30 min a seed on 2 idle cores
    "cpu-long": dict(arch="wrn-10-2", subset=4000, epochs=30, batch=64, budget=0.45,
                     point=0.8),
    "gpu": dict(arch="wrn-28-10", subset=None, epochs=200, batch=128, budget=0.45, point=0.8),
    # v2 (issue 11): banks shared by pairs (2 blocks a stage), BN per block as in the paper,
    # every training image, a net narrow enough to be capacity-bound within E = 15 epochs
    # (width must matter: WRN-16-2 at E = 5 gave Large 80.06 < Small Match 80.79, seed 0,
    # examples/results/cpu-v2-wrn16-2-e5-2026-11-28); about 2 hours a seed of the main
    # table on 2 idle cores (`--estimate`)
    "cpu-v2": dict(arch="wrn-16-1", norm="block", subset=None, epochs=15, batch=128,
                   budget=0.45, point=0.8, rule=dict(RULE, bn_correct=True, bn_recalibrate=20)),
    # the paper's ImageNet recipe: ResNet-50 x0.5 -> ResNet-50, 90 epochs, batch 256, lr 0.1
    # decayed 0.1x at epochs 30, 60, 80 (each phase's run decays at those shares of its own
    # length), 0.35X, sibling for 0.8 of a run; bf16 on CUDA. Needs --data imagefolder:DIR
    "imagenet": dict(arch="resnet50", subset=None, epochs=90, batch=256, budget=0.35,
                     point=0.8, input_size=224, amp=True, schedule="step"),
    # the same code path in CI: resnet50 x0.125 -> x0.25 at 32 px on a small image folder
    "imagenet-tiny": dict(arch="resnet50", width=0.25, subset=None, epochs=1, batch=20,
                          budget=0.35, point=0.8, input_size=32, workers=0,
                          schedule="step"),
    # a builder's network (issue 22, item 8): torchvision's MobileNetV2 grown by 2 (a traced
    # net's widths are whole factors: small is width 1, large width 2, the builder's own
    # layout doubled, which is its width_mult=2.0 net, built and initialised by the builder),
    # template-mixed twins, on 10,000 CIFAR-10 images. Peak lr 0.03 for every phase: at 0.1
    # MobileNetV2 at width_mult 0.5 never learned as Large (10.5%, seed 0,
    # examples/results/mbv2-cpu-w0.5-lr0.1-2026-12-05), and a 4-epoch probe gave 18.6% (0.1)
    # against 37.3% (0.03) at width_mult 1, 17.2% against 38.1% at 2
    "mbv2-cpu": dict(arch="torchvision:mobilenet_v2", width=2.0, subset=10000, epochs=10,
                     batch=128, budget=0.45, point=0.8, lr=0.03, rule=dict(RULE, lr=0.03)),
    # its code path in CI: timm's ResNet-10-T, 300 images, one epoch
    "builder-tiny": dict(arch="timm:resnet10t", width=2.0, subset=300, epochs=1, batch=50,
                         budget=0.45, point=0.8),
}
IMAGENET_ROWS = ("small", "large", "large-match", "random", "net2net", "mg")
# a builder's network (torchvision:, timm:): the rows its growth takes (no gradmax/firefly yet)
BUILDER_ROWS = ("small", "mg", "random", "net2net", "large", "small-match", "large-match")
# in the order they run: the question first (mg against the growth baselines, which need only
# `small`), then the references, so a run cut short by a session's end has answered the most
# it could
MAIN = ("small", "mg", "random", "net2net", "gradmax", "firefly", "large", "small-match",
        "large-match", "small-plain", "mg-best", "mg-nofusion", "mg-converted")
GROWTH_STEPS = 8  # batches of the gradmax/firefly growth step, unless a scale says otherwise
ABLATIONS = ("mg-init-random", "mg-init-copy", "mg-init-zero", "mg-horizontal",
             "random-plain", "net2net-plain", "mg-converted-sibling")
POINTS = (0.0, 0.5, 1.0)
LEVERS = ("mg-templates-4", "mg-warmup-0")  # levers of `mg` not measured before (issue 24)
LRS = (0.02, 0.05, 1e-3, 1e-4)  # post-growth peak lr sweep of `mg` (the rule's lr is `mg`)
# the candidate best recipe (fuse options): a function-preserving start (the members'
# ensemble at growth: 39.7% vs 20.2% for orthogonal, BN corrected, in
# examples/results/bn-growth-2026-11-28), level with orthogonal at cpu-long with the
# smallest spread; the v2 run decides whether it wins
BEST = dict(init="zero")
# the rows that train one net from scratch: (width, epochs as a share of E; "budget": the
# growth budget's share; "match": as many half-width epochs as the growth budget pays for)
FIXED = {"small": (0.5, 1.0), "small-plain": (0.5, 1.0), "small-match": (0.5, "match"),
         "large": (1.0, 1.0), "large-match": (1.0, "budget")}
# grown from small-plain (the converted rows from it exported and converted)
PLAIN_START = ("mg-converted", "mg-converted-sibling", "random-plain", "net2net-plain")
GROWTH = ("random", "net2net", "gradmax", "firefly", "random-plain", "net2net-plain", "mg",
          "mg-nofusion", "mg-converted", "mg-converted-sibling", "mg-horizontal", "mg-best")


def parse_row(name: str) -> tuple[str, float | None]:
    """Return a row name's base row and the post-growth peak lr its `-lr-X` suffix sets (None:
    the scale's rule); exit naming the row when it is not one this script knows."""
    base, sep, lr = name.partition("-lr-")
    kind, _, arg = base.rpartition("-")
    try:
        growth = base in GROWTH or kind == "mg-init" and arg in INITS or \
            kind == "mg-point" and 0 <= float(arg) <= 1 or \
            kind == "mg-templates" and arg.isdigit() and 1 <= int(arg) <= 64 or \
            kind == "mg-warmup" and 0 <= float(arg) <= 100
        if sep and not (growth and float(lr) > 0):
            raise ValueError
    except ValueError:
        growth = False
    if not growth and (sep or base not in FIXED):
        sys.exit(f"error: unknown row {name!r}: expected one of "
                 f"{', '.join((*FIXED, *GROWTH))}, mg-init-INIT, mg-point-P (0-1), "
                 "mg-templates-T, mg-warmup-W, or a "
                 "growth row + -lr-X (finetuned at peak lr X)")
    return base, float(lr) if sep else None


class Runner:
    """Runs (or finds) every row of one seed in `folder`."""

    def __init__(self, folder: Path, scale: dict, seed: int, data: str, quiet: bool,
                 commit: str) -> None:
        self.d, self.s, self.seed, self.commit = folder, scale, seed, commit
        self.source = DataSource(data, subset=scale["subset"],
                                 input_size=scale.get("input_size"),
                                 workers=scale.get("workers"))
        self.progress = "quiet" if quiet else "bar"
        folder.mkdir(parents=True, exist_ok=True)
        self.rule = scale.get("rule", RULE)
        self.width = scale.get("width", 1.0)  # of the large net; the small one is half

    def cfg(self, epochs: float) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.s["batch"], seed=self.seed,
                           lr=self.s.get("lr", 0.1),  # peak lr of every from-scratch run
                           amp=self.s.get("amp", False),  # bf16 on CUDA only
                           schedule=self.s.get("schedule", "cosine"),
                           eval_every_epoch=False)  # one full test-set pass, at the end

    def path(self, name: str) -> Path:
        return self.d / f"{name}.safetensors"

    def run_options(self, name: str) -> dict:
        """Progress mode, and resume when an interrupted run left its checkpoint."""
        return {"progress": self.progress, "resume": side_files(self.path(name))[0].exists()}

    def train(self, name: str, width: float, epochs: float, mixed: bool = True) -> Path:
        """Train row `name` from scratch (small-templates-T: `small` with T templates)."""
        if not self.path(name).exists():
            kind, _, t = name.rpartition("-")
            mixing = MixingSpec(templates=int(t)) if kind == "small-templates" else \
                MixingSpec() if mixed else None
            train_new(self.s["arch"], self.source, self.cfg(epochs), self.path(name),
                      mixing=mixing, width=width * self.width,
                      norm=self.s.get("norm", "every"), options=self.s.get("options"),
                      **self.run_options(name))
        return self.path(name)

    def sibling(self, point: float, start: str = "small") -> Path:
        """The sibling of `start` trained for `point` x E epochs (0: untrained, fresh
        templates)."""
        name = f"sibling-{point:g}" + start.removeprefix("small")
        path = self.path(name)
        if path.exists():
            return path
        small = load(self.train(start, 0.5, self.s["epochs"]))
        if point == 0:
            man = small.manifest
            fresh = Manifest(arch=man.arch, mixing=man.mixing, data=man.data,
                             lineage=Lineage(operation="init", parents=(small.parent(),)))
            save_model(path, fresh, build(man.arch, man.mixing, seed=self.seed + 1000))
            return path
        from mgrow.phases import train_sibling
        cfg = self.cfg(point * self.s["epochs"]).model_copy(update={"seed": self.seed + 1000})
        train_sibling(small.path, self.source, cfg, path, **self.run_options(name))
        return path

    def grow(self, name: str, sibling: Path | None, lr: float | None = None,
             start: str = "small", warmup: float | None = None,
             **options) -> tuple[Path, float]:
        """Fuse `start` (and `sibling`) and finetune to the budget under the post-growth
        rule (at peak lr `lr` and a `warmup`-epoch warm-up where given); return the final
        bundle and growth-point top-1 (BN as fused)."""
        mixed = start.startswith("small") and start != "small-plain"
        small = self.converted() if start == "converted" else self.train(
            start, 0.5, self.s["epochs"], mixed=mixed)
        grown = self.grown(name)
        if not grown.exists():
            fuse_files(small, sibling, grown, seed=self.seed,
                       bn_correct=self.rule["bn_correct"], **options)
        at_growth = self.eval(grown)
        if not self.path(name).exists():
            cfg = self.cfg(1.0).model_copy(update={"lr": lr or self.rule["lr"]})
            if warmup is not None:
                cfg = cfg.model_copy(update={"warmup_epochs": warmup})
            finetune(grown, self.source, cfg, self.path(name),
                     budget=self.s["budget"], reference_epochs=self.s["epochs"],
                     bn_recalibrate=self.rule["bn_recalibrate"], **self.run_options(name))
        return self.path(name), at_growth

    def grown(self, name: str) -> Path:
        """The grown net a growth row finetunes (ROW-lr-X shares ROW's, mg-warmup-W `mg`'s)."""
        base = name.partition("-lr-")[0]
        return self.d / f"{'mg' if base.startswith('mg-warmup-') else base}.grown.safetensors"

    def converted(self) -> Path:
        """`small-plain` as a user's plain checkpoint: exported, then `convert`ed."""
        path = self.path("small-converted")
        if not path.exists():
            from mgrow.bundle import export_plain, save
            from mgrow.convert import convert_checkpoint
            plain = load(self.train("small-plain", 0.5, self.s["epochs"], mixed=False))
            exported = export_plain(plain.path, self.d / "small-plain.export.safetensors",
                                    force=True)
            a = plain.manifest.arch
            convert_checkpoint(exported, a.name, path, num_classes=a.num_classes,
                               width=a.width, norm=a.norm, in_channels=a.in_channels,
                               input_size=a.input_size, seed=self.seed, force=True)
            b = load(path)  # it was trained on the plain net's data: record it
            save(path, b.manifest.model_copy(update={"data": plain.manifest.data,
                                                     "phases": plain.manifest.phases}),
                 b.tensors, force=True)
        return path

    def eval(self, path: Path) -> float:
        """Top-1 on the test split: the trained bundle's own final accuracy from its ledger,
        or (for a bundle just grown, with no training yet) one evaluation, cached."""
        b = load(path)
        phases = b.manifest.phases
        if phases and phases[-1].accuracy is not None and ".grown." not in path.name:
            return phases[-1].accuracy
        cache = path.with_name(path.name + ".top1")  # "sha256 top1": of this very bundle
        known = cache.read_text().split() if cache.exists() else []
        if len(known) != 2 or known[0] != b.sha256:
            data = self.source.load(b.manifest.data)
            known = [b.sha256, repr(evaluate(b.model(), data)[0])]
            cache.write_text(" ".join(known))
        return float(known[1])

    def small_arch(self) -> ArchSpec:
        """The half-width net's architecture (classes and input size from the data), as
        `train` makes it: read from its bundle where trained, else from the data alone (a
        row recorded by another machine is not retrained just to read this)."""
        if self.path("small").exists():
            return load(self.path("small")).manifest.arch
        d = self.source.load().spec
        return ArchSpec(name=self.s["arch"], width=0.5 * self.width, num_classes=d.num_classes,
                        in_channels=d.channels, input_size=d.input_size,
                        norm=self.s.get("norm", "every"), options=self.s.get("options", {}))

    def budget_epochs(self) -> float:
        """Epochs of the half-width net that cost the growth budget (Small Match)."""
        small = self.small_arch()
        ratio = forward_flops(small.widened(2)) / forward_flops(small)
        return self.s["budget"] * self.s["epochs"] * ratio

    def row(self, name: str) -> dict:
        E, at_growth = self.s["epochs"], None
        base, lr = parse_row(name)
        if base in FIXED:
            width, share = FIXED[base]
            epochs = self.budget_epochs() if share == "match" else \
                self.s["budget"] * E if share == "budget" else share * E
            path = self.train(base, width, epochs, mixed=base in ("small", "small-match"))
        elif base in ("random", "net2net"):
            path, at_growth = self.grow(name, None, lr, method=base)
        elif base in ("gradmax", "firefly"):
            path, at_growth = self.grow(name, None, lr, method=base, source=self.source,
                                        batch_size=self.s["batch"],
                                        steps=self.s.get("growth_steps", GROWTH_STEPS))
        elif base in ("random-plain", "net2net-plain"):
            path, at_growth = self.grow(name, None, lr, method=base.partition("-")[0],
                                        start="small-plain")
        elif base == "mg-nofusion":
            path, at_growth = self.grow(name, None, lr)
        elif base in ("mg-converted", "mg-converted-sibling"):
            sibling = self.sibling(self.s["point"]) if base == "mg-converted-sibling" else None
            path, at_growth = self.grow(name, sibling, lr, start="converted")
        else:
            point = float(base.rpartition("-")[2]) if base.startswith("mg-point-") \
                else self.s["point"]
            options = {"tiling": "horizontal"} if base == "mg-horizontal" else \
                dict(BEST) if base == "mg-best" else {}
            if base.startswith("mg-init-"):
                options = {"init": base.rpartition("-")[2]}
            if base.startswith("mg-warmup-"):
                options = {"warmup": float(base.rpartition("-")[2])}
            start = f"small-{base.removeprefix('mg-')}" if base.startswith("mg-templates-") \
                else "small"
            path, at_growth = self.grow(name, self.sibling(point, start), lr, start=start,
                                        **options)
        man = load(path).manifest
        ref = reference_flops(man.model_copy(update={"arch": self.small_arch().widened(2)}), E)
        charged = [p for p in man.phases if p.stage == "growth"] if at_growth is not None \
            else list(man.phases)
        start = "small-plain" if base in PLAIN_START else \
            f"small-{base.removeprefix('mg-')}" if base.startswith("mg-templates-") else "small"
        grew = at_growth is not None
        return {"row": name, "seed": self.seed, "date": datetime.date.today().isoformat(),
                "top1": self.eval(path),
                "top1_at_growth": at_growth, "start_top1": self.eval(self.path(start))
                if grew else None, "commit": commit_of(path, self.commit),
                # the weights it grew from: rows of one seed pair exactly only if these agree
                "start_sha256": weights_sha(self.path(start)) if grew else None,
                "grown_sha256": weights_sha(self.grown(name)) if grew else None,
                "flops_norm": sum(p.train_flops for p in charged) / ref,
                "ledger": [p.model_dump() for p in man.phases]}


def weights_sha(path: Path) -> str:
    """Return the first 16 hex digits of the sha256 of a bundle's tensors (sorted by name):
    the same for a net retrained bit-for-bit, whatever its manifest's timings say."""
    import hashlib
    h = hashlib.sha256()
    for name, t in sorted(load(path).tensors.items()):
        h.update(name.encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def estimate(scale: dict, data: str, steps: int = 3) -> dict[str, float]:
    """Return the estimated seconds of each main-table row of one seed at `scale`, from
    training-step and evaluation times measured here on real batches (mean of `steps` steps
    after one warm-up step)."""
    import time

    from mgrow.bundle import Bundle
    from mgrow.data import batches, load_data
    from mgrow.engine import param_groups
    from mgrow.growth import fuse

    d = load_data(data)
    n = scale["subset"] or len(d.train_y)
    x, y = next(batches(d, True, scale["batch"], 0, 0))
    norm = scale.get("norm", "every")
    small, large = (ArchSpec(name=scale["arch"], width=w * scale.get("width", 1.0), norm=norm,
                             options=scale.get("options", {})) for w in (0.5, 1.0))
    fresh = [Bundle(Manifest(arch=small, mixing=MixingSpec(), lineage=Lineage(operation="init")),
                    build(small, MixingSpec(), seed=s).state_dict(), Path("x"), str(s) * 64)
             for s in (1, 2)]  # (valid, distinct sha256s for the lineage; nothing is written)
    grown = fuse(fresh)
    nets = {"small": build(small, MixingSpec()), "small-plain": build(small),
            "large": build(large), "grown": Bundle(grown.manifest, grown.tensors, Path("g"),
                                                   "").model()}

    def per_image(net: torch.nn.Module) -> float:
        opt = torch.optim.SGD(param_groups(net, 5e-4), lr=0.01, momentum=0.9)
        for k in range(steps + 1):
            if k == 1:
                t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / steps / len(y)

    t = {k: per_image(v) for k, v in nets.items()}
    with torch.no_grad():
        t0 = time.perf_counter()
        nets["large"].eval()(x)
        test = (time.perf_counter() - t0) / len(y) * len(d.test_y)  # one full test pass
    E, B, p = scale["epochs"], scale["budget"], scale["point"]
    r = forward_flops(large) / forward_flops(small)
    grow = B * E * n * t["grown"] + 2 * test
    rows = {"small": E * n * t["small"], "small-plain": E * n * t["small-plain"],
            "small-match": B * E * r * n * t["small"], "large": E * n * t["large"],
            "large-match": B * E * n * t["large"], "random": grow, "net2net": grow,
            "gradmax": grow, "firefly": grow, "mg-nofusion": grow, "mg-converted": grow,
            "mg": p * E * n * t["small"] + (B * E - p * E / r) * n * t["grown"] + 2 * test}
    rows["mg-best"] = rows["mg"]
    return {k: v + test for k, v in rows.items()}


def summarise(runs: list[dict], scale_name: str, scale: dict) -> str:
    """Return the Markdown table: mean +- std per row over seeds."""
    rows: dict[str, list[dict]] = {}
    for r in runs:
        rows.setdefault(r["row"], []).append(r)

    def ms(values: list[float]) -> str:
        values = [100 * v for v in values if v is not None]
        if not values:
            return ""
        if len(values) == 1:  # one seed: no spread to show
            return f"{values[0]:.2f}"
        return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"

    lines = ["| row | top-1 % | at growth % (BN as fused) | gain over start (pts) | FLOPs Norm "
             "| seeds |",
             "|---|---|---|---|---|---|"]
    for name, rs in rows.items():
        gains = [r["top1"] - r["start_top1"] for r in rs if r["start_top1"] is not None]
        lines.append(f"| {name} | {ms([r['top1'] for r in rs])} | "
                     f"{ms([r['top1_at_growth'] for r in rs])} | "
                     f"{ms(gains) if gains else ''} | "
                     f"{statistics.mean(r['flops_norm'] for r in rs):.3f}X | {len(rs)} |")
    return "\n".join(lines)


# what `results.md` tests, paired by seed: MixtureGrowth against every other way to spend the
# growth budget (and Large), and growth of a converted plain checkpoint against the baselines
# grown from the same checkpoint
VERDICTS = {"mg": ("random", "net2net", "gradmax", "firefly", "mg-nofusion", "mg-best",
                   "small-match", "large-match", "large"),
            "mg-converted": ("random-plain", "net2net-plain"),
            "mg-converted-sibling": ("random-plain", "net2net-plain", "mg-converted")}


def verdict(runs: list[dict], row: str = "mg", others: tuple[str, ...] = VERDICTS["mg"]) -> str:
    """Return Markdown: `row` minus each of `others`, paired by seed (mean and std of the
    per-seed difference), and whether `row` is ahead by more than two standard deviations of
    that difference (the issue-11 test; called from 3 seeds on: with 2, mean > 2 sd is t >
    2.8 on one degree of freedom, p about 0.1). Warns where the growth rows compared on one
    seed grew from different starting nets (retrained elsewhere). Empty when no seed has
    `row` and one of `others`."""
    top1 = {(r["seed"], r["row"]): 100 * r["top1"] for r in runs}
    lines = [f"`{row}` minus each row, paired by seed (points; ahead by > 2 sd of the "
             "difference?):", ""]
    starts: dict[tuple[int, str], set[str]] = {}
    for r in runs:
        if r.get("start_sha256") and r["row"] in (row, *others):
            start = "small-plain" if parse_row(r["row"])[0] in PLAIN_START else "small"
            starts.setdefault((r["seed"], start), set()).add(r["start_sha256"])
    for other in others:
        diffs = [top1[s, row] - top1[s, other] for s, name in top1
                 if name == other and (s, row) in top1]
        if not diffs or other == row:
            continue
        if len(diffs) < 2:
            lines.append(f"- {other}: {diffs[0]:+.2f} (1 seed: no spread yet)")
            continue
        mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
        call = ("yes" if mean > 2 * sd else "no") if len(diffs) >= 3 else "too few seeds to call"
        lines.append(f"- {other}: {mean:+.2f} +- {sd:.2f} over {len(diffs)} seeds: {call}")
    for (seed, start), shas in sorted(starts.items()):
        if len(shas) > 1:
            lines.append(f"- warning: seed {seed}'s growth rows grew from {len(shas)} different "
                         f"{start} nets ({', '.join(sorted(shas))}): retrained, not bit for "
                         "bit (another machine?), so they do not pair exactly")
    return "\n".join(lines) if len(lines) > 2 else ""


def plot(runs: list[dict], path: Path) -> bool:
    """Write top-1 against normalised training FLOPs (the paper's Figure 3a); False if no
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    names = sorted({r["row"] for r in runs}, key=[r["row"] for r in runs].index)
    for i, name in enumerate(names):  # 10 colours x 4 markers: no two rows look alike
        rs = [r for r in runs if r["row"] == name]
        x = statistics.mean(r["flops_norm"] for r in rs)
        y = [100 * r["top1"] for r in rs]
        ax.errorbar(x, statistics.mean(y), yerr=statistics.stdev(y) if len(y) > 1 else 0,
                    fmt="osD^"[i // 10 % 4], color=plt.get_cmap("tab10")(i % 10), capsize=3,
                    label=name)
    ax.set_xlabel("training FLOPs (1.00X = large from scratch)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=SCALES, default="cpu")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/replicate"))
    p.add_argument("--data", help="data set spec; a relative path is taken from the "
                   f"project root [default: npz:{os.path.relpath(CIFAR, ROOT)}; the imagenet "
                   "scales need imagefolder:FOLDER with train/ and val/]")
    p.add_argument("--rows", default="main", help="main (imagenet scales: the paper's "
                   "ImageNet rows); paper (main + ablations + post-growth lr sweep); all "
                   "(paper + growth points + levers); or a comma-separated list of rows, where any "
                   "growth row + -lr-X (say net2net-lr-0.02) is that row finetuned at peak lr X")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report-only", action="store_true", help="train nothing: tabulate the "
                   "rows already finished in --out")
    p.add_argument("--estimate", action="store_true", help="train nothing: time a few steps "
                   "of each network here and print the hours one seed of the main table "
                   "would take at --scale")
    a = p.parse_args(argv)
    scale = SCALES[a.scale]
    imagenet = a.scale.startswith("imagenet")
    if a.data is None and imagenet:
        p.error(f"--scale {a.scale} needs --data imagefolder:FOLDER (train/CLASS/*.jpg and "
                "val/CLASS/*.jpg; examples/image_folder.py writes a small one)")
    a.data = a.data or f"npz:{os.path.relpath(CIFAR, ROOT)}"
    main_rows = IMAGENET_ROWS if imagenet else BUILDER_ROWS if ":" in scale["arch"] else MAIN
    if a.estimate:
        secs = estimate(scale, load_spec(a.data))
        for name, v in secs.items():
            print(f"{name:14s} {v / 60:7.1f} min")
        print(f"one seed of the main table: {sum(secs.values()) / 3600:.2f} h "
              f"({torch.get_num_threads()} threads)")
        return
    extra = ABLATIONS + tuple(f"mg-lr-{x:g}" for x in LRS)
    points = tuple(f"mg-point-{x:g}" for x in POINTS) + LEVERS
    stages = {"main": [main_rows], "paper": [main_rows, extra],
              "all": [main_rows, extra, points]}.get(
        a.rows, [tuple(a.rows.split(","))])
    for names in stages:
        for name in names:
            parse_row(name)  # every name checked before anything trains
    # rows recorded in --out's results.json (say, committed by an earlier session on another
    # machine) are kept and not rerun: a long replica continues across machines row by row
    runs = recorded_runs(a.out / "results.json", a.scale)
    commit = current_commit()  # the code this process runs: each row it trains records it
    for names in stages if not a.report_only else ():  # --report-only: tabulate what
        for seed in range(a.seeds):  # results.json records; every seed of the main table
            runner = Runner(a.out / f"seed{seed}", scale, seed, load_spec(a.data), a.quiet,
                            commit)  # first, then the ablations
            for name in names:
                if (seed, name) in runs and not runner.path(name).exists():
                    continue
                print(f"[seed {seed}] {name}", file=sys.stderr, flush=True)
                row = runner.row(name)
                # after every row, into what the file holds now: another run writing rows
                # of its own into the same --out meanwhile keeps them
                runs = recorded_runs(a.out / "results.json", a.scale) | runs
                runs[seed, name] = row
                write_results(a, scale, list(runs.values()))
    if runs:
        runs = recorded_runs(a.out / "results.json", a.scale) | runs
        write_results(a, scale, list(runs.values()))
    print((a.out / "results.md").read_text() if runs else "no rows finished yet")


def recorded_runs(path: Path, scale: str) -> dict[tuple[int, str], dict]:
    """Return the runs an earlier invocation recorded in `path`, by (seed, row)."""
    if not path.exists():
        return {}
    meta = json.loads(path.read_text())["meta"]
    if meta["scale"] != scale:
        sys.exit(f"error: {path} holds scale {meta['scale']!r}, not {scale!r}: "
                 "choose another --out")
    changed = [k for k, v in SCALES[scale].items() if meta.get(k) != v]
    if changed:  # the scale was redefined since: its rows are not comparable
        sys.exit(f"error: {path} holds scale {scale!r} with other settings ("
                 + ", ".join(f"{k} {meta.get(k)!r}, now {SCALES[scale][k]!r}" for k in changed)
                 + "): choose another --out")
    return {(r["seed"], r["row"]): r for r in json.loads(path.read_text())["runs"]}


def current_commit() -> str:
    """Return HEAD's short hash, + '-dirty' when mgrow/ or examples/ has uncommitted edits."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
    dirty = git("status", "--porcelain", "--", "mgrow", "examples/replicate.py")
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")


def commit_of(path: Path, commit: str) -> str:
    """Return the commit that made the bundle at `path`: noted beside it when first seen, as
    `commit`, the code of the process that just trained (or first tabulated) it."""
    note = path.with_name(path.name + ".commit")
    if not note.exists():
        note.write_text(commit)
    return note.read_text().strip()


def project_spec(spec: str) -> str:
    """Return a --data spec with its path relative to the project (as results record it)."""
    kind, sep, arg = spec.partition(":")
    if sep and Path(arg).is_absolute():
        return f"{kind}:{os.path.relpath(arg, ROOT)}"
    return spec


def load_spec(spec: str) -> str:
    """Return a --data spec whose relative path is taken from the project root."""
    kind, sep, arg = spec.partition(":")
    if sep and not Path(arg).is_absolute():
        return f"{kind}:{ROOT / arg}"
    return spec


def write_results(a: argparse.Namespace, scale: dict, runs: list[dict]) -> None:
    """Write results.json, results.md and (with matplotlib) the plot for `runs` so far."""
    commit = current_commit()
    meta = {"date": datetime.date.today().isoformat(), "commit": commit,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                       f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
            "scale": a.scale, **scale, "data": project_spec(a.data), "seeds": a.seeds}
    from mgrow.files import write_atomic  # the state a run spanning sessions continues from
    write_atomic(a.out / "results.json", json.dumps({"meta": meta, "runs": runs},
                                                    indent=1).encode(), force=True)
    table = summarise(runs, a.scale, scale)
    width = scale.get("width", 1.0)
    header = (f"Scale `{a.scale}`: {scale['arch']} at width {width / 2:g} -> {width:g}, "
              f"{scale['subset'] or 'all'} training images, E = {scale['epochs']} epochs, "
              f"batch {scale['batch']}, growth budget {scale['budget']}X, growth point "
              f"{scale['point']}, BN {scale.get('norm', 'every')}, post-growth rule "
              f"{scale.get('rule', RULE)}; seeds: {sorted({r['seed'] for r in runs})}; the data's "
              f"whole test split. "
              f"Runs dated {', '.join(sorted({r.get('date', meta['date']) for r in runs}))}, "
              f"commits {', '.join(sorted({r['commit'] for r in runs}))}; written "
              f"{meta['date']} at {commit}, {meta['machine']}.")
    tests = [verdict(runs, row, others) for row, others in VERDICTS.items()]
    (a.out / "results.md").write_text("\n\n".join([header, table, *filter(None, tests)])
                                      + "\n")
    plot(runs, a.out / "accuracy_vs_flops.png")


if __name__ == "__main__":
    main()
