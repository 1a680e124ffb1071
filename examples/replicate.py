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
  mg-lr-X         `mg` finetuned with peak lr X instead of the default 0.1 (the sweep
                  that justifies the post-growth default; its cost is reported per row)
The ImageNet scales (`imagenet`, and `imagenet-tiny` for CI on a generated image folder)
grow resnet50 at half width into resnet50 on a streamed image folder (train/ and val/,
RandomResizedCrop + flip, Resize + CenterCrop at the scale's input size) and default to
the paper's ImageNet rows: small, large, large-match, random, net2net, mg.
Growth rows spend the same budget B (growth FLOPs / one large run, from the ledger: the
sibling plus the finetune) with one post-growth rule for all: `finetune`'s defaults.
Finished runs are not rerun (delete a bundle to redo it) and interrupted ones resume from
their checkpoints; every seed of the main table runs before the ablations. Outputs in
--out: results.json (every run: accuracies and ledger), results.md (mean +- std per
row) and, with matplotlib, accuracy_vs_flops.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
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
from mgrow.growth import fuse_files
from mgrow.manifest import ArchSpec, Lineage, Manifest
from mgrow.phases import DataSource, finetune, side_files, train_new

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
SCALES = {  # arch (full width), train subset, E = epochs of a full run, batch, growth budget
    "tiny": dict(arch="wrn-10-2", subset=300, epochs=1, batch=50, budget=0.45, point=0.8,
                 growth_steps=1),
    "cpu": dict(arch="wrn-10-2", subset=4000, epochs=8, batch=64, budget=0.45, point=0.8),
    # the cpu scale trained ~4x longer: closer to convergence, ~30 min a seed on 2 idle cores
    "cpu-long": dict(arch="wrn-10-2", subset=4000, epochs=30, batch=64, budget=0.45,
                     point=0.8),
    "gpu": dict(arch="wrn-28-10", subset=None, epochs=200, batch=128, budget=0.45, point=0.8),
    # the paper's ImageNet recipe: ResNet-50 x0.5 -> ResNet-50, 90 epochs, batch 256, lr 0.1
    # decayed 0.1x at epochs 30, 60, 80 (each phase's run decays at those shares of its own
    # length), 0.35X, sibling for 0.8 of a run; bf16 on CUDA. Needs --data imagefolder:DIR
    "imagenet": dict(arch="resnet50", subset=None, epochs=90, batch=256, budget=0.35,
                     point=0.8, input_size=224, amp=True, schedule="step"),
    # the same code path in CI: resnet50 x0.125 -> x0.25 at 32 px on a small image folder
    "imagenet-tiny": dict(arch="resnet50", width=0.25, subset=None, epochs=1, batch=20,
                          budget=0.35, point=0.8, input_size=32, workers=0,
                          schedule="step"),
}
IMAGENET_ROWS = ("small", "large", "large-match", "random", "net2net", "mg")
MAIN = ("small", "small-plain", "small-match", "large", "large-match", "random", "net2net",
        "gradmax", "firefly", "mg-nofusion", "mg")
GROWTH_STEPS = 8  # batches of the gradmax/firefly growth step, unless a scale says otherwise
ABLATIONS = ("mg-init-random", "mg-init-copy", "mg-init-zero", "mg-horizontal")
POINTS = (0.0, 0.5, 1.0)
LRS = (0.02, 0.05)  # post-growth peak lr sweep of `mg` (its default, 0.1, is `mg` itself)


class Runner:
    """Runs (or finds) every row of one seed in `folder`."""

    def __init__(self, folder: Path, scale: dict, seed: int, data: str, quiet: bool) -> None:
        self.d, self.s, self.seed = folder, scale, seed
        self.source = DataSource(data, subset=scale["subset"],
                                 input_size=scale.get("input_size"),
                                 workers=scale.get("workers"))
        self.progress = "quiet" if quiet else "bar"
        folder.mkdir(parents=True, exist_ok=True)
        self.width = scale.get("width", 1.0)  # of the large net; the small one is half

    def cfg(self, epochs: float) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.s["batch"], seed=self.seed,
                           amp=self.s.get("amp", False),  # bf16 on CUDA only
                           schedule=self.s.get("schedule", "cosine"),
                           eval_every_epoch=False)  # one full test-set pass, at the end

    def path(self, name: str) -> Path:
        return self.d / f"{name}.safetensors"

    def run_options(self, name: str) -> dict:
        """Progress mode, and resume when an interrupted run left its checkpoint."""
        return {"progress": self.progress, "resume": side_files(self.path(name))[0].exists()}

    def train(self, name: str, width: float, epochs: float, mixed: bool = True) -> Path:
        if not self.path(name).exists():
            from mgrow.manifest import MixingSpec
            train_new(self.s["arch"], self.source, self.cfg(epochs), self.path(name),
                      mixing=MixingSpec() if mixed else None, width=width * self.width,
                      **self.run_options(name))
        return self.path(name)

    def sibling(self, point: float) -> Path:
        """The sibling trained for `point` x E epochs (0: untrained, fresh templates)."""
        name = f"sibling-{point:g}"
        path = self.path(name)
        if path.exists():
            return path
        small = load(self.train("small", 0.5, self.s["epochs"]))
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

    def grow(self, name: str, sibling: Path | None, lr: float = 0.1, **options
             ) -> tuple[Path, float]:
        """Fuse and finetune to the budget; return the final bundle and growth-point top-1."""
        small = self.train("small", 0.5, self.s["epochs"])
        grown = self.d / f"{name.partition('-lr-')[0]}.grown.safetensors"
        if not grown.exists():
            fuse_files(small, sibling, grown, seed=self.seed, **options)
        at_growth = self.eval(grown)
        if not self.path(name).exists():
            cfg = self.cfg(1.0).model_copy(update={"lr": lr})
            finetune(grown, self.source, cfg, self.path(name),
                     budget=self.s["budget"], reference_epochs=self.s["epochs"],
                     **self.run_options(name))
        return self.path(name), at_growth

    def eval(self, path: Path) -> float:
        """Top-1 on the test split: the trained bundle's own final accuracy from its ledger,
        or (for a bundle just grown, with no training yet) one evaluation, cached."""
        phases = load(path).manifest.phases
        if phases and phases[-1].accuracy is not None and ".grown." not in path.name:
            return phases[-1].accuracy
        cache = path.with_name(path.name + ".top1")
        if not cache.exists():
            b = load(path)
            data = self.source.load(b.manifest.data)
            cache.write_text(repr(evaluate(b.model(), data)[0]))
        return float(cache.read_text())

    def small_arch(self) -> ArchSpec:
        """The half-width net's architecture (classes and input size from the data)."""
        return load(self.train("small", 0.5, self.s["epochs"])).manifest.arch

    def budget_epochs(self) -> float:
        """Epochs of the half-width net that cost the growth budget (Small Match)."""
        small = self.small_arch()
        ratio = forward_flops(small.widened(2)) / forward_flops(small)
        return self.s["budget"] * self.s["epochs"] * ratio

    def row(self, name: str) -> dict:
        E, at_growth = self.s["epochs"], None
        if name == "small":
            path = self.train("small", 0.5, E)
        elif name == "small-plain":
            path = self.train("small-plain", 0.5, E, mixed=False)
        elif name == "small-match":
            path = self.train("small-match", 0.5, self.budget_epochs())
        elif name == "large":
            path = self.train("large", 1.0, E, mixed=False)
        elif name == "large-match":
            path = self.train("large-match", 1.0, self.s["budget"] * E, mixed=False)
        elif name in ("random", "net2net"):
            path, at_growth = self.grow(name, None, method=name)
        elif name in ("gradmax", "firefly"):
            path, at_growth = self.grow(name, None, method=name, source=self.source,
                                        batch_size=self.s["batch"],
                                        steps=self.s.get("growth_steps", GROWTH_STEPS))
        elif name == "mg-nofusion":
            path, at_growth = self.grow(name, None)
        else:
            point = float(name.rpartition("-")[2]) if name.startswith("mg-point-") \
                else self.s["point"]
            options = {"tiling": "horizontal"} if name == "mg-horizontal" else {}
            if name.startswith("mg-init-"):
                options = {"init": name.rpartition("-")[2]}
            if name.startswith("mg-lr-"):
                options = {"lr": float(name.rpartition("-")[2])}
            path, at_growth = self.grow(name, self.sibling(point), **options)
        man = load(path).manifest
        ref = reference_flops(man.model_copy(update={"arch": self.small_arch().widened(2)}), E)
        charged = [p for p in man.phases if p.stage == "growth"] if at_growth is not None \
            else list(man.phases)
        return {"row": name, "seed": self.seed, "top1": self.eval(path),
                "top1_at_growth": at_growth, "start_top1": self.eval(self.path("small"))
                if at_growth is not None else None,
                "flops_norm": sum(p.train_flops for p in charged) / ref,
                "ledger": [p.model_dump() for p in man.phases]}


