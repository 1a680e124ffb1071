"""mgrow: grow a trained network wider (or deeper) by recombining its learned templates.

The Python API (see mgrow.api and docs/api.md): `mgrow.load`, `mgrow.build_model`,
`mgrow.train`, `mgrow.train_sibling`, `mgrow.fuse`, `mgrow.deepen`, `mgrow.finetune`,
`mgrow.evaluate`, `mgrow.count_flops`, `mgrow.info`, `mgrow.cka`. They are imported on first use, so
`import mgrow` (and `mgrow --help`) does not load torch.

The package root is the top of the import graph: no module of mgrow imports it (see
docs/architecture.md).
"""

from .errors import MgrowError
from .version import __version__

_API = ("Bundle", "DataSource", "Outcome", "TrainConfig", "build_model", "cka", "count_flops",
        "deepen", "evaluate", "finetune", "fuse", "info", "load", "train", "train_sibling",
        "write_heatmap")
__all__ = ["MgrowError", "__version__", *_API]


def __getattr__(name: str):
    """Return an API function or class from mgrow.api, imported on first use."""
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'mgrow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
