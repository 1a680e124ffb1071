"""Data: specs, in-memory sets, streamed image folders, transforms and the batch plan.

Layers inside the package, bottom to top: plan (seeded order, subsets), transforms
(normalisation, crops, statistics), folders (listing, header checks, decoding), memory and
stream (the two kinds of `Data`), source (`load_data`, `DataSource`). This file re-exports
what the layers above use. Imports mgrow.errors and mgrow.manifest, nothing higher.
"""

from .folders import BadImage
from .memory import MemoryData, default_data_dir
from .plan import balanced_subset, batch_plan, steps_per_epoch
from .source import MODES, SPECS, Data, DataSource, batches, load_data, with_normalisation
from .stream import StreamData
from .transforms import PAD, channel_stats, crop_flip, normalise

__all__ = ["MODES", "PAD", "SPECS", "BadImage", "Data", "DataSource", "MemoryData",
           "StreamData", "balanced_subset", "batch_plan", "batches", "channel_stats",
           "crop_flip", "default_data_dir", "load_data", "normalise", "steps_per_epoch",
           "with_normalisation"]
