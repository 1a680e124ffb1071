"""Bad input files: every command that reads one refuses it in one line and writes nothing.

Each damaged input is made once from a valid bundle; every case runs the real CLI and checks
the contract (rel_support.assert_refused): non-zero exit, one `mgrow: error:` line naming
the problem, no traceback, the input folder and the output folder unchanged.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from mgrow.manifest import FORMAT_VERSION, READABLE_VERSIONS
from rel_support import (assert_refused, digits_arch, mgrow, mgrow_exec, watch, with_header,
                         with_manifest, with_tensors, write_bundle)

GOOD = "good.safetensors"


def _cut(at):
    def make(good: Path, dst: Path) -> None:
        data = good.read_bytes()
        n = int.from_bytes(data[:8], "little")
        dst.write_bytes(data[:at(n, len(data))])
    return make


def _manifest(edit):
    return lambda good, dst: with_manifest(good, dst, edit)


def _header(edit):
    return lambda good, dst: with_header(good, dst, edit)


def _tensors(edit):
    def make(good: Path, dst: Path) -> None:
        from mgrow.bundle import META_KEY, load
        b = load(good)
        tensors = dict(b.tensors)
        edit(tensors)
        with_tensors(tensors, dst, {META_KEY: b.manifest.to_json()})
    return make


def _nan_first_bank(t):
    t["banks.0"] = t["banks.0"].clone()
    t["banks.0"].view(-1)[7] = float("nan")


class _RunsCode:
    """Unpickling this calls os.system: a pickle that tries to execute code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# name -> (how to make it from the valid bundle (None: leave it missing), expected message)
