"""The Python API keeps the CLI's contract (issue 25).

Every public function of mgrow.api checks its arguments before doing anything and refuses
a wrong one with a one-line MgrowError naming the function and the argument, writing
nothing; `info` walks a lineage loading each parent file once and marks a parent it cannot
read instead of failing; `cka` refuses, before any forward pass, a count of images whose
Gram matrices would not fit the memory.

Real bundles on disk (conftest.make_bundle), the built-in digits, no mocks.
"""

from __future__ import annotations

import inspect
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import make_bundle, run_main

import mgrow
from mgrow import api, history
from mgrow import limits as L
from mgrow.arch import build
from mgrow.bundle import load, save
from mgrow.manifest import ArchSpec, Lineage, Parent
from mgrow.similarity import CkaResult

# a half-width wrn-10-1 for the digits (8 x 8, one channel, 10 classes): builds in ms
ARCH = ArchSpec(name="wrn-10-1", width=0.5, num_classes=10, in_channels=1, input_size=8)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two same-shape bundles (a net and its sibling) in a folder of their own."""
    d = tmp_path_factory.mktemp("pair")
    return (make_bundle(d / "a.safetensors", ARCH, seed=0).path,
            make_bundle(d / "b.safetensors", ARCH, seed=1).path)


def public_functions() -> set[str]:
    """Return the names of the functions (not classes) mgrow.api exports."""
    return {n for n in api.__all__ if inspect.isfunction(getattr(api, n))}


def snapshot(*folders: Path) -> set[tuple[str, int, int]]:
    """Return every file under the folders with its size and modification time."""
    return {(str(p), p.stat().st_size, p.stat().st_mtime_ns) for d in folders
            for p in d.rglob("*")}


# -- class 5: every argument checked first ------------------------------------------------

def bad_calls(a: Path, b: Path, out: Path) -> dict[str, list[tuple]]:
    """Return {function: [(call, the argument its refusal names), ...]}: at least one wrong
    type and one value out of range for every public function."""
    o = out / "o.safetensors"
    res = CkaResult(["x"], ["y"], [[0.5]], 10)
    quick = {"data": "digits", "epochs": 1, "batch_size": 256, "progress": "quiet"}
    return {
        "load": [(lambda: api.load(None), "path"), (lambda: api.load(""), "path"),
                 (lambda: api.load(7), "path")],
        "build_model": [(lambda: api.build_model(123), "bundle"),
                        (lambda: api.build_model(""), "bundle")],
        "train": [
            (lambda: api.train("wrn-10-1", o, **quick | {"width": "1"}), "width"),
            (lambda: api.train("wrn-10-1", o, **quick | {"width": 0}), "width"),
            (lambda: api.train("wrn-10-1", o, **quick | {"width": 2 * L.MAX_WIDTH}), "width"),
            (lambda: api.train("wrn-10-1", o, **quick | {"templates": 0}), "templates"),
            (lambda: api.train("wrn-10-1", o, **quick | {"templates": 2.0}), "templates"),
            (lambda: api.train("wrn-10-1", o, **quick | {"subset": 0}), "subset"),
            (lambda: api.train("wrn-10-1", o, **quick | {"data": 123}), "data"),
            (lambda: api.train("wrn-10-1", o, **quick | {"progress": "loud"}), "progress"),
            (lambda: api.train("wrn-10-1", o, **quick | {"norm": "never"}), "norm"),
            (lambda: api.train("wrn-10-1", o, **quick | {"epochs": "1"}), "epochs"),
            (lambda: api.train(10, o, **quick), "arch"),
            (lambda: api.train("wrn-10-1", 5, **quick), "output"),
            # keyword knobs go through TrainConfig: named as well
            (lambda: api.train("wrn-10-1", o, **quick | {"lr": -1.0}), "lr"),
            (lambda: api.train("wrn-10-1", o, **quick | {"momentum": 1.5}), "momentum"),
            (lambda: api.train("wrn-10-1", o, **quick | {"bogus": 3}), "bogus")],
        "train_sibling": [
            (lambda: api.train_sibling(42, o, epochs=1), "small"),
            (lambda: api.train_sibling(a, o, epochs=1, seed=-1), "seed"),
            (lambda: api.train_sibling(a, o, epochs=1, seed="1"), "seed"),
            (lambda: api.train_sibling(a, o, epochs=0), "epochs"),
            (lambda: api.train_sibling(a, o, epochs=1, batch_size=0), "batch_size"),
            (lambda: api.train_sibling(a, o), "epochs")],
        "deepen": [(lambda: api.deepen(a, o, blocks="1"), "blocks"),
                   (lambda: api.deepen(a, o, blocks=0), "blocks"),
                   (lambda: api.deepen(a, o, stage="first"), "stage"),
                   (lambda: api.deepen(a, o, stage=0), "stage"),
                   (lambda: api.deepen(a, o, init="orthogonal"), "init"),
                   (lambda: api.deepen(a, o, seed=-1), "seed")],
        "fuse": [
            (lambda: api.fuse(a, b, o, factor="2"), "factor"),
            (lambda: api.fuse(a, b, o, factor=2.5), "factor"),
            (lambda: api.fuse(a, b, o, factor=True), "factor"),
            (lambda: api.fuse(a, b, o, factor=1), "factor"),
            (lambda: api.fuse(a, b, o, factor=L.MAX_FACTOR + 1), "factor"),
            (lambda: api.fuse(a, b, o, data=123), "data"),
            (lambda: api.fuse(a, b, o, noise=-1.0), "noise"),
            (lambda: api.fuse(a, b, o, noise=float("nan")), "noise"),
            (lambda: api.fuse(a, b, o, method="gradmax", batch_size=0), "batch_size"),
            (lambda: api.fuse(a, b, o, method="gradmax", steps=0), "steps"),
            (lambda: api.fuse(a, b, o, method="grow"), "method"),
            (lambda: api.fuse(a, b, o, init="ones"), "init"),
            (lambda: api.fuse(a, b, o, tiling="diagonal"), "tiling"),
            (lambda: api.fuse(a, b, o, seed=-1), "seed"),
            (lambda: api.fuse(a, b, o, bn_correct="yes"), "bn_correct"),
            (lambda: api.fuse(a, 3.0, o), "b")],
        "finetune": [
            (lambda: api.finetune(a, o, epochs="1"), "epochs"),
            (lambda: api.finetune(a, o, budget=0), "budget"),
            (lambda: api.finetune(a, o, epochs=1, bn_recalibrate=-1), "bn_recalibrate"),
            (lambda: api.finetune(a, o, epochs=1, bn_recalibrate=1.5), "bn_recalibrate"),
            (lambda: api.finetune(a, o, budget=0.5, reference_epochs=0), "reference_epochs"),
            (lambda: api.finetune(a, o, epochs=1, data=123), "data"),
            (lambda: api.finetune(a, o, epochs=1, batch_size="8"), "batch_size")],
        "evaluate": [(lambda: api.evaluate(a, "digits", batch_size=0), "batch_size"),
                     (lambda: api.evaluate(a, "digits", batch_size=64.0), "batch_size"),
                     (lambda: api.evaluate(a, "digits", batch_size=L.MAX_BATCH + 1),
                      "batch_size"),
                     (lambda: api.evaluate(a, "digits", device=0), "device")],
        "count_flops": [(lambda: api.count_flops(a, input_size=32.0), "input_size"),
                        (lambda: api.count_flops(a, input_size=4), "input_size"),
                        (lambda: api.count_flops(a, reference_epochs=0), "reference_epochs"),
                        (lambda: api.count_flops(a, reference_epochs="200"),
                         "reference_epochs")],
        "info": [(lambda: api.info(a, reference_epochs="200"), "reference_epochs"),
                 (lambda: api.info(a, reference_epochs=-1.0), "reference_epochs"),
                 (lambda: api.info(3.5), "bundle")],
        "cka": [(lambda: api.cka(a, b, "digits", images="10"), "images"),
                (lambda: api.cka(a, b, "digits", images=1), "images"),
                (lambda: api.cka(a, b, data=123), "data"),
                (lambda: api.cka(a, None, "digits"), "b")],
        "write_heatmap": [(lambda: api.write_heatmap("a result", out / "m.png", "a", "b"),
                           "result"),
                          (lambda: api.write_heatmap(res, "", "a", "b"), "path"),
                          (lambda: api.write_heatmap(res, out / "m.png", 1, "b"), "a_label"),
                          (lambda: api.write_heatmap(res, out / "m.png", "a", "b",
                                                     force="yes"), "force")],
    }


def test_every_public_function_refuses_bad_arguments_first(pair, tmp_path, monkeypatch):
    """A wrong type or an out-of-range value is a one-line MgrowError that names the function
    and the argument, raised before anything is written; the walk covers every public
    function of mgrow.api."""
    a, b = pair
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    calls = bad_calls(a, b, out)
    assert set(calls) == public_functions()
    before = snapshot(a.parent, out)
    problems = []
    for name, cases in calls.items():
        for call, arg in cases:
            try:
                call()
            except mgrow.MgrowError as e:
                msg = str(e)
                if "\n" in msg or not msg.startswith(f"{name}: ") \
                        or not re.search(rf"\b{arg}\b", msg):
                    problems.append(f"{name}/{arg}: {msg!r}")
            except Exception as e:  # noqa: BLE001 -- what the contract forbids
                problems.append(f"{name}/{arg}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}")
            else:
                problems.append(f"{name}/{arg}: accepted")
    assert not problems, "\n".join(problems)
    assert snapshot(a.parent, out) == before  # nothing written, not even a lock


def test_fuse_takes_the_cli_options_by_name_with_its_defaults():
    """fuse's options are explicit keyword parameters, with the CLI's defaults."""
    from mgrow.cli import growing
    from mgrow.growth import DEFAULT_NOISE
    params = inspect.signature(mgrow.fuse).parameters
    assert all(p.kind != p.VAR_KEYWORD for p in params.values())
    cli = inspect.signature(growing.fuse).parameters
    names = {"factor": "factor", "tiling": "tiling", "init": "init", "method": "method",
             "seed": "seed", "noise": "noise", "batch_size": "batch_size",
             "steps": "growth_steps", "bn_correct": "bn_correct"}
    for ours, theirs in names.items():
        default = cli[theirs].default
        assert params[ours].kind == params[ours].KEYWORD_ONLY, ours
        assert params[ours].default == getattr(default, "value", default), ours
    assert params["noise"].default is None and DEFAULT_NOISE  # None: the method's own


def test_good_arguments_still_work(pair, tmp_path):
    """Paths as str, Path, any os.PathLike or an Outcome; ints where floats go; the fused
    bundle records the options given by name."""
    a, b = pair

    class Where:  # a user's own os.PathLike
        def __fspath__(self) -> str:
            return str(b)
    assert mgrow.load(str(b)).sha256 == mgrow.load(Where()).sha256 == mgrow.load(b).sha256
    grown = mgrow.fuse(str(a), Where(), tmp_path / "g.safetensors", factor=2, seed=3,
                       init="random")
    man = load(grown).manifest
    assert man.arch.width == 2 * ARCH.width and man.growth.init == "random"
    assert man.lineage.options["seed"] == 3
    assert mgrow.count_flops(grown, reference_epochs=4)["ledger"]["reference_epochs"] == 4
    assert isinstance(mgrow.build_model(grown), torch.nn.Module)


# -- class 3: lineage walks are linear and never fatal ------------------------------------

def child(path: Path, base, parents: list[Parent]) -> Path:
    """Save `base`'s tensors at `path` with a manifest naming `parents`."""
    man = base.manifest.model_copy(update={"lineage": Lineage(operation="fuse",
                                                              parents=tuple(parents))})
    return save(path, man, base.tensors)


