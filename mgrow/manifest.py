"""The manifest every bundle carries: pydantic models, validated fully on load.

A bundle alone rebuilds its model: `ArchSpec` names the network, `MixingSpec` (absent for
plain networks) says how its weights are generated from templates, `DatasetSpec` says what
it was trained on, `lineage` how it was made and `phases` what its training cost.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FORMAT_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchSpec(_Strict):
    """Which network: a registry name plus the knobs every family understands."""

    name: str  # registry name: wrn-D-K, resnet18/34/50, vgg11_bn
    width: float = Field(1.0, gt=0)  # multiplies every channel count, stem included
    num_classes: int = Field(10, ge=1)
    in_channels: int = Field(3, ge=1)
    input_size: int = Field(32, ge=8)
    norm: Literal["every", "block"] = "every"  # WRN only: BN before every conv or per block

    def widened(self, factor: int) -> ArchSpec:
        """Return this spec with every layer `factor` times wider."""
        return self.model_copy(update={"width": self.width * factor})


class MixingSpec(_Strict):
    """How a template-mixed network generates its weights (see mgrow.mixing)."""

    templates: int = Field(2, ge=1)  # templates per layer: a bank of L layers holds L*templates
    sharing: Literal["pairs", "none"] = "pairs"  # banks shared by <= 2 consecutive same-shape layers
    edge_templates: int = Field(1, ge=1)  # templates of the stem and classifier banks
    freeze_edges: bool = True  # stem/classifier coefficients not trainable (the paper's default)
    factor: int = Field(1, ge=1)  # g: every inner layer is a g x g grid of member-size tiles
    members: int = Field(1, ge=1)  # m: how many members' template banks the network holds
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

    spec: str  # as given to --data: cifar10, digits, npz:PATH, imagefolder:PATH ...
    num_classes: int = Field(ge=1)
    channels: int = Field(ge=1)
    input_size: int = Field(ge=1)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int = Field(ge=0)  # images in the training split actually used (after --subset)


class Parent(_Strict):
    sha256: str
    path: str


class Lineage(_Strict):
    """How this bundle was made: the operation, its options and the parents' hashes."""

    operation: str  # init | convert | train | train-sibling | fuse | finetune
    options: dict[str, Any] = {}
    parents: tuple[Parent, ...] = ()
    history: tuple[dict[str, Any], ...] = ()  # earlier lineages, oldest first


class Phase(_Strict):
    """One row of the training-FLOPs ledger."""

    operation: str
    arch: str  # human-readable description of the trained network
    stage: Literal["base", "growth"]  # base: the user's starting net; growth: spent to grow it
    images: int = Field(ge=0)
    forward_flops: int = Field(ge=0)  # per image, fvcore, eval mode
    train_flops: int = Field(ge=0)  # 3 x forward x images
    wall_s: float = Field(ge=0)
    device: str
    accuracy: float | None = None


class Growth(_Strict):
    """What `fuse` did: grid, ownership, initialiser, method, seed."""

    method: Literal["mixture", "random", "net2net", "gradmax", "firefly"]
    init: str | None
    factor: int
    members: int
    tiling: str
    seed: int
    noise: float = 0.0
    rank_notes: tuple[str, ...] = ()  # where the initialiser could not reach full orthogonality
    bn_correct: bool = False  # BN running statistics corrected without data (mgrow.norms)


class Manifest(_Strict):
    format_version: int = FORMAT_VERSION
    arch: ArchSpec
    mixing: MixingSpec | None = None  # None: a plain network
    data: DatasetSpec | None = None
    lineage: Lineage
    phases: tuple[Phase, ...] = ()
    growth: Growth | None = None

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
        s = a.name + ("" if a.width == 1 else f" x{a.width:g}")
        if self.mixing is None:
            return s + " plain"
        return s + f" mixed g={self.mixing.factor}" if self.mixing.factor > 1 else s + " mixed"

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