def summarise(runs: list[dict], scale_name: str, scale: dict) -> str:
    """Return the Markdown table: mean +- std per row over seeds."""
    rows: dict[str, list[dict]] = {}
    for r in runs:
        rows.setdefault(r["row"], []).append(r)

    def ms(values: list[float]) -> str:
        values = [100 * v for v in values if v is not None]
        if not values:
            return ""
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} +- {sd:.2f}"

    lines = ["| row | top-1 % | at growth % | gain over start (pts) | FLOPs Norm | seeds |",
             "|---|---|---|---|---|---|"]
    for name, rs in rows.items():
        gains = [r["top1"] - r["start_top1"] for r in rs if r["start_top1"] is not None]
        lines.append(f"| {name} | {ms([r['top1'] for r in rs])} | "
                     f"{ms([r['top1_at_growth'] for r in rs])} | "
                     f"{ms(gains) if gains else ''} | "
                     f"{statistics.mean(r['flops_norm'] for r in rs):.3f}X | {len(rs)} |")
    return "\n".join(lines)


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
    p.add_argument("--data", help=f"data set spec [default: npz:{CIFAR}; the imagenet "
                   "scales need imagefolder:FOLDER with train/ and val/]")
    p.add_argument("--rows", default="main", help="main (imagenet scales: the paper's "
                   "ImageNet rows); paper (main + ablations + post-growth lr sweep); all "
                   "(paper + growth points); or a comma-separated list")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report-only", action="store_true", help="train nothing: tabulate the "
                   "rows already finished in --out")
    a = p.parse_args(argv)
    scale = SCALES[a.scale]
    imagenet = a.scale.startswith("imagenet")
    if a.data is None and imagenet:
        p.error(f"--scale {a.scale} needs --data imagefolder:FOLDER (train/CLASS/*.jpg and "
                "val/CLASS/*.jpg; examples/image_folder.py writes a small one)")
    a.data = a.data or f"npz:{CIFAR}"
    main_rows = IMAGENET_ROWS if imagenet else MAIN
    extra = ABLATIONS + tuple(f"mg-lr-{x:g}" for x in LRS)
    points = tuple(f"mg-point-{x:g}" for x in POINTS)
    stages = {"main": [main_rows], "paper": [main_rows, extra],
              "all": [main_rows, extra, points]}.get(
        a.rows, [tuple(a.rows.split(","))])
    runs = []
    for names in stages:  # every seed of the main table first, then the ablations
        for seed in range(a.seeds):
            runner = Runner(a.out / f"seed{seed}", scale, seed, a.data, a.quiet)
            for name in names:
                if a.report_only and not runner.path(name).exists():
                    continue
                print(f"[seed {seed}] {name}", file=sys.stderr, flush=True)
                runs.append(runner.row(name))
                write_results(a, scale, runs)  # after every row: a stopped run still reports
    print((a.out / "results.md").read_text())


def write_results(a: argparse.Namespace, scale: dict, runs: list[dict]) -> None:
    """Write results.json, results.md and (with matplotlib) the plot for `runs` so far."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    meta = {"date": datetime.date.today().isoformat(), "commit": commit,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                       f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
            "scale": a.scale, **scale, "data": a.data, "seeds": a.seeds}
    (a.out / "results.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    table = summarise(runs, a.scale, scale)
    width = scale.get("width", 1.0)
    header = (f"Scale `{a.scale}`: {scale['arch']} at width {width / 2:g} -> {width:g}, "
              f"{scale['subset'] or 'all'} training images, E = {scale['epochs']} epochs, "
              f"batch {scale['batch']}, growth budget {scale['budget']}X, growth point "
              f"{scale['point']}; seeds: {sorted({r['seed'] for r in runs})}; the data's "
              f"whole test split. "
              f"{meta['date']}, commit {commit}, {meta['machine']}.")
    (a.out / "results.md").write_text(header + "\n\n" + table + "\n")
    plot(runs, a.out / "accuracy_vs_flops.png")


if __name__ == "__main__":
    main()