def test_info_loads_each_parent_once(tmp_path, monkeypatch):
    """Four bundles each naming the previous one 16 times: each file is loaded once (it
    was 16^3 loads), a parent met again is a reference to the first, not walked again."""
    base = make_bundle(tmp_path / "b0.safetensors", ARCH)
    chain = [base.path]
    for k in (1, 2, 3):
        prev = chain[-1]
        ref = Parent(sha256=load(prev).sha256, path=str(prev))
        chain.append(child(tmp_path / f"b{k}.safetensors", base, [ref] * 16))
    loads = []
    real = api.load

    def counted(path):
        loads.append(Path(path))
        if len(loads) > 50:
            pytest.fail(f"info loaded {len(loads)} bundles of a chain of 4 files")
        return real(path)
    monkeypatch.setattr(api, "load", counted)  # the bundle itself
    manifests = []
    real_manifest = history.read_manifest

    def counted_manifest(path):
        manifests.append(Path(path))
        return real_manifest(path)
    monkeypatch.setattr(history, "read_manifest", counted_manifest)  # its parents: manifests
    # only, each read once (mgrow.history)
    t0 = time.perf_counter()
    res = mgrow.info(chain[-1])
    assert time.perf_counter() - t0 < 30
    assert loads == [chain[-1]] and len(set(manifests)) == len(manifests) == 3
    lin, depth = res["lineage"], 0
    while lin["parents"]:
        first, *again = lin["parents"]
        assert len(again) == 15 and first["status"] == "found" and "seen_above" not in first
        for p in again:
            assert p["status"] == "found" and p["seen_above"] is True and "lineage" not in p
            assert p["found_at"] == first["found_at"] and p["sha256"] == first["sha256"]
        lin, depth = first["lineage"], depth + 1
    assert depth == 3 and lin["operation"] == "init"
    r = run_main("info", chain[-1])  # the tree's lines may fold at 160 columns in a pipe
    assert r.returncode == 0, r.stderr
    assert " ".join(r.stdout.split()).count("the same as above") >= 1
    r = run_main("info", chain[-1], "--json")
    assert r.returncode == 0 and r.stdout.count('"seen_above": true') == 3 * 15


