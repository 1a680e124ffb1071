"""The manifest every bundle carries: pydantic models, validated fully on load.

A bundle alone rebuilds its model: `ArchSpec` names the network, `MixingSpec` (absent for
plain networks) says how its weights are generated from templates, `DatasetSpec` says what
it was trained on, `lineage` how it was made and `phases` what its training cost.

Owns every model of the schema and FORMAT_VERSION. Imports mgrow.limits (the bounds its
fields check) only, and not torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError,
                      field_validator, model_validator)

from . import limits as L

FORMAT_VERSION = 4  # 2: `reference_epochs`; 3: `ArchSpec.options`; 4: `ArchSpec.depths`
READABLE_VERSIONS = (1, 2, 3, 4)  # older manifests are read as the current version


def _as_text(value: Any) -> Any:
    """Return a path as text JSON can hold: a name that is not valid UTF-8 (Python holds its
    bad bytes as lone surrogates) is recorded with those bytes escaped, \\xff."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


PathText = Annotated[str, BeforeValidator(_as_text)]  # a path recorded in a manifest


class _Strict(BaseModel):
    # NaN and infinities are refused everywhere; strings have bounded lengths
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False,
                              str_max_length=4096)


Option = Annotated[str, Field(max_length=256)] | bool | int | float
# the builders' keywords mgrow passes itself (mgrow.arch.zoo): torchvision's and timm's
RESERVED_OPTIONS = frozenset({"num_classes", "weights", "pretrained", "in_chans",
                              "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path"})


class ArchSpec(_Strict):
    """Which network: a registry name plus the knobs every family understands."""

    # registry name (wrn-D-K, resnet18/34/50, vgg11_bn) or a builder's: torchvision:NAME,
    # timm:NAME (mgrow.arch.zoo), whose keyword arguments are `options`
    name: str = Field(max_length=128)
    width: float = Field(1.0, gt=0, le=L.MAX_WIDTH)  # multiplies every channel count
    num_classes: int = Field(10, ge=1, le=L.MAX_CLASSES)
    in_channels: int = Field(3, ge=1, le=L.MAX_CHANNELS)
    input_size: int = Field(32, ge=8, le=L.MAX_INPUT_SIZE)
    norm: Literal["every", "block"] = "every"  # WRN only: BN before every conv or per block
    options: dict[Annotated[str, Field(max_length=64)], Option] = Field({}, max_length=32)
    # blocks per stage where `mgrow deepen` made them differ from the name's (WRN: 3 stages,
    # ResNet: 4, VGG: 5; a builder's network: the stages mgrow.arch.stages finds); None: the
    # name's own
    depths: tuple[Annotated[int, Field(ge=1, le=L.MAX_DEPTH)], ...] | None = Field(
        None, min_length=1, max_length=8)

    @field_validator("options")
    @classmethod
    def _not_mgrows(cls, options: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(options) & RESERVED_OPTIONS)
        if taken:
            raise ValueError(f"builder option {taken[0]!r} is set by mgrow itself (classes "
                             "and channels from the data, fresh weights), not on the command "
                             "line")
        return options

    def widened(self, factor: int) -> ArchSpec:
        """Return this spec with every layer `factor` times wider."""
        return self.model_copy(update={"width": self.width * factor})


class MixingSpec(_Strict):
    """How a template-mixed network generates its weights (see mgrow.mixing)."""

    templates: int = Field(2, ge=1, le=L.MAX_TEMPLATES)  # a bank of L layers holds L*templates
    # banks shared by <= 2 consecutive same-shape layers, or none
    sharing: Literal["pairs", "none"] = "pairs"
    edge_templates: int = Field(1, ge=1, le=L.MAX_TEMPLATES)  # of the stem and classifier
    freeze_edges: bool = True  # stem/classifier coefficients not trainable (the paper's default)
    factor: int = Field(1, ge=1, le=L.MAX_FACTOR)  # g: inner layers are g x g grids of tiles
    members: int = Field(1, ge=1, le=L.MAX_FACTOR)  # m: how many members' banks it holds
    tiling: Literal["vertical", "horizontal"] = "vertical"  # which tiles share a member's bank

    @field_validator("members")
    @classmethod
    def _members_fit(cls, m: int, info: Any) -> int:
        g = info.data.get("factor", 1)
        if m > g:
            raise ValueError(f"members ({m}) cannot exceed the growth factor ({g})")
        return m


class DatasetSpec(_Strict):
    """The data a bundle was trained on: enough to find it again and normalise it."""

    spec: PathText  # as given to --data: cifar10, digits, npz:PATH, imagefolder:PATH ...
    num_classes: int = Field(ge=1, le=L.MAX_CLASSES)
    channels: int = Field(ge=1, le=L.MAX_CHANNELS)
    input_size: int = Field(ge=1, le=L.MAX_INPUT_SIZE)
    mean: tuple[Annotated[float, Field(ge=0, le=1)], ...]
    std: tuple[Annotated[float, Field(gt=0, le=1)], ...]
    train_size: int = Field(ge=0, le=L.MAX_IMAGES)  # training images used (after --subset)

    @model_validator(mode="after")
    def _one_per_channel(self) -> DatasetSpec:
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(f"mean and std need one value per channel ({self.channels}), "
                             f"not {len(self.mean)} and {len(self.std)}")
        return self


