"""How good is a grown net right at growth, and after a short finetune? BN raw, corrected
without data (`fuse --bn-correct`) and recalibrated on N training batches, for every init.

    python examples/growth_start.py --small S --sibling B --plain P --out DIR [--rows ...]
        [--finetune-epochs E]

Rows (each one `fuse`, then three evaluations on the whole test split):
  mg-orthogonal, mg-random, mg-copy, mg-zero   MixtureGrowth of S and B, that init
  mg-nofusion                                   MixtureGrowth of S alone (orthogonal)
  random, net2net                               the baselines from S
  conv-random, conv-permuted                    P converted with `--spare random|permuted`,
                                                then grown alone (orthogonal)
  plain-random, plain-net2net                   the baselines from P
With --finetune-epochs E each row is also finetuned E epochs (one rule for all rows:
finetune's defaults, after --recalibrate batches of BN recalibration) and the final
accuracy recorded. Rows already in DIR/results.json are not redone. Writes results.json
(per row: accuracies, ledger, commit) and results.md. --data (as recorded): the bundles'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch

from mgrow.bundle import load, save
from mgrow.convert import convert_checkpoint
from mgrow.engine import TrainConfig, evaluate
from mgrow.phases import fuse_files
from mgrow.growth.norms import recalibrate
from mgrow.data import DataSource
from mgrow.phases import finetune

ROOT = Path(__file__).resolve().parents[1]
MIXTURE = {f"mg-{i}": dict(init=i) for i in ("orthogonal", "random", "copy", "zero")}
ROWS = (*MIXTURE, "mg-nofusion", "random", "net2net", "conv-random", "conv-permuted",
        "plain-random", "plain-net2net")


def members(row: str, a: argparse.Namespace, work: Path) -> tuple[Path, Path | None, dict]:
    """Return (A, B or None, fuse options) of a row."""
    if row in MIXTURE:
        return a.small, a.sibling, MIXTURE[row]
    if row == "mg-nofusion":
        return a.small, None, {}
    if row in ("random", "net2net"):
        return a.small, None, {"method": row}
    if row.startswith("plain-"):
        return a.plain, None, {"method": row.removeprefix("plain-")}
    spare = row.removeprefix("conv-")
    conv = work / f"conv-{spare}.safetensors"
    if not conv.exists():
        man = load(a.plain).manifest
        from mgrow.bundle import export_plain
        plain_file = work / "plain.safetensors"
        if not plain_file.exists():
            export_plain(a.plain, plain_file)
        convert_checkpoint(plain_file, man.arch.name, conv, num_classes=man.arch.num_classes,
                           width=man.arch.width, norm=man.arch.norm, spare=spare, force=True,
                           in_channels=man.arch.in_channels, input_size=man.arch.input_size)
        b = load(conv)  # record the plain net's data (its normalisation and subset)
        save(conv, b.manifest.model_copy(update={"data": man.data}), b.tensors, force=True)
    return conv, None, {}


def test_slice(data, n: int | None):
    """Return `data` with every k-th test image only (n of them; None: all)."""
    if not n:
        return data
    pick = torch.arange(0, len(data.test_y), len(data.test_y) // n)[:n]
    return dataclasses.replace(data, test_x=data.test_x[pick], test_y=data.test_y[pick])


def run_row(row: str, a: argparse.Namespace, work: Path) -> dict:
    """Grow, evaluate raw / corrected / recalibrated, optionally finetune; return the record."""
    src, sib, options = members(row, a, work)
    source = DataSource(a.data, subset=a.subset)
    rec = {"row": row, "options": options}
    for bn_correct in (False, True):
        grown = work / f"{row}{'-corrected' if bn_correct else ''}.grown.safetensors"
        if not grown.exists():
            fuse_files(src, sib, grown, seed=a.seed, bn_correct=bn_correct, **options)
        b = load(grown)
        data = test_slice(source.load(b.manifest.data), a.test_images)
        model = b.model()
        key = "corrected" if bn_correct else "raw"
        rec[f"at_growth_{key}"] = evaluate(model, data)[0]
        if not bn_correct:
            recalibrate(model, data, a.recalibrate, a.batch, a.seed)
            rec["at_growth_recalibrated"] = evaluate(model, data)[0]
    if a.finetune_epochs:
        out = work / f"{row}.ft.safetensors"
        if not out.exists():
            cfg = TrainConfig(epochs=a.finetune_epochs, batch_size=a.batch, seed=a.seed,
                              lr=a.lr, eval_every_epoch=False)
            finetune(work / f"{row}.grown.safetensors", source, cfg, out,
                     bn_recalibrate=a.recalibrate, progress="quiet")
        man = load(out).manifest
        rec["final"] = man.phases[-1].accuracy
        rec["finetune"] = {"epochs": a.finetune_epochs, "lr": a.lr, "batch": a.batch,
                           "bn_recalibrate": a.recalibrate}
        rec["ledger"] = [p.model_dump() for p in man.phases]
    rec["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                   capture_output=True, text=True).stdout.strip()
    return rec


def table(runs: list[dict]) -> str:
    """Return the Markdown table of the rows."""
    pct = lambda v: "" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = ["| row | at growth raw % | corrected % | recalibrated % | final % |",
             "|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['row']} | {pct(r['at_growth_raw'])} | "
                     f"{pct(r['at_growth_corrected'])} | {pct(r['at_growth_recalibrated'])} | "
                     f"{pct(r.get('final'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("small", "sibling", "plain"):
        p.add_argument(f"--{name}", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", default=None, help="--data spec as recorded (relative to the "
                   "project); default: the bundles' own")
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--recalibrate", type=int, default=20, help="BN recalibration batches")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--finetune-epochs", type=float, default=0)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-images", type=int, default=None, help="evaluate at growth on "
                   "every k-th test image only, N in all (finetuned nets: the whole split)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "results.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    done = {r["row"] for r in runs}
    for row in a.rows.split(","):
        if row in done:
            continue
        print(f"[{row}]", file=sys.stderr, flush=True)
        runs.append(run_row(row, a, a.out))
        meta = {"data": a.data or load(a.small).manifest.data.spec, "recalibrate": a.recalibrate,
                "batch": a.batch, "seed": a.seed, "test_images_at_growth": a.test_images}
        path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
        (a.out / "results.md").write_text(table(runs) + "\n")
    print(table(runs))


if __name__ == "__main__":
    main()
