"""The faithful baselines (issue 24, items 2-4), on real CIFAR-10: GradMax as growneuron's
AddGradmax (zero fan-in, fan-out the top right singular vectors of the gradient statistic
at 0.5 x the mean norm; zero fan-out and top left singular fan-in where a BatchNorm sits
between), Firefly over-grown, optimised, scored over every batch and ranked, and every
channel group (residual streams included) grown from data, with the fractions reported.

The statistic is checked against autograd on member A itself, not against mgrow's own
patch arithmetic: an auxiliary linear path (the new channels with BN and ReLU taken as the
identity, growneuron's auxiliary layer) is added from each writer's input to each reader's
output, and the loss gradients of its fan-in and fan-out are measured."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mgrow.arch import build
from mgrow.bundle import Bundle
from mgrow.flops import forward_flops
from mgrow.growth import Job, fuse
from mgrow.growth import firefly as ff
from mgrow.growth.gradmax import FORMS
from mgrow.growth.grid import block_sources, common, head_name, plain_state
from mgrow.growth.units import SCALE, Steps, concat, find_groups, widen
from mgrow.manifest import ArchSpec

from conftest import make_bundle

BLOCK = ArchSpec(name="wrn-16-1", width=0.5, norm="block")  # the paper's CIFAR WRN layout
EVERY = ArchSpec(name="wrn-10-1", width=0.5)  # BN before every conv
BATCH, STEPS = 32, 2


@pytest.fixture(scope="module")
def data(cifar_256):
    return cifar_256


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    d = tmp_path_factory.mktemp("baselines")
    return {arch.norm: make_bundle(d / f"{arch.norm}.safetensors", arch, seed=1)
            for arch in (BLOCK, EVERY)}


@pytest.fixture(scope="module")
def gradmax(members, data):
    """Each member grown by GradMax with its default eps, and with eps 0."""
    return {(norm, eps): fuse([a], method="gradmax", data=data, batch_size=BATCH,
                              steps=STEPS, noise=eps)
            for norm, a in members.items() for eps in (None, 0.0)}


def _model(grown) -> torch.nn.Module:
    return Bundle(grown.manifest, grown.tensors, Path("grown"), "").model()


def _plain(a) -> torch.nn.Module:
    """Return member A as a plain network (its generated weights)."""
    model = build(a.manifest.arch)
    model.load_state_dict(plain_state(a))
    return model


def _groups(a):
    arch = a.manifest.arch.widened(2)
    return find_groups(build(arch), (arch.in_channels, arch.input_size, arch.input_size))


def _parts(grown, a, group):
    """Return the grown new channels' fan-in (n, writer dims) and fan-out (n, reader dims),
    and A's own (o, ...), from the grown tensors."""
    t, s = grown.tensors, plain_state(a)
    o = s[f"{group.writers[0]}.weight"].shape[0]
    old = {n: s[f"{n}.weight"].shape for n in group.writers + group.readers}
    fan_in = concat([t[f"{w}.weight"][o:, :old[w][1]] for w in group.writers], 0)
    fan_out = concat([t[f"{r}.weight"][:old[r][0], o:] for r in group.readers], 1)
    a_in = concat([s[f"{w}.weight"] for w in group.writers], 0)
    a_out = concat([s[f"{r}.weight"][:, :o] for r in group.readers], 1)
    return fan_in, fan_out, a_in, a_out


def _linearised(a, group, fan_in, fan_out, batches):
    """Return the loss gradients (summed over the batches) of an auxiliary linear path added
    to member A for new channels with fan-in `fan_in` (n, writer dims) and fan-out `fan_out`
    (n, reader dims): each reader's output gains, for every writer it sees, the writer's
    input through the fan-in and then the fan-out (the path between taken as the identity;
    a linear reader takes it globally average-pooled). Training mode, BN statistics fixed."""
    model = _plain(a).train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    layers = dict(model.named_modules())
    shapes = {n: layers[n].weight.shape for n in group.writers + group.readers}
    n = len(fan_in)
    x_in = fan_in.clone().requires_grad_()
    x_out = fan_out.clone().requires_grad_()
    rows, at = {}, 0
    for w in group.writers:
        size = shapes[w][1:].numel()
        rows[w] = x_in[:, at:at + size].reshape(n, *shapes[w][1:])
        at += size
    cols, at = {}, 0
    for r in group.readers:
        size = shapes[r][0] * shapes[r][2:].numel()
        cols[r] = x_out[:, at:at + size].reshape(n, shapes[r][0], *shapes[r][2:]).transpose(0, 1)
        at += size
    seen = {}

    def writer_hook(name):
        def hook(mod, args, out):
            x = args[0]
            seen[name] = F.linear(x, rows[name]) if isinstance(mod, torch.nn.Linear) else \
                F.conv2d(x, rows[name], None, mod.stride, mod.padding, mod.dilation)
        return hook

    def reader_hook(name):
        def hook(mod, args, out):
            for w in group.reach[name]:
                h = seen[w]
                if isinstance(mod, torch.nn.Linear):
                    out = out + F.linear(h.mean((2, 3)) if h.dim() == 4 else h, cols[name])
                else:
                    out = out + F.conv2d(h, cols[name], None, mod.stride, mod.padding,
                                         mod.dilation)
            return out
        return hook

    hooks = [layers[w].register_forward_hook(writer_hook(w)) for w in group.writers]
    hooks += [layers[r].register_forward_hook(reader_hook(r)) for r in group.readers]
    try:
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
    finally:
        for h in hooks:
            h.remove()
    return x_in.grad, x_out.grad