def test_info_marks_a_parent_it_cannot_read(tmp_path):
    """A converted bundle's parent is the .pth it was converted from, not a bundle: info
    finds it and says so (it is the very file recorded, not an unreadable bundle); a
    truncated parent whose sha256 matches the record, and a parent that raises when read,
    are marked unreadable with their reasons."""
    from mgrow.convert import convert_checkpoint
    pth = tmp_path / "small.pth"
    torch.save(build(ARCH, None, seed=0).state_dict(), pth)
    conv, _ = convert_checkpoint(pth, "wrn-10-1", tmp_path / "conv.safetensors", width=0.5,
                                 input_size=8)
    res = mgrow.info(conv)
    [parent] = res["lineage"]["parents"]
    assert parent["status"] == "found" and "reason" not in parent
    assert parent["description"] == "a source checkpoint, not an mgrow bundle"
    r = run_main("info", conv)
    assert r.returncode == 0, r.stderr
    assert "unreadable" not in r.stdout and "a source checkpoint, not an mgrow" in r.stdout
    text = " ".join(r.stdout.split())  # converted without --data: no reference to scale by
    assert "1.00X unknown: the bundle records no training data" in text and "0.000e+00" not in text

    base = make_bundle(tmp_path / "whole.safetensors", ARCH)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(base.path.read_bytes()[:-1000])
    from mgrow.files import sha256_file
    raising = Path("/proc/self/mem")  # a regular file whose read fails (EIO), even for root
    parents = [Parent(sha256=sha256_file(cut), path=str(cut)),
               Parent(sha256="0" * 64, path=str(raising)),
               Parent(sha256=base.sha256, path=str(base.path))]
    kid = child(tmp_path / "kid.safetensors", base, parents)
    got = [(p["status"], p.get("reason", "")) for p in mgrow.info(kid)["lineage"]["parents"]]
    assert [s for s, _ in got] == ["unreadable", "unreadable", "found"]
    assert "truncated" in got[0][1] and "cannot read" in got[1][1]


