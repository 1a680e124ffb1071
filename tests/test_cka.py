"""Debiased linear CKA and the noise floor of `mgrow cka` (issue 24, item 5).

The biased estimator reads 0.1-0.4 between a conv layer's flattened features and
image-independent noise; the debiased one (the unbiased HSIC of Song et al., JMLR 2012, as
Kornblith et al. 2019 use it) reads about 0. Checked here: the debiased estimator against
Song et al.'s formula written out term by term, and against the U-statistic it comes from;
the floor of both on real CIFAR-10 features of a trained net; 1 for a representation with
itself and the invariances, under both; and the command line.
"""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch

import mgrow
from mgrow.similarity import FEATURE_LAYERS, centered_gram, images, linear_cka, u_centre
from conftest import run_main


def song_hsic1(k: list[list[float]], l: list[list[float]]) -> float:
    """Song et al. (2012), eq. (5), term by term in O(n^2): with K~, L~ the Gram matrices
    with a zero diagonal, HSIC_1 = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2))
    - 2 / (n-2) 1'K~L~1] / (n (n-3))."""
    n = len(k)
    kt = [[0.0 if i == j else k[i][j] for j in range(n)] for i in range(n)]
    lt = [[0.0 if i == j else l[i][j] for j in range(n)] for i in range(n)]
    trace = sum(kt[i][j] * lt[j][i] for i in range(n) for j in range(n))
    k_rows = [sum(row) for row in kt]
    l_rows = [sum(row) for row in lt]
    total = sum(k_rows) * sum(l_rows) / ((n - 1) * (n - 2))
    cross = sum(k_rows[i] * l_rows[i] for i in range(n))  # 1'K~L~1, K~ symmetric
    return (trace + total - 2 * cross / (n - 2)) / (n * (n - 3))


def u_statistic_hsic(k: list[list[float]], l: list[list[float]]) -> float:
    """The U-statistic HSIC_1 estimates, in O(n^4): the mean over distinct ordered
    (i, j, q, r) of k_ij l_ij + k_ij l_qr - 2 k_ij l_iq (Song et al. 2012, Theorem 3)."""
    n = len(k)
    terms = [k[i][j] * l[i][j] + k[i][j] * l[q][r] - 2 * k[i][j] * l[i][q]
             for i, j, q, r in itertools.permutations(range(n), 4)]
    return sum(terms) / len(terms)


def reference_cka(x: torch.Tensor, y: torch.Tensor, hsic=song_hsic1) -> float:
    k, l = (x @ x.T).tolist(), (y @ y.T).tolist()  # raw Gram matrices, not centred
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def _pair(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (n, 6) and (n, 9) of n samples, related, off-centre and of other scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, dtype=torch.float64, generator=g) * 2 + 3
    y = torch.cat([x @ torch.randn(6, 4, dtype=torch.float64, generator=g),
                   torch.randn(n, 5, dtype=torch.float64, generator=g) * 5], 1) - 1
    return x, y


@pytest.mark.parametrize("n,seed", [(4, 0), (5, 1), (8, 2), (13, 3), (20, 4)])
def test_debiased_is_song_et_al_unbiased_hsic(n, seed):
    """u_centre's inner product over n (n - 3) is Song et al.'s HSIC_1, and debiased CKA
    the ratio of three of them, to 1e-6; biased CKA is not (it is another estimator)."""
    x, y = _pair(n, seed)
    k, l = centered_gram(x), centered_gram(y)
    got = float((u_centre(k.clone()) * u_centre(l.clone())).sum()) / (n * (n - 3))
    want = song_hsic1((x @ x.T).tolist(), (y @ y.T).tolist())
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert linear_cka(x, y, debiased=True) == pytest.approx(reference_cka(x, y), abs=1e-6)
    assert abs(linear_cka(x, y) - reference_cka(x, y)) > 1e-3


@pytest.mark.parametrize("n,seed", [(5, 5), (7, 6)])
def test_debiased_is_the_u_statistic(n, seed):
    """The same against the U-statistic's definition (all distinct 4-tuples)."""
    x, y = _pair(n, seed)
    assert song_hsic1((x @ x.T).tolist(), (y @ y.T).tolist()) == pytest.approx(
        u_statistic_hsic((x @ x.T).tolist(), (y @ y.T).tolist()), rel=1e-9)
    assert linear_cka(x, y, debiased=True) == pytest.approx(
        reference_cka(x, y, u_statistic_hsic), abs=1e-6)


def test_debiased_needs_four_samples():
    x, y = _pair(3, 0)
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x, y, debiased=True)
    assert 0 < linear_cka(x, y) <= 1 + 1e-12  # the biased one is defined from 2


# -- real CIFAR-10 features --------------------------------------------------------------------

@pytest.fixture(scope="module")
def net(tiny_cifar, tmp_path_factory):
    """A wrn-10-1 x0.5 trained one epoch on 300 real CIFAR-10 images (about 3 s); its data
    spec and the 200 test images of tiny_cifar, normalised as it records."""
    path = tmp_path_factory.mktemp("cka") / "net.safetensors"
    spec = f"npz:{tiny_cifar}"
    mgrow.train("wrn-10-1", path, data=spec, epochs=1, width=0.5, progress="quiet")
    bundle = mgrow.load(path)
    x = images(mgrow.DataSource(spec).load(bundle.manifest.data), 200)
    return path, spec, bundle.model().eval(), x


