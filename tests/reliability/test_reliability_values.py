"""Values out of range: on the command line and inside a bundle's manifest, including
pathological JSON. Every case is refused in one line naming the option or the field, with
nothing written (rel_support.assert_refused).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rel_support import (TRAIN, assert_refused, mgrow, watch, with_header, with_manifest,
                         write_bundle)

GOOD = "good.safetensors"
HUGE = str(10**30)
OUT = ("-o", "out.safetensors")

# name -> (arguments, with GOOD for a valid bundle; what the one line must match)
BAD_OPTIONS = {
    "train-seed-huge": (("train", *TRAIN, "--seed", HUGE, *OUT), "--seed"),
    "train-seed-negative": (("train", *TRAIN, "--seed", "-1", *OUT), "--seed"),
    "train-width-inf": (("train", *TRAIN, "--width", "inf", *OUT), "--width"),
    "train-width-nan": (("train", *TRAIN, "--width", "nan", *OUT), "--width"),
    "train-width-zero": (("train", *TRAIN, "--width", "0", *OUT), "--width"),
    "train-width-negative": (("train", *TRAIN, "--width", "-0.5", *OUT), "--width"),
    "train-width-huge": (("train", *TRAIN, "--width", "1e308", *OUT), "--width"),
    "train-lr-nan": (("train", *TRAIN, "--lr", "nan", *OUT), "--lr"),
    "train-lr-inf": (("train", *TRAIN, "--lr", "inf", *OUT), "--lr"),
    "train-lr-negative": (("train", *TRAIN, "--lr", "-0.1", *OUT), "--lr"),
    "train-epochs-nan": (("train", *TRAIN, "--epochs", "nan", *OUT), "--epochs"),
    "train-epochs-huge": (("train", *TRAIN, "--epochs", "1e300", *OUT), "--epochs"),
    "train-batch-huge": (("train", *TRAIN, "--batch-size", HUGE, *OUT), "--batch-size"),
    "train-warmup-nan": (("train", *TRAIN, "--warmup", "nan", *OUT), "--warmup"),
    "train-weight-decay-inf": (("train", *TRAIN, "--weight-decay", "inf", *OUT),
                               "--weight-decay"),
    "train-smoothing-nan": (("train", *TRAIN, "--label-smoothing", "nan", *OUT),
                            "--label-smoothing"),
    "train-templates-huge": (("train", *TRAIN, "--templates", "1000000", *OUT),
                             "--templates"),
    "train-subset-huge": (("train", *TRAIN[:4], "--subset", HUGE, *OUT), "--subset"),
    "train-workers-huge": (("train", *TRAIN, "--workers", HUGE, *OUT), "--workers"),
    "train-arch-depth-digits": (("train", *TRAIN[2:], "--arch", "wrn-1" + "0" * 5000 + "-1",
                                 *OUT), "unknown architecture"),
    "convert-classes-huge": (("convert", GOOD, "--arch", "wrn-10-1", "--num-classes", HUGE,
                              *OUT), "--num-classes"),
    "convert-channels-zero": (("convert", GOOD, "--arch", "wrn-10-1", "--in-channels", "0",
                               *OUT), "--in-channels"),
    "convert-input-small": (("convert", GOOD, "--arch", "wrn-10-1", "--input-size", "4",
                             *OUT), "--input-size"),
    "convert-input-huge": (("convert", GOOD, "--arch", "wrn-10-1", "--input-size", HUGE,
                            *OUT), "--input-size"),
    "convert-edge-templates-zero": (("convert", GOOD, "--arch", "wrn-10-1",
                                     "--edge-templates", "0", *OUT), "--edge-templates"),
    "convert-seed-huge": (("convert", GOOD, "--arch", "wrn-10-1", "--seed", HUGE, *OUT),
                          "--seed"),
    "fuse-factor-one": (("fuse", GOOD, "--factor", "1", *OUT), "--factor"),
    "fuse-factor-huge": (("fuse", GOOD, "--factor", "1000000000", *OUT), "--factor"),
    "fuse-noise-nan": (("fuse", GOOD, "--noise", "nan", *OUT), "--noise"),
    "fuse-noise-inf": (("fuse", GOOD, "--noise", "inf", *OUT), "--noise"),
    "fuse-noise-negative": (("fuse", GOOD, "--noise", "-1", *OUT), "--noise"),
    "fuse-seed-huge": (("fuse", GOOD, "--seed", HUGE, *OUT), "--seed"),
    "flops-input-huge": (("flops", GOOD, "--input-size", "1000000000000"), "--input-size"),
    "flops-reference-nan": (("flops", GOOD, "--reference-epochs", "nan"),
                            "--reference-epochs"),
    "finetune-budget-nan": (("finetune", GOOD, "--budget", "nan", *OUT), "--budget"),
    "finetune-budget-inf": (("finetune", GOOD, "--budget", "inf", *OUT), "--budget"),
    "finetune-reference-zero": (("finetune", GOOD, "--budget", "0.5", "--reference-epochs",
                                 "0", *OUT), "--reference-epochs"),
    "sibling-seed-negative": (("train-sibling", GOOD, "--epochs", "1", "--seed", "-3", *OUT),
                              "--seed"),
    "sibling-epochs-inf": (("train-sibling", GOOD, "--epochs", "inf", *OUT), "--epochs"),
    "eval-batch-zero": (("eval", GOOD, "--batch-size", "0"), "--batch-size"),
    "eval-batch-huge": (("eval", GOOD, "--batch-size", HUGE), "--batch-size"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder with a valid bundle and the damaged copies of BAD_MANIFESTS."""
    folder = tmp_path_factory.mktemp("values")
    good = write_bundle(folder / GOOD)
    for name, (make, _) in BAD_MANIFESTS.items():
        make(good, folder / f"{name}.safetensors")
    return folder