# -- class 2: cka's Gram matrices are bounded before they are made ---------------------------

def test_cka_refuses_images_whose_grams_do_not_fit(pair, monkeypatch):
    """With MGROW_MEMORY_LIMIT below what 300 images' Gram matrices take, cka refuses in
    one line naming --images and the bytes, before any forward pass; 20 images still run."""
    a, b = pair
    forwards = []

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.device.type != "meta":
            forwards.append(type(module).__name__)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        monkeypatch.setenv("MGROW_MEMORY_LIMIT", "3M")
        with pytest.raises(mgrow.MgrowError) as e:
            mgrow.cka(a, b, "digits", images=300)
        assert not forwards
        msg = str(e.value)
        assert "\n" not in msg and "--images 300" in msg
        assert re.search(r"\d+(\.\d)? [kMG]B", msg) and "MGROW_MEMORY_LIMIT" in msg
        res = mgrow.cka(a, b, "digits", images=20)
        assert res.images == 20 and len(res.matrix) == len(res.layers_a) == 10
        assert forwards  # it did run this time
    finally:
        handle.remove()
    # the CLI shares the refusal
    r = run_main("cka", a, b, "--data", "digits", "--images", "300",
                 env={"MGROW_MEMORY_LIMIT": "3M"})
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "--images 300" in r.stderr
