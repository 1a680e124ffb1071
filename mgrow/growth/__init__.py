"""Growth: a trained net (and its sibling) into a g-times wider one, or a deeper one.

Layers inside the package, bottom to top: grid (tile geometry, block owners, `Job` and
`Result`), inits (MixtureGrowth's coefficient initialisers), norms (BN correction and
recalibration), mixture, plain (random, net2net), units (channel groups, the wide net the
data-driven methods fill) < gradmax, firefly < datadriven (their entry point and ledger
row), methods (the method table and the dispatcher `fuse`); deepen (new residual blocks)
stands beside them. This file re-exports what the
layers above use. Imports mgrow.arch, bundle, data, flops, limits, manifest, mixing; never
the training phases: data-driven growth is handed its data.
"""

from .deepen import INITS as DEEPEN_INITS
from .deepen import deepen
from .grid import Job, Result, grid
from .inits import INITS, init_orthogonal
from .methods import (DATA_METHODS, DEFAULT_NOISE, METHODS, NAMES, Grown, check_members,
                      fuse)

__all__ = ["DATA_METHODS", "DEEPEN_INITS", "DEFAULT_NOISE", "INITS", "METHODS", "NAMES", "Grown",
           "Job", "Result", "check_members", "deepen", "fuse", "grid", "init_orthogonal"]
