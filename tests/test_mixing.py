"""Template-mixed layers: the generated weights, their gradients and the bank layout."""

from __future__ import annotations

import pytest
import torch

from mgrow.arch import build
from mgrow.manifest import ArchSpec, MixingSpec
from mgrow.mixing import mix, mixed_layers


@pytest.mark.parametrize("axis", ["row", "col"])
@pytest.mark.parametrize("g_out,g_in,m,shape", [(1, 1, 1, (3, 2, 3, 3)), (2, 2, 2, (3, 2, 3, 3)),
                                                (3, 3, 2, (3, 2)), (4, 4, 1, (2, 3, 1, 1)),
                                                (2, 1, 2, (3, 4)), (1, 3, 2, (3, 4))])
def test_mix_values_and_gradients(axis, g_out, g_in, m, shape):
    torch.manual_seed(0)
    t = 3
    alpha = torch.randn(g_out, g_in, t, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(m, t, *shape, dtype=torch.float64, requires_grad=True)
    w = mix(alpha, bank, axis)
    o, i = shape[:2]
    assert w.shape == (g_out * o, g_in * i, *shape[2:])
    for r in range(g_out):
        for c in range(g_in):
            owner = (r if axis == "row" else c) % m
            ref = sum(alpha[r, c, k] * bank[owner, k] for k in range(t))
            assert torch.allclose(w[r * o:(r + 1) * o, c * i:(c + 1) * i], ref)
    assert torch.autograd.gradcheck(lambda a, b: mix(a, b, axis), (alpha, bank))


def test_tile_value_independent_of_grid():
    """A tile is bit-equal whether it stands alone or inside a larger grid."""
    torch.manual_seed(1)
    bank = torch.randn(2, 4, 16, 8, 3, 3)
    alpha = torch.randn(2, 2, 4)
    grid = mix(alpha, bank, "row")
    for r in range(2):
        alone = mix(alpha[r:r + 1, r:r + 1], bank[r:r + 1], "row")
        assert torch.equal(grid[r * 16:(r + 1) * 16, r * 8:(r + 1) * 8], alone)


def test_pairs_share_banks_and_fresh_weights_look_plain():
    arch = ArchSpec(name="wrn-16-4")
    model = build(arch, MixingSpec(), seed=0)
    plain = dict(build(arch, seed=0).named_parameters())
    layers = mixed_layers(model)
    banks = {}
    for name, layer in layers.items():
        banks.setdefault(layer.bank_index, []).append(name)
    groups = list(banks.values())
    assert max(len(g) for g in groups) == 2  # never more than two layers per bank
    for names in groups:
        t = layers[names[0]].bank.shape[1]
        role = layers[names[0]].role
        assert t == (1 if role != "inner" else 2 * len(names))
        if len(names) == 2:  # consecutive in construction order, identical tile shapes
            order = list(layers)
            assert order.index(names[1]) == order.index(names[0]) + 1
            assert layers[names[0]].tile_shape == layers[names[1]].tile_shape
            w0, w1 = (layers[n].weight().detach().flatten() for n in names)
            assert abs(float(torch.corrcoef(torch.stack([w0, w1]))[0, 1])) < 0.05
    for name, layer in layers.items():  # same initial scale as the plain layer (Kaiming)
        std, ref = float(layer.weight().detach().std()), float(plain[f"{name}.weight"].detach().std())
        assert 0.8 < std / ref < 1.25, name


def test_frozen_edges_are_buffers_and_inner_coefficients_train():
    model = build(ArchSpec(name="wrn-10-1"), MixingSpec())
    names = {n for n, _ in model.named_parameters()}
    assert "conv1.alpha" not in names and "fc.alpha" not in names
    assert "conv1.alpha" in model.state_dict()
    assert "blocks.0.conv1.alpha" in names
    free = build(ArchSpec(name="wrn-10-1"), MixingSpec(freeze_edges=False))
    assert "fc.alpha" in {n for n, _ in free.named_parameters()}
