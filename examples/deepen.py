"""Depth growth measured (issue 23): WRN-10-1 grown to WRN-16-1 by `deepen`, against
WRN-16-1 from scratch at the same training FLOPs, on real CIFAR-10.

    python examples/deepen.py --scale cpu-small --seeds 3 --out examples/results/deepen-cpu-small

Rows (every one through mgrow's library, so each comes with its ledger):
  base              WRN-10-1, template-mixed, E epochs: the start (not charged)
  base-plain        the same, plain
  deepen-mixture    base deepened by one block a stage (mixture: new coefficients over the
                    stage's learned templates), then finetuned to the budget B
  deepen-zero       base deepened with fresh blocks whose last conv is zero, finetuned to B
  deepen-zero-plain base-plain deepened likewise (plain), finetuned to B
  half              WRN-10-1 at width 0.5, template-mixed, E epochs (not charged)
  deepen-widen      half deepened (mixture) to WRN-16-1 x0.5, widened 2x (MixtureGrowth
                    without a sibling, orthogonal init), finetuned to B
  large-match       WRN-16-1 from scratch, plain, B x E epochs
  large             WRN-16-1 from scratch, plain, E epochs (1.00X)
`--init copy` has no row: WRN-10's stages 2 and 3 hold one block each, which changes the
width, so there is no block of the new one's shape to copy (deepen refuses it).
B is charged as everything after the start (the finetune; deepening and fusing cost no
training), normalised to one E-epoch run of WRN-16-1. Rows finished are kept
(results.json after every row; delete a bundle to redo it); interrupted ones resume.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

from mgrow.bundle import load
from mgrow.data import DataSource
from mgrow.engine import TrainConfig
from mgrow.files import write_atomic
from mgrow.flops import reference_flops
from mgrow.manifest import ArchSpec, MixingSpec
from mgrow.phases import deepen_files, finetune, fuse_files, side_files, train_new

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
SCALES = {  # train subset, E epochs of a full run, batch, budget B (x one E-epoch WRN-16-1)
    "tiny": dict(subset=300, epochs=1, batch=50, budget=0.6),  # the CI test's
    "cpu-small": dict(subset=10_000, epochs=10, batch=128, budget=0.45),
    "cpu-v2": dict(subset=None, epochs=15, batch=128, budget=0.45),
}
ROWS = ("base", "deepen-mixture", "deepen-zero", "large-match", "base-plain",
        "deepen-zero-plain", "half", "deepen-widen", "large")
STARTS = {"deepen-mixture": "base", "deepen-zero": "base", "deepen-zero-plain": "base-plain",
          "deepen-widen": "half"}
VERSUS = ("deepen-zero", "deepen-zero-plain", "deepen-widen", "large-match", "large")


class Seed:
    """One seed's rows, in `folder`."""

    def __init__(self, folder: Path, scale: dict, seed: int, data: str, quiet: bool) -> None:
        self.d, self.s, self.seed = folder, scale, seed
        self.source = DataSource(data, subset=scale["subset"])
        self.run = {"progress": "quiet" if quiet else "bar"}
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.d / f"{name}.safetensors"

    def cfg(self, epochs: float) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.s["batch"], seed=self.seed,
                           eval_every_epoch=False)

    def resume(self, name: str) -> bool:
        return side_files(self.path(name))[0].exists()

    def train(self, name: str, arch: str, width: float, epochs: float, mixed: bool) -> Path:
        if not self.path(name).exists():
            train_new(arch, self.source, self.cfg(epochs), self.path(name), width=width,
                      mixing=MixingSpec() if mixed else None, norm="block",
                      resume=self.resume(name), **self.run)
        return self.path(name)

    def grown(self, name: str) -> Path:
        """The deepened (and widened) net `name` finetunes, made once."""
        out = self.d / f"{name}.grown.safetensors"
        if not out.exists():
            start = self.start(STARTS[name])
            init = "zero" if name.startswith("deepen-zero") else "mixture"
            if name == "deepen-widen":
                deep = self.d / "half.deep.safetensors"
                if not deep.exists():
                    deepen_files(start, deep, force=True, blocks=1, stage="all", init=init,
                                 seed=self.seed)
                fuse_files(deep, None, out, force=True, seed=self.seed)
            else:
                deepen_files(start, out, blocks=1, stage="all", init=init, seed=self.seed)
        return out

    def start(self, name: str) -> Path:
        return self.train(name, "wrn-10-1", 0.5 if name == "half" else 1.0, self.s["epochs"],
                          mixed=name != "base-plain")

    def row(self, name: str) -> dict:
        E, B = self.s["epochs"], self.s["budget"]
        if name in ("base", "base-plain", "half"):
            path = self.start(name)
        elif name in ("large", "large-match"):
            path = self.train(name, "wrn-16-1", 1.0, E * (B if name == "large-match" else 1),
                              mixed=False)
        elif not self.path(name).exists():
            path = finetune(self.grown(name), self.source, self.cfg(1.0), self.path(name),
                            budget=B, reference_epochs=E, resume=self.resume(name),
                            **self.run).path
        else:
            path = self.path(name)
        man = load(path).manifest
        large = ArchSpec(name="wrn-16-1", norm="block", input_size=man.arch.input_size,
                         num_classes=man.arch.num_classes, in_channels=man.arch.in_channels)
        ref = reference_flops(man.model_copy(update={"arch": large}), E)
        charged = [p for p in man.phases if p.stage == "growth"] if name in STARTS \
            else list(man.phases)
        return {"row": name, "seed": self.seed, "date": datetime.date.today().isoformat(),
                "arch": man.describe(), "top1": man.phases[-1].accuracy,
                "flops_norm": sum(p.train_flops for p in charged) / ref,
                "ledger": [p.model_dump() for p in man.phases]}