def _features(model, x) -> dict[str, torch.Tensor]:
    """Return {layer: output (n, p), float64} of every conv and linear layer."""
    out = {}
    hooks = [m.register_forward_hook(lambda _m, _i, y, k=k: out.__setitem__(
        k, y.flatten(1).double())) for k, m in model.named_modules()
        if isinstance(m, FEATURE_LAYERS)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_against_noise_debiased_is_near_zero_biased_is_not(net):
    """Every conv layer of a trained net on 200 real test images against i.i.d. Gaussian
    features of its own shape (seeded): biased CKA above 0.15, debiased within 0.05 of 0."""
    _, _, model, x = net
    g = torch.Generator().manual_seed(0)
    convs = {k: f for k, f in _features(model, x).items() if k != "fc"}
    assert len(convs) == 9
    for name, f in convs.items():
        noise = torch.randn(f.shape, dtype=torch.float64, generator=g)
        assert linear_cka(f, noise) > 0.15, name
        assert abs(linear_cka(f, noise, debiased=True)) < 0.05, name


def test_floor_of_the_matrix(net):
    """`cka`'s floor (B's images shuffled) on real features: debiased, every entry within
    0.05 of 0 while the matrix's diagonal is 1; biased, each same-name conv floor is
    above 0.05 and near its expectation under shuffling, tr(K) tr(L) / ((n-1) |K| |L|)."""
    path, spec, model, x = net
    deb = mgrow.cka(path, path, spec, images=200, debiased=True)
    assert deb.debiased and deb.images == 200
    assert max(abs(v) for row in deb.floor for v in row) < 0.05
    for i in range(len(deb.matrix)):
        assert deb.matrix[i][i] == pytest.approx(1.0, abs=1e-9)
    biased = mgrow.cka(path, path, spec, images=200)
    assert not biased.debiased
    floor = biased.matched(biased.floor)
    feats = _features(model, x)
    for name, f in feats.items():
        if name == "fc":
            continue
        k = centered_gram(f)
        expected = float(k.trace() ** 2 / (199 * (k * k).sum()))
        assert floor[name] > 0.05 and floor[name] == pytest.approx(expected, abs=0.02), name
        assert floor[name] - abs(deb.matched(deb.floor)[name]) > 0.04, name
        assert biased.matched()[name] == pytest.approx(1.0, abs=1e-9)


def test_one_with_itself_and_invariances_under_both(net):
    """On real features: CKA of a representation with itself is 1, and CKA is unchanged by
    an orthogonal transform (a 64 x 64 rotation of each block of 64 features, then a
    Householder reflection of the whole) and an isotropic scaling of either side, under
    both estimators; a generic invertible transform changes it."""
    _, _, model, x = net
    feats = _features(model, x)
    a, b = feats["blocks.1.conv2"], feats["blocks.2.conv1"]
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=g))
    v = torch.randn(a.shape[1], 1, dtype=torch.float64, generator=g)
    v /= v.norm()

    def rotate(f: torch.Tensor) -> torch.Tensor:
        f = (f.reshape(len(f), -1, 64) @ q).reshape(len(f), -1)
        return f - 2 * (f @ v) @ v.T

    mix = torch.randn(64, 64, dtype=torch.float64, generator=g)
    for debiased in (False, True):
        base = linear_cka(a, b, debiased)
        assert 0.05 < base < 0.999
        assert linear_cka(a, a, debiased) == pytest.approx(1.0, abs=1e-10)
        assert linear_cka(rotate(a) * 3.7, a, debiased) == pytest.approx(1.0, abs=1e-10)
        assert linear_cka(rotate(a) * 3.7, b, debiased) == pytest.approx(base, abs=1e-10)
        assert linear_cka(a, 0.01 * b, debiased) == pytest.approx(base, abs=1e-10)
        skewed = (a.reshape(len(a), -1, 64) @ mix).reshape(len(a), -1)
        assert abs(linear_cka(skewed, b, debiased) - base) > 1e-3


def test_command_line(net):
    """`--debiased --json` says so and gives the floor beside the matrix; the table has a
    floor column and the mean floor; fewer than 4 images are refused for --debiased in one
    line; a non-bool `debiased` is refused by the API."""
    path, spec, _, _ = net
    res = run_main("cka", path, path, "--data", spec, "--images", "64", "--debiased", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["debiased"] is True
    assert len(out["floor"]) == len(out["matrix"]) == len(out["layers_a"])
    assert set(out["matched_floor"]) == set(out["matched"])
    assert all(abs(v) < 0.1 for v in out["matched_floor"].values())  # 64 images: noisier
    res = run_main("cka", path, path, "--data", spec, "--images", "64")
    assert res.returncode == 0, res.stderr
    assert "floor" in res.stdout and re.search(r"same-name layers: 1\.000 \(floor 0\.\d{3}\)",
                                               res.stdout)
    res = run_main("cka", path, path, "--data", spec, "--images", "3", "--debiased")
    assert res.returncode != 0
    assert res.stderr.strip() == "mgrow: error: --debiased needs --images of at least 4, not 3"
    with pytest.raises(mgrow.MgrowError, match="debiased"):
        mgrow.cka(path, path, spec, debiased="yes")