def _in_span(v: torch.Tensor, basis: torch.Tensor) -> float:
    """Return the relative norm of the part of the rows of v outside the row span of basis."""
    q, _ = torch.linalg.qr(basis.double().T)
    v = v.double()
    return float((v - (v @ q) @ q.T).norm() / v.norm())


def test_groups_of_a_wrn_include_the_streams():
    """A block's inner width is a pair; a stream is one group of every layer writing it and
    every layer reading it (through BN, ReLU, the skip additions and the global pool)."""
    arch = BLOCK.widened(2)
    found = {tuple(g.writers): g for g in find_groups(build(arch), (3, 32, 32))}
    assert found[("blocks.0.conv1",)].readers == ["blocks.0.conv2"]
    assert not found[("blocks.0.conv1",)].normed and found[("blocks.0.conv1",)].stat
    stage2 = found[("blocks.2.shortcut", "blocks.2.conv2", "blocks.3.conv2")]
    assert stage2.readers == ["blocks.3.conv1", "blocks.4.shortcut", "blocks.4.conv1"]
    assert stage2.reach["blocks.3.conv1"] == ["blocks.2.shortcut", "blocks.2.conv2"]
    assert stage2.normed and stage2.stat  # the pre-activation BN of every block
    last = found[("blocks.4.shortcut", "blocks.4.conv2", "blocks.5.conv2")]
    assert last.readers == ["blocks.5.conv1", "fc"] and last.stat
    assert ("conv1", "blocks.0.conv2", "blocks.1.conv2") in found  # the stem writes stage 1
    assert len(found) == 6 + 3  # 6 pairs, 3 streams
    every = {tuple(g.writers): g for g in find_groups(build(EVERY.widened(2)), (3, 32, 32))}
    assert all(g.normed for g in every.values())  # BN before every conv


def test_gradmax_zero_fan_in_and_top_singular_fan_out(members, gradmax, data):
    """Published GradMax where no BN sits between (every pair of the --norm block WRN): new
    fan-in at eps x A's mean norm, fan-out at SCALE (0.5) x A's mean norm, spanning the top
    right singular subspace of the statistic measured by autograd: the fan-in gradient it
    gives, sent back, stays in its span, and it beats random fan-outs by far."""
    a, grown = members["block"], gradmax["block", None]
    eps = grown.manifest.growth.noise
    assert eps == 1e-5
    batches = list(Steps(data, BATCH, 0, STEPS))
    pairs = [g for g in _groups(a) if not g.normed]
    assert len(pairs) == 6
    gen = torch.Generator().manual_seed(0)
    for g in pairs:
        fan_in, fan_out, a_in, a_out = _parts(grown, a, g)
        torch.testing.assert_close(fan_in.norm(dim=1), torch.full(
            (len(fan_in),), eps * float(a_in.norm(dim=1).mean())), rtol=1e-4, atol=0)
        assert bool((fan_in >= 0).all())  # growneuron's 'random': uniform [0, 1) rows
        torch.testing.assert_close(fan_out.norm(dim=1), torch.full(
            (len(fan_out),), SCALE * float(a_out.norm(dim=1).mean())), rtol=1e-4, atol=0)
        g_in, _ = _linearised(a, g, torch.zeros_like(fan_in), fan_out, batches)
        _, back = _linearised(a, g, g_in, torch.zeros_like(fan_out), batches)
        assert _in_span(back, fan_out) < 1e-3, g.writers  # M^T M V in span(V)
        rand = torch.randn(fan_out.shape, generator=gen)
        rand = torch.linalg.qr(rand.T)[0].T * fan_out.norm(dim=1, keepdim=True)
        g_rand, _ = _linearised(a, g, torch.zeros_like(fan_in), rand, batches)
        assert g_in.norm() > 2 * g_rand.norm(), (g.writers, g_in.norm(), g_rand.norm())


