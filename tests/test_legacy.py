"""Bundles written by an earlier mgrow still load and compute bit-equal logits.

tests/fixtures/legacy/ holds bundles written by mgrow at commit fe7bfdb (before the
restructure into layered packages; `expected.safetensors` records how): a template-mixed
WRN-10-1 grown 2x by MixtureGrowth from a small net and its sibling trained on the built-in
digits, and the same small net grown by Net2Net (plain). `expected.safetensors` holds 16
normalised digits test images and the logits that mgrow computed for them then.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mgrow

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"


@pytest.mark.parametrize("name, mixed", [("grown", True), ("n2n", False)])
def test_old_bundles_compute_the_same_logits(name, mixed):
    expected = load_file(FIXTURES / "expected.safetensors")
    bundle = mgrow.load(FIXTURES / f"{name}.safetensors")
    assert (bundle.manifest.mixing is not None) == mixed
    assert bundle.manifest.growth is not None and bundle.manifest.arch.width == 1.0
    model = bundle.model().eval()
    with torch.no_grad():
        logits = model(expected["input"])
    assert torch.equal(logits, expected[f"logits.{name}"])