BAD_BUNDLES = {
    "missing": (None, "no such file"),
    "directory": (lambda good, dst: dst.mkdir(), "is a directory"),
    "empty": (lambda good, dst: dst.write_bytes(b""), r"not a safetensors file \(only 0 bytes"),
    "cut-in-length": (_cut(lambda n, size: 5), r"only 5 bytes"),
    "cut-in-header": (_cut(lambda n, size: 8 + n // 2), "truncated"),
    "cut-after-header": (_cut(lambda n, size: 8 + n), "corrupt or truncated"),
    "cut-in-data": (_cut(lambda n, size: (8 + n + size) // 2), "corrupt or truncated"),
    "cut-last-byte": (_cut(lambda n, size: size - 1), "corrupt or truncated"),
    "random-bytes": (lambda good, dst: dst.write_bytes(os.urandom(4096)),
                     "not a safetensors file"),
    "garbage-header": (lambda good, dst: dst.write_bytes((64).to_bytes(8, "little")
                                                         + bytes(range(192, 256))),
                       "header is not JSON"),
    "pickle": (lambda good, dst: torch.save({"w": torch.zeros(2)}, dst),
               "not a safetensors file"),
    "foreign-safetensors": (lambda good, dst: with_tensors({"w": torch.zeros(2)}, dst, None),
                            "without an mgrow manifest"),
    "metadata-not-object": (_header(lambda h: h.update(__metadata__=5)),
                            "__metadata__ is not a JSON object"),
    "manifest-not-text": (_header(lambda h: h["__metadata__"].update(mgrow={"a": 1})),
                          "invalid manifest"),
    "manifest-not-json": (_header(lambda h: h["__metadata__"].update(mgrow="{arch: ")),
                          "manifest is not valid JSON"),
    "manifest-not-object": (_header(lambda h: h["__metadata__"].update(mgrow="[1, 2]")),
                            "invalid manifest: not a JSON object"),
    "newer-format-version": (_manifest(lambda m: m.update(format_version=FORMAT_VERSION + 1)),
                             f"manifest format version {FORMAT_VERSION + 1}; this mgrow reads "
                             f"versions {', '.join(map(str, READABLE_VERSIONS))}"),
    "missing-field": (_manifest(lambda m: m.pop("lineage")), "invalid manifest: lineage"),
    "missing-nested-field": (_manifest(lambda m: m["arch"].pop("name")),
                             "invalid manifest: arch.name"),
    "wrong-type": (_manifest(lambda m: m["arch"].update(num_classes="ten")),
                   "invalid manifest: arch.num_classes"),
    "unknown-field": (_manifest(lambda m: m["arch"].update(colour="red")),
                      "invalid manifest: arch.colour"),
    "unknown-architecture": (_manifest(lambda m: m["arch"].update(name="mobilenet")),
                             "unknown architecture 'mobilenet'"),
    "arch-disagrees": (_manifest(lambda m: m["arch"].update(name="wrn-16-1")),
                       "tensors disagree with the declared architecture"),
    "classes-disagree": (_manifest(lambda m: m["arch"].update(num_classes=5)),
                         "invalid manifest: manifest: data digits has 10 classes and 1 "
                         "channels, the network 5 and 1"),
    "classes-disagree-no-data": (_manifest(lambda m: (m["arch"].update(num_classes=5),
                                                      m.update(data=None))),
                                 r"disagree .*fc\.bias is \(10,\) not \(5,\)"),
    "templates-disagree": (_manifest(lambda m: m["mixing"].update(templates=3)),
                           "tensors disagree with the declared architecture"),
    "tensor-missing": (_tensors(lambda t: t.pop("fc.bias")), "disagree.*missing fc.bias"),
    "tensor-extra": (_tensors(lambda t: t.update(extra=torch.zeros(3))),
                     "disagree.*unexpected extra"),
    "tensor-wrong-shape": (_tensors(lambda t: t.update({"fc.bias": torch.zeros(11)})),
                           r"fc\.bias is \(11,\) not \(10,\)"),
    "nan-weights": (_tensors(_nan_first_bank), "banks.0 holds NaN or infinite values"),
}

# Every command that reads a bundle, with BAD standing for the bad file (GOOD for the valid
# one); those that write do so to -o, or next to GOOD.
COMMANDS = {
    "eval": ("eval", "BAD"),
    "flops": ("flops", "BAD"),
    "export": ("export", "BAD", "-o", "out.safetensors"),
    "fuse-a": ("fuse", "BAD", "-o", "out.safetensors"),
    "fuse-b": ("fuse", "GOOD", "BAD", "-o", "out.safetensors"),
    "finetune": ("finetune", "BAD", "--epochs", "1", "-o", "out.safetensors"),
    "train-sibling": ("train-sibling", "BAD", "--epochs", "1", "-o", "out.safetensors"),
    "fuse-default-output": ("fuse", "GOOD", "BAD"),  # would write next to GOOD: nothing may
    "info": ("info", "BAD"),
    "cka-a": ("cka", "BAD", "GOOD"),
    "cka-b": ("cka", "GOOD", "BAD"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder with the valid bundle and one damaged file per BAD_BUNDLES entry."""
    folder = tmp_path_factory.mktemp("inputs")
    good = write_bundle(folder / GOOD)
    for name, (make, _) in BAD_BUNDLES.items():
        if make is not None:
            make(good, folder / f"{name}.safetensors")
    return folder


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", BAD_BUNDLES)
def test_bad_bundle_is_refused(inputs, tmp_path, name, command):
    bad, good = inputs / f"{name}.safetensors", inputs / GOOD
    args = [bad if a == "BAD" else good if a == "GOOD" else a for a in COMMANDS[command]]
    before = watch(inputs, tmp_path)
    assert_refused(mgrow(*args, cwd=tmp_path), before, BAD_BUNDLES[name][1])


def test_the_valid_bundle_passes(inputs, tmp_path):
    """The refusals above are the damaged files' doing: the valid one evaluates."""
    run = mgrow("eval", inputs / GOOD, cwd=tmp_path)
    assert run.rc == 0 and run.err == "" and "top-1" in run.out


def test_train_sibling_default_output_is_not_written(inputs):
    """Without -o, train-sibling would write next to SMALL: nothing appears there either."""
    before = watch(inputs)
    assert_refused(mgrow("train-sibling", inputs / "newer-format-version.safetensors",
                         "--epochs", "1", cwd=inputs), before,
                   f"format version {FORMAT_VERSION + 1}")


@pytest.mark.parametrize("name", ["cut-in-data", "nan-weights"])
def test_fresh_interpreter_same_contract(inputs, tmp_path, name):
    """A few cases through `python -m mgrow` itself (warnings not silenced)."""
    before = watch(inputs, tmp_path)
    run = mgrow_exec("fuse", inputs / GOOD, inputs / f"{name}.safetensors", "-o",
                     "out.safetensors", cwd=tmp_path)
    assert_refused(run, before, BAD_BUNDLES[name][1])


# -- plain checkpoints through `mgrow convert` ----------------------------------------------

CONVERT = ("--arch", "wrn-10-1", "--in-channels", "1", "--input-size", "8", "-o",
           "out.safetensors")


def _plain_state() -> dict[str, torch.Tensor]:
    from mgrow.arch import build
    return build(digits_arch(), None, seed=0).state_dict()


def _pth(edit):
    """A maker saving `edit(state_dict)` with torch.save."""
    return lambda dst, marker: torch.save(edit(_plain_state()), dst)


def _raw_pickle(dst: Path, marker: Path) -> None:
    dst.write_bytes(pickle.dumps({"state_dict": _plain_state(), "x": _RunsCode(marker)},
                                 protocol=pickle.HIGHEST_PROTOCOL))


def _torch_pickle(dst: Path, marker: Path) -> None:
    torch.save({"state_dict": _plain_state(), "x": _RunsCode(marker)}, dst)


def _zip_cut(dst: Path, marker: Path) -> None:
    torch.save(_plain_state(), dst)
    dst.write_bytes(dst.read_bytes()[:-100])


# name -> (maker(dst, marker), expected message)
BAD_CHECKPOINTS = {
    "unknown-keys": (_pth(lambda s: {**s, "extra": torch.zeros(3)}), "unexpected extra"),
    "missing-keys": (_pth(lambda s: {k: v for k, v in s.items() if k != "fc.weight"}),
                     "missing fc.weight"),
    "wrong-shape": (_pth(lambda s: {**s, "conv1.weight": torch.zeros(1, 1, 1, 1)}),
                    r"conv1\.weight is \(1, 1, 1, 1\) not \(16, 1, 3, 3\)"),
    "wrong-classes": (_pth(lambda s: {**s, "fc.weight": torch.zeros(5, 64)}),  # classes:
                      r"fc\.bias is \(10,\) not \(5,\)"),  # the classifier's rows (5)
    "not-a-dict": (_pth(lambda s: torch.zeros(3)), "no state_dict found"),
    "nested-elsewhere": (_pth(lambda s: {"weights": s}), "no state_dict found"),
    "inf-weights": (_pth(lambda s: {**s, "conv1.weight": s["conv1.weight"] / 0}),
                    "conv1.weight holds NaN or infinite values"),
    "pickle-runs-code": (_torch_pickle, "refused to load: it needs function posix.system"),
    "raw-pickle-runs-code": (_raw_pickle, "refused to load: not a plain tensor checkpoint"),
    "random-bytes": (lambda dst, marker: dst.write_bytes(os.urandom(4096)),
                     "not a plain tensor checkpoint|not a PyTorch checkpoint"),
    "empty": (lambda dst, marker: dst.write_bytes(b""), "not a PyTorch checkpoint"),
    "truncated-zip": (_zip_cut, "not a PyTorch checkpoint"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of plain checkpoints (one valid, the rest bad) and where code would leave
    its marker file if a pickle ran it."""
    folder = tmp_path_factory.mktemp("checkpoints")
    elsewhere = tmp_path_factory.mktemp("markers")
    torch.save(_plain_state(), folder / "good.pth")
    for name, (make, _) in BAD_CHECKPOINTS.items():
        make(folder / f"{name}.pth", elsewhere / name)
    return folder, elsewhere


def test_the_valid_checkpoint_converts(checkpoints, tmp_path):
    run = mgrow("convert", checkpoints[0] / "good.pth", *CONVERT, cwd=tmp_path)
    assert run.rc == 0, run.err
    assert (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("name", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_refused(checkpoints, tmp_path, name):
    folder, markers = checkpoints
    before = watch(folder, tmp_path, markers)
    run = mgrow("convert", folder / f"{name}.pth", *CONVERT, cwd=tmp_path)
    line = assert_refused(run, before, BAD_CHECKPOINTS[name][1])
    assert not (markers / name).exists(), "the pickle ran code"
    assert "weights_only` set to `False`" not in line  # never advise the unsafe way round


def test_code_pickle_fresh_interpreter(checkpoints, tmp_path):
    """Through `python -m mgrow`, warnings not silenced: refused in one line (torch warns
    about the pickle protocol; mgrow keeps that off stderr), nothing executed."""
    folder, markers = checkpoints
    before = watch(folder, tmp_path, markers)
    run = mgrow_exec("convert", folder / "raw-pickle-runs-code.pth", *CONVERT, cwd=tmp_path)
    assert_refused(run, before, "refused to load")
    assert not (markers / "raw-pickle-runs-code").exists(), "the pickle ran code"


@pytest.mark.parametrize("name", ["raw-pickle-runs-code", "pickle-runs-code"])
@pytest.mark.parametrize("command", ["eval", "fuse-a", "finetune"])
def test_code_pickle_given_as_bundle(checkpoints, tmp_path, name, command):
    """Commands that expect a bundle never unpickle: refused as not safetensors."""
    folder, markers = checkpoints
    args = [folder / f"{name}.pth" if a == "BAD" else a for a in COMMANDS[command]]
    before = watch(folder, tmp_path, markers)
    assert_refused(mgrow(*args, cwd=tmp_path), before, "not a safetensors file")
    assert not (markers / name).exists(), "the pickle ran code"


@pytest.mark.parametrize("name", ["missing", "directory", "empty", "cut-in-header",
                                  "cut-in-data", "random-bytes"])
def test_bad_plain_safetensors_for_convert(inputs, tmp_path, name):
    """convert also reads plain .safetensors: the file-level damage is refused the same."""
    before = watch(inputs, tmp_path)
    run = mgrow("convert", inputs / f"{name}.safetensors", *CONVERT, cwd=tmp_path)
    assert_refused(run, before, BAD_BUNDLES[name][1])


def test_pickles_would_run_code_if_unpickled(tmp_path):
    """The payloads are live: plain unpickling does run them (so the refusal above is what
    keeps the marker from appearing)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.exists()