def test_gradmax_keeps_the_function_up_to_eps(members, gradmax, cifar_batch):
    """Zero fan-in keeps A's logits: exactly at eps 0, within a small multiple of eps
    otherwise (eval and training mode)."""
    for norm in ("block", "every"):
        a = members[norm].model()
        for train in (False, True):
            with torch.no_grad():
                ref = a.train(train)(cifar_batch)
                exact = _model(gradmax[norm, 0.0]).train(train)(cifar_batch)
                near = _model(gradmax[norm, None]).train(train)(cifar_batch)
            torch.testing.assert_close(exact, ref, rtol=1e-5, atol=1e-5)
            diff = float((near - ref).abs().max())
            assert diff < 100 * 1e-5 * float(ref.abs().max()), (norm, train, diff)
            if norm == "block":
                assert diff > 0  # the published near-zero fan-in, not a zero fan-out


def test_gradmax_where_a_bn_sits_between_grows_the_fan_in(members, gradmax, data):
    """Where a BN lies between (every group of the --norm every WRN, every stream): zero
    fan-out, so A's function exactly; fan-in at SCALE x A's mean norm, spanning the top left
    singular subspace of the statistic (over all the group's writers and readers)."""
    batches = list(Steps(data, BATCH, 0, STEPS))
    for norm in ("every", "block"):
        a, grown = members[norm], gradmax[norm, None]
        normed = [g for g in _groups(a) if g.normed]
        assert normed
        for g in normed:
            fan_in, fan_out, a_in, _ = _parts(grown, a, g)
            assert not fan_out.any()
            torch.testing.assert_close(fan_in.norm(dim=1), torch.full(
                (len(fan_in),), SCALE * float(a_in.norm(dim=1).mean())), rtol=1e-4, atol=0)
            _, g_out = _linearised(a, g, fan_in, torch.zeros_like(fan_out), batches)
            rank = torch.linalg.matrix_rank(g_out.double(), rtol=1e-5)
            top = fan_in[:rank]  # beyond the statistic's rank the rows are random
            g_in, _ = _linearised(a, g, torch.zeros_like(fan_in), g_out, batches)
            assert _in_span(g_in, top) < 1e-3, (norm, g.writers)  # M M^T X in span(X)


def test_streams_are_grown_from_data_over_all_their_layers(members, gradmax, data):
    """A stream channel's fan-in spans every writer (stem or shortcut and each block's
    conv2), chosen from the statistic over every reader: it gives a larger linearised
    fan-out gradient, over all the readers, than random fan-in at the same norms."""
    a, grown = members["block"], gradmax["block", None]
    batches = list(Steps(data, BATCH, 0, STEPS))
    gen = torch.Generator().manual_seed(1)
    streams = [g for g in _groups(a) if len(g.writers) > 1]
    assert len(streams) == 3
    for g in streams:
        fan_in, fan_out, _, _ = _parts(grown, a, g)
        o = plain_state(a)[f"{g.writers[0]}.weight"].shape[0]
        for w in g.writers:  # every writer holds part of every new channel's fan-in
            assert bool((grown.tensors[f"{w}.weight"][o:].flatten(1).norm(dim=1) > 0).all())
        _, chosen = _linearised(a, g, fan_in, torch.zeros_like(fan_out), batches)
        rand = torch.randn(fan_in.shape, generator=gen)
        rand = rand / rand.norm(dim=1, keepdim=True) * fan_in.norm(dim=1, keepdim=True)
        _, random = _linearised(a, g, rand, torch.zeros_like(fan_out), batches)
        assert chosen.norm() > 1.5 * random.norm(), (g.writers, chosen.norm(), random.norm())


def test_the_scope_of_data_driven_growth_is_reported(members, gradmax):
    """The note gives the share of new units in each form; on the --norm block WRN the
    pairs are published GradMax, the stem and streams zero fan-out from data, none random."""
    a, grown = members["block"], gradmax["block", None]
    counts = [0, 0, 0]
    for g in _groups(a):
        o = plain_state(a)[f"{g.writers[0]}.weight"].shape[0]
        counts[0 if g.stat and not g.normed else 1 if g.stat else 2] += o
    assert counts[2] == 0 and counts[0] and counts[1]
    note = grown.notes[0]
    assert note.startswith(f"gradmax grew {sum(counts)} units: ")
    shares = [int(s) for s in re.findall(r"(\d+)% ", note)]
    assert shares == [round(100 * c / sum(counts)) for c in counts]
    assert [f in note for f in FORMS] == [True] * 3