@pytest.mark.parametrize("name", BAD_OPTIONS)
def test_bad_option_value_is_refused(inputs, tmp_path, name):
    args, match = BAD_OPTIONS[name]
    args = [inputs / GOOD if a == GOOD else a for a in args]
    before = watch(inputs, tmp_path)
    line = assert_refused(mgrow(*args, cwd=tmp_path), before, match)
    assert len(line) < 400


# -- the manifest --------------------------------------------------------------------------

def _set(*path, value):
    """An edit setting raw[path...] = value."""
    def edit(raw):
        for key in path[:-1]:
            raw = raw[key]
        raw[path[-1]] = value
    return lambda good, dst: with_manifest(good, dst, edit)


def _growth(**update):
    growth = {"method": "mixture", "init": "orthogonal", "factor": 2, "members": 1,
              "tiling": "vertical", "seed": 0, **update}
    return _set("growth", value=growth)


def _phase(**update):
    phase = {"operation": "train", "arch": "wrn-10-1", "stage": "base", "images": 64,
             "forward_flops": 1000, "train_flops": 192000, "wall_s": 1.0, "device": "cpu",
             "accuracy": 0.5, **update}
    return _set("phases", value=[phase])


def _text(mangle):
    """A maker whose manifest text is `mangle(json text)`: JSON no dict could make."""
    def make(good: Path, dst: Path) -> None:
        def edit(head):
            head["__metadata__"]["mgrow"] = mangle(head["__metadata__"]["mgrow"])
        with_header(good, dst, edit)
    return make


LINEAGE_OPTIONS = re.compile(r'("lineage":\{"operation":"[^"]*","options":\{)')


def _into_lineage_options(text: str, entry: str) -> str:
    """Return manifest `text` with `entry` ("key":value,) first in lineage.options."""
    return LINEAGE_OPTIONS.sub(lambda m: m.group(1) + entry, text, count=1)


def _nested(depth: int):
    """Put `depth` nested lists into lineage.options."""
    return _text(lambda t: _into_lineage_options(t, '"deep":' + "[" * depth + "]" * depth
                                                 + ","))


def _header_nested(depth: int):
    """A safetensors header with an entry nested `depth` levels deep (no mgrow data read)."""
    def make(good: Path, dst: Path) -> None:
        data = good.read_bytes()
        n = int.from_bytes(data[:8], "little")
        head = data[8:8 + n].rstrip()
        text = head[:-1] + b',"x":' + b"[" * depth + b"]" * depth + b"}"
        text += b" " * (-len(text) % 8)
        dst.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    return make