def table(runs: list[dict]) -> str:
    """Return Markdown: mean +- std per row, then deepen-mixture minus the others, paired."""
    rows: dict[str, list[dict]] = {}
    for r in runs:
        rows.setdefault(r["row"], []).append(r)

    def ms(v: list[float]) -> str:
        v = [100 * x for x in v]
        return f"{v[0]:.2f}" if len(v) == 1 else \
            f"{statistics.mean(v):.2f} +- {statistics.stdev(v):.2f}"
    out = ["| row | network | top-1 % | FLOPs Norm | seeds |", "|---|---|---|---|---|"]
    out += [f"| {k} | {v[0]['arch']} | {ms([r['top1'] for r in v])} | "
            f"{statistics.mean(r['flops_norm'] for r in v):.3f}X | {len(v)} |"
            for k, v in rows.items()]
    top1 = {(r["seed"], r["row"]): 100 * r["top1"] for r in runs}
    out += ["", "`deepen-mixture` minus each row, paired by seed (points):", ""]
    for other in VERSUS:
        d = [top1[s, "deepen-mixture"] - v for (s, n), v in top1.items()
             if n == other and (s, "deepen-mixture") in top1]
        if d:
            sd = f" +- {statistics.stdev(d):.2f}" if len(d) > 1 else ""
            call = "" if len(d) < 3 else \
                f": {'ahead' if statistics.mean(d) > 2 * statistics.stdev(d) else 'not ahead'}" \
                " by > 2 sd"
            out.append(f"- {other}: {statistics.mean(d):+.2f}{sd} over {len(d)} seeds{call}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=SCALES, default="cpu-small")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/deepen"))
    p.add_argument("--data", default=f"npz:{CIFAR}", help="data set spec [default: the "
                   "shared real CIFAR-10]")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    names = a.rows.split(",")
    if set(names) - set(ROWS):
        sys.exit(f"error: unknown rows {sorted(set(names) - set(ROWS))}: expected "
                 f"{', '.join(ROWS)}")
    scale = SCALES[a.scale]
    results = a.out / "results.json"
    old = json.loads(results.read_text()) if results.exists() else None
    if old and (old["meta"]["scale"], old["meta"]["settings"]) != (a.scale, scale):
        sys.exit(f"error: {results} holds another scale or settings: choose another --out")
    runs = {(r["seed"], r["row"]): r for r in (old["runs"] if old else [])}
    meta = {"scale": a.scale, "settings": scale, "data": a.data.replace(str(ROOT.parent), "..")}
    for seed in range(a.seeds):
        runner = Seed(a.out / f"seed{seed}", scale, seed, a.data, a.quiet)
        for name in names:
            if (seed, name) in runs:
                continue
            print(f"[seed {seed}] {name}", file=sys.stderr, flush=True)
            runs[seed, name] = runner.row(name)
            text = json.dumps({"meta": meta, "runs": list(runs.values())}, indent=1)
            write_atomic(results, text.encode(), force=True)
            (a.out / "results.md").write_text(table(list(runs.values())) + "\n")
    print(table(list(runs.values())) if runs else "no rows finished yet")


if __name__ == "__main__":
    main()