def _job(a, noise: float = 0.01) -> tuple[Job, dict]:
    arch = a.manifest.arch.widened(2)
    skeleton = build(arch, a.manifest.mixing.model_copy(update={"factor": 2}), meta=True)
    job = Job([a], skeleton, arch, a.manifest.mixing, "orthogonal", noise,
              torch.Generator().manual_seed(0), 0)
    state = plain_state(a)
    return job, widen(job, state, common([state], skeleton, block_sources(2, 1),
                                         head_name(skeleton)))


@pytest.fixture(scope="module")
def searched(members, data):
    """Firefly's candidates for the --norm block member: over-grown, optimised, scored."""
    job, wide = _job(members["block"])
    return job, wide, ff.search(wide, Steps(data, BATCH, 0, STEPS), job)


def test_firefly_over_grows_and_keeps_the_best_candidates(searched):
    """2 x the new units as candidates per group; each group keeps its n best by
    first-order gain, with the fan-out sign that lowers the loss."""
    _, wide, cand = searched
    for k, i in enumerate(cand.groups):
        n = wide.new(wide.groups[i])
        assert len(cand.fan_in[k]) == len(cand.fan_out[k]) == ff.OVERGROW * n
        for f, target in zip((cand.fan_in[k], cand.fan_out[k]), cand.targets[k]):
            torch.testing.assert_close(f.detach().norm(dim=1), torch.full((2 * n,), target),
                                       rtol=1e-4, atol=0)  # projected to the target norms
    kept = ff.select(wide, cand)
    wide2 = copy.deepcopy(wide)
    ff.keep(wide2, cand)
    for k, idx in enumerate(kept):
        score = cand.score(k)
        dropped = torch.ones(len(score), dtype=torch.bool)
        dropped[idx] = False
        assert float(score[idx].min()) >= float(score[dropped].max())
        g = wide2.groups[cand.groups[k]]
        o, n = wide2.old[g.writers[0]][0], len(idx)
        placed = concat([wide2.weight(r)[:wide2.old[r][0], o:o + n] for r in g.readers], 1)
        sign = torch.where(cand.dot[k][idx] > 0, -1.0, 1.0).view(-1, 1)
        torch.testing.assert_close(placed, cand.fan_out[k][idx].detach() * sign)
        assert bool((cand.dot[k][idx] * sign.view(-1) <= 0).all())  # lowers the loss


def test_firefly_scores_over_every_batch(searched, data):
    """The score is the fan-out gradient summed over all the growth batches: the sum of the
    per-batch scores, not the first batch's."""
    job, wide, cand = searched
    big = ff.over_grown(wide, ff.over_arch(job, ff.OVERGROW), ff.OVERGROW)
    batches = list(Steps(data, BATCH, 0, STEPS))
    parts = []
    for b in batches:
        c = copy.deepcopy(cand)
        ff.score(wide, big, c, [b])
        parts.append(c.dot)
    both = copy.deepcopy(cand)
    ff.score(wide, big, both, batches)
    for k in range(len(cand.groups)):
        torch.testing.assert_close(both.dot[k], parts[0][k] + parts[1][k], rtol=1e-4,
                                   atol=1e-7)
        torch.testing.assert_close(both.dot[k], cand.dot[k])
        assert not torch.allclose(both.dot[k], parts[0][k], rtol=1e-2, atol=0)


def test_firefly_grown_net_lowers_the_loss_on_its_batches(members, data):
    """The kept candidates decrease the loss to first order more than the dropped ones, and
    the grown net's loss on the growth batches is below A's (training mode)."""
    a = members["block"]
    grown = fuse([a], method="firefly", data=data, batch_size=BATCH, steps=STEPS)
    kept, dropped = map(float, re.search(r"sum kept (\S+), dropped (\S+)\)",
                                         grown.notes[0]).groups())
    assert kept > dropped > 0
    with torch.no_grad():
        losses = [sum(float(F.cross_entropy(m.train()(x), y))
                      for x, y in Steps(data, BATCH, 0, STEPS))
                  for m in (_model(grown), a.model())]
    assert losses[0] < losses[1], losses
    phase = grown.manifest.phases[-1]
    over = BLOCK.widened(1 + ff.OVERGROW)  # A + 2 x the new units
    assert phase.forward_flops == forward_flops(over) and phase.images == 2 * STEPS * BATCH