# Lineage options that later commands compute with (train-sibling derives its seed from
# the small net's): each has a type and a range; other options are recorded as they are.
_OPTIONS = {k: TypeAdapter(Annotated[t, f]) for k, t, f in (
    ("seed", int, Field(ge=0, le=L.MAX_SEED)),
    ("epochs", float, Field(gt=0, le=L.MAX_EPOCHS, allow_inf_nan=False)),
    ("lr", float, Field(gt=0, le=L.MAX_LR, allow_inf_nan=False)),
    ("batch_size", int, Field(ge=1, le=L.MAX_BATCH)),
    ("budget", float, Field(gt=0, le=L.MAX_BUDGET, allow_inf_nan=False)),
    ("factor", int, Field(ge=1, le=L.MAX_FACTOR)),
    ("noise", float, Field(ge=0, le=L.MAX_NOISE, allow_inf_nan=False)),
)}


class Parent(_Strict):
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    path: PathText


class Lineage(_Strict):
    """How this bundle was made: the operation, its options and the parents' hashes."""

    operation: str = Field(max_length=64)  # init | convert | train | fuse | finetune ...
    options: dict[str, Any] = {}
    parents: tuple[Parent, ...] = Field((), max_length=16)
    history: tuple[dict[str, Any], ...] = Field((), max_length=10_000)  # oldest first

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Options that later commands compute with (seed, epochs ...) must be in range."""
        for key, value in options.items():
            if key in _OPTIONS and value is not None:
                try:
                    _OPTIONS[key].validate_python(value, strict=isinstance(value, bool))
                except ValidationError as e:
                    raise ValueError(f"{key}: {e.errors()[0]['msg']}") from None
        return options


class Phase(_Strict):
    """One row of the training-FLOPs ledger."""

    operation: str = Field(max_length=64)
    arch: str = Field(max_length=256)  # human-readable description of the trained network
    stage: Literal["base", "growth"]  # base: the user's starting net; growth: spent to grow it
    images: int = Field(ge=0, le=L.MAX_IMAGES)
    forward_flops: int = Field(ge=0, le=L.MAX_FLOPS)  # per image, fvcore, eval mode
    train_flops: int = Field(ge=0, le=3 * L.MAX_FLOPS * L.MAX_IMAGES)  # 3 x forward x images
    wall_s: float = Field(ge=0, le=L.MAX_SECONDS)
    device: str = Field(max_length=256)
    accuracy: float | None = Field(None, ge=0, le=1)


class Growth(_Strict):
    """What `fuse` did: grid, ownership, initialiser, method, seed."""

    method: Literal["mixture", "random", "net2net", "gradmax", "firefly", "zero"]
    init: str | None = Field(max_length=64)
    factor: int = Field(ge=2, le=L.MAX_FACTOR)
    members: int = Field(ge=1, le=L.MAX_FACTOR)
    tiling: str = Field(max_length=64)
    seed: int = Field(ge=0, le=L.MAX_SEED)
    noise: float = Field(0.0, ge=0, le=L.MAX_NOISE)
    rank_notes: tuple[str, ...] = ()  # where the initialiser could not reach full orthogonality
    bn_correct: bool = False  # BN running statistics corrected without data (mgrow.growth.norms)


class Manifest(_Strict):
    format_version: int = FORMAT_VERSION
    arch: ArchSpec
    mixing: MixingSpec | None = None  # None: a plain network
    data: DatasetSpec | None = None
    lineage: Lineage
    phases: tuple[Phase, ...] = Field((), max_length=100_000)
    growth: Growth | None = None
    # the epochs of one full from-scratch run (the 1.00X) a `--budget` was set against;
    # every report normalises to it unless told otherwise (None: REFERENCE_EPOCHS, 200)
    reference_epochs: float | None = Field(None, gt=0, le=L.MAX_REFERENCE_EPOCHS)

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, raw: Any) -> Any:
        """Return an older manifest as the current version (each version only added an
        optional field: reference_epochs, ArchSpec.options, ArchSpec.depths)."""
        if isinstance(raw, dict) and raw.get("format_version") in READABLE_VERSIONS:
            return {**raw, "format_version": FORMAT_VERSION}
        return raw

    @model_validator(mode="after")
    def _data_fits_arch(self) -> Manifest:
        """The data recorded is the network's: as many classes and input channels."""
        d, a = self.data, self.arch
        if d is not None and (d.num_classes, d.channels) != (a.num_classes, a.in_channels):
            raise ValueError(f"data {d.spec} has {d.num_classes} classes and {d.channels} "
                             f"channels, the network {a.num_classes} and {a.in_channels}")
        return self

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"format version {v} is not {FORMAT_VERSION}")
        return v

    def to_json(self) -> str:
        """Return the canonical JSON text (stable key order, no whitespace)."""
        return self.model_dump_json()

    def describe(self) -> str:
        """Return a one-phrase description such as 'wrn-16-2 x0.5 mixed g=2'."""
        a = self.arch
        s = a.name + ("" if a.depths is None else " depths " + "-".join(map(str, a.depths)))
        s += "" if a.width == 1 else f" x{a.width:g}"
        if self.mixing is None:
            return s + " plain"
        return s + f" mixed g={self.mixing.factor}" if self.mixing.factor > 1 else s + " mixed"

    def grown(self) -> bool:
        """Whether growth made this net: fuse (`growth`) or `deepen`, here or in its
        history. Training a grown net is charged to the growth stage."""
        return self.growth is not None or any(
            step.get("operation") == "deepen"
            for step in (*self.lineage.history, {"operation": self.lineage.operation}))

    def with_phase(self, phase: Phase) -> Manifest:
        """Return a copy with one more ledger row."""
        return self.model_copy(update={"phases": (*self.phases, phase)})

    def derived(self, operation: str, options: dict[str, Any], parents: tuple[Parent, ...],
                **updates: Any) -> Manifest:
        """Return a copy made by `operation`, recording the old lineage as history."""
        old = self.lineage
        lineage = Lineage(operation=operation, options=options, parents=parents,
                          history=(*old.history, old.model_dump(exclude={"history"})))
        return self.model_copy(update={"lineage": lineage, **updates})