# name -> (maker(good, dst), what the one line must match)
BAD_MANIFESTS = {
    "width-inf": (_set("arch", "width", value=float("inf")), "arch.width"),
    "width-nan": (_set("arch", "width", value=float("nan")), "arch.width"),
    "width-1e300": (_set("arch", "width", value=1e300), "arch.width"),
    "width-negative": (_set("arch", "width", value=-1.0), "arch.width"),
    "classes-huge": (_set("arch", "num_classes", value=10**12), "arch.num_classes"),
    "channels-zero": (_set("arch", "in_channels", value=0), "arch.in_channels"),
    "input-size-huge": (_set("arch", "input_size", value=10**9), "arch.input_size"),
    "name-huge": (_set("arch", "name", value="wrn-10-1" + "x" * 200), "arch.name"),
    "templates-huge": (_set("mixing", "templates", value=10**9), "mixing.templates"),
    "factor-huge": (_set("mixing", "factor", value=10**6), "mixing.factor"),
    "edge-templates-zero": (_set("mixing", "edge_templates", value=0),
                            "mixing.edge_templates"),
    "data-mean-above-one": (_set("data", "mean", value=[2.0]), r"data.mean"),
    "data-std-zero": (_set("data", "std", value=[0.0]), r"data.std"),
    "data-stats-per-channel": (_set("data", "mean", value=[0.5, 0.5]),
                               "one value per channel"),
    "data-train-size-negative": (_set("data", "train_size", value=-5), "data.train_size"),
    "data-classes-huge": (_set("data", "num_classes", value=10**15), "data.num_classes"),
    "phase-images-negative": (_phase(images=-1), r"phases.0.images"),
    "phase-flops-huge": (_phase(forward_flops=10**40), r"phases.0.forward_flops"),
    "phase-wall-nan": (_phase(wall_s=float("nan")), r"phases.0.wall_s"),
    "phase-accuracy-above-one": (_phase(accuracy=7.0), r"phases.0.accuracy"),
    "growth-factor-huge": (_growth(factor=10**9), "growth.factor"),
    "growth-seed-negative": (_growth(seed=-1), "growth.seed"),
    "growth-noise-inf": (_growth(noise=float("inf")), "growth.noise"),
    "lineage-seed-text": (_set("lineage", "options", value={"seed": "abc"}),
                          "lineage.options.*seed"),
    "lineage-seed-huge": (_set("lineage", "options", value={"seed": 10**30}),
                          "lineage.options.*seed"),
    "lineage-seed-fraction": (_set("lineage", "options", value={"seed": 2.5}),
                              "lineage.options.*seed"),
    "lineage-lr-negative": (_set("lineage", "options", value={"lr": -1}),
                            "lineage.options.*lr"),
    "parent-hash-bad": (_set("lineage", "parents", value=[{"sha256": "x", "path": "a"}]),
                        r"lineage.parents.0.sha256"),
    "integer-5000-digits": (_text(lambda t: t.replace('"seed":0', '"seed":' + "9" * 5000)),
                            "manifest is not valid JSON"),
    "nested-40": (_nested(40), "manifest nests 4[0-9] levels deep"),
    "nested-100000": (_nested(100_000), "manifest nests 100[0-9]{3} levels deep"),
    "manifest-17-MB": (_text(lambda t: _into_lineage_options(t, '"pad":"' + "x" * (17 << 20)
                                                             + '",')),
                       "manifest of .* bytes exceeds the limit"),
    "header-nested-100000": (_header_nested(100_000), "safetensors header nests"),
}

MANIFEST_COMMANDS = {
    "eval": ("eval", "BAD"),
    "flops": ("flops", "BAD"),
    "train-sibling": ("train-sibling", "BAD", "--epochs", "1", *OUT),
}


@pytest.mark.parametrize("command", MANIFEST_COMMANDS)
@pytest.mark.parametrize("name", BAD_MANIFESTS)
def test_bad_manifest_value_is_refused(inputs, tmp_path, name, command):
    args = [inputs / f"{name}.safetensors" if a == "BAD" else a
            for a in MANIFEST_COMMANDS[command]]
    before = watch(inputs, tmp_path)
    assert_refused(mgrow(*args, cwd=tmp_path), before, BAD_MANIFESTS[name][1])


def test_the_edits_alone_are_valid(inputs, tmp_path):
    """The damaged copies differ from the valid bundle only in the value under test: the
    same edit with an in-range value evaluates (so the refusals are the values' doing)."""
    for name, make in {"ok-growth-free": _set("lineage", "options", value={"seed": 5}),
                       "ok-nested-8": _nested(8),
                       "ok-phase": _phase()}.items():
        make(inputs / GOOD, tmp_path / f"{name}.safetensors")
        run = mgrow("eval", tmp_path / f"{name}.safetensors", "--json", cwd=tmp_path)
        assert run.rc == 0, run.err
        assert json.loads(run.out)["test_images"] == 360
