"""Data-driven growth baselines on plain wide networks: GradMax and Firefly, the paper's
other two baselines, as their authors' code runs them (growth.gradmax, growth.firefly).

Both grow member A alone into the plain g-times-wider net (as Random and Net2Net do; the
paper compares them as plain baselines, and their objectives are about individual units,
which template mixing would tie together). The wide net (growth.units.widen) carries A in
tile (0, 0); every new channel of every layer is a unit the method initialises, through
the channel *groups* it belongs to (growth.units): a WRN block's inner width, as in
growneuron, and also the residual streams, the stem and the shortcuts, whose channels are
written and read by several layers (growneuron keeps those widths fixed; mgrow widens
every layer, so they get data-driven directions too, their fan-out or fan-in over all the
layers that read or write them). Norm layers of new channels are copies of A's
(growth.grid.common); new units' biases are 0.

Cost: every growth-step pass is one forward and backward pass per batch of `batch_size`
training images (GradMax: one pass of the wide net over `steps` batches; Firefly: two
passes of its over-grown net). The ledger gets a growth-stage row `fuse` with 3 x forward
FLOPs x those images of the network the passes ran, like any training phase. Finding the
groups (one forward pass of 2 blank inputs), the statistic's arithmetic on the captured
tensors and the SVDs read no images and are not counted.

Owns `grow`. Imports mgrow.errors, flops, manifest, growth.grid and the growth modules
below it (units, gradmax, firefly).
"""

from __future__ import annotations

import time

import torch

from ..errors import MgrowError
from ..flops import forward_flops
from ..manifest import Phase
from .firefly import OVERGROW, firefly, over_arch
from .gradmax import gradmax
from .grid import Job, Result
from .units import Steps, widen


def grow(method: str, job: Job, state: dict[str, torch.Tensor],
         common: dict[str, torch.Tensor]) -> Result:
    """Return the growth Result of `method` (gradmax or firefly) for member state `state`,
    on the training batches of `job.data` (loaded and checked by the caller)."""
    data = job.data() if callable(job.data) else job.data
    if data is None:
        raise MgrowError(f"--method {method} reads training data; none was given")
    if job.batch_size > len(data.train_y):
        raise MgrowError(f"--batch-size {job.batch_size} exceeds the {len(data.train_y)} "
                         "training images")
    start = time.perf_counter()
    wide = widen(job, state, common)
    steps = Steps(data, job.batch_size, job.seed, job.steps)
    if method == "gradmax":
        notes, arch, passes = gradmax(wide, steps, job), job.arch, 1
        what = f"{arch.name} x{arch.width:g} plain (gradmax growth step)"
    else:
        notes, arch, passes = firefly(wide, steps, job), over_arch(job, OVERGROW), 2
        what = (f"{arch.name} x{arch.width:g} plain (firefly growth step: {OVERGROW} "
                f"candidates per new unit)")
    images = passes * job.steps * job.batch_size
    fwd = forward_flops(arch.model_copy(update={"input_size": data.spec.input_size}))
    phase = Phase(operation="fuse", arch=what, stage="growth", images=images,
                  forward_flops=fwd, train_flops=3 * fwd * images,
                  wall_s=round(time.perf_counter() - start, 3), device="cpu")
    tensors = {k: v.detach().clone() for k, v in wide.model.state_dict().items()}
    return Result(tensors, mixed=False, notes=notes, phase=phase, data=data.spec)
