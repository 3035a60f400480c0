"""The `Target` interface: what a deployment target decides, and the weights backend it gives a session.

A target (`compression.target`) decides
- which levels a unit may take: `check_config` refuses, in one line and before any model is loaded, the sparsity
  and levels its runtime cannot run; `check_model` refuses those the model's shapes rule out, from its config alone,
  and `check_search` what else a search can be refused for before anything is stored (gguf: a size budget below the
  smallest plan);
- its units and their bytes, through the weights backend (`Weights`) it builds for a session: the backend
  discovers the units, quantizes, caches and stitches them into the resident model (with rollback), and counts a
  plan's bytes as the runtime stores them, so Size is what ships;
- what `autocompress export` writes (`export`, in the format the registry names for it), and which runtime judges
  a written file in `autocompress evaluate` (`judges`, `evaluate`, `evaluation_lines`).

A target is looked up by name in the registry (`autocompress.targets.target_named`); nothing outside `targets/`
asks which target is in use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from autocompress.plan import GGUF_METHOD, parse_level

if TYPE_CHECKING:
    import optuna
    import torch
    from transformers import PreTrainedModel

    from autocompress.codecs import CompressedLinear
    from autocompress.config import CompressionConfig, Config, DataConfig
    from autocompress.plan import CompressionPlan
    from autocompress.record import StudyLocation
    from autocompress.session import CompressionSession
    from autocompress.size import SizeReport


@dataclass(frozen=True)
class PresetSeed:
    """A runtime's own preset as a seed trial of a study."""

    baseline: str  # e.g. "llama.cpp q4_k_m", the seed trial's `baseline`
    params: dict[str, str] | None  # None: the search space cannot hold the preset
    reason: str | None  # why not


@dataclass(frozen=True)
class Speed:
    """Predicted (or measured) tokens per second: decoding one token at a time, and a prompt as one batch."""

    decode_tps: float
    prompt_tps: float


class SpeedModel(ABC):
    """A target runtime's predicted speed of a session's plans (`Target.speed_model`), from timings the runtime
    itself produced on this machine, for `threads` CPU threads."""

    dense: Speed  # the uncompressed model's, the unit of the scalar objective's speed term
    threads: int

    @abstractmethod
    def predict(self, plan: CompressionPlan) -> Speed:
        """The plan's predicted speed."""

    @abstractmethod
    def preset(self, name: str) -> Speed:
        """The predicted speed of the model as the runtime's preset `name` (`Target.size_presets`) stores it."""


@dataclass
class ExportInput:
    """What a target's `export` writes: the model computing with the plan, and the stored forms behind it."""

    model: PreTrainedModel
    tokenizer: Any
    plan: CompressionPlan
    config: Config  # the study's
    compressed: Mapping[str, CompressedLinear]  # each compressed Linear's stored form (empty: none kept)
    stored: Mapping[str, Any] | None  # tensors as the study's backend stores them, when it holds them (GGUF blocks)
    provenance: dict[str, Any]


@dataclass
class Written:
    path: Path
    weights_bytes: int  # the bytes of the weights file(s) written
    notes: list[str] = field(default_factory=list)  # what the format could not express
    warning: str | None = None  # what the file cannot store of the plan as searched, said once on stderr


class Weights(ABC):
    """A target's weights backend for one resident model: its units, their levels and bytes, and `stitch`, which
    makes the model compute with a plan, changing only what changed, with what it holds always known (rollback)."""

    units: list[str]  # the units a plan of the study names
    use_database: bool = False  # whether trials stitch the layer-variant database's stored variants
    reuses_block_inputs: bool = True  # whether a stitch changes decoder blocks only (the block-input cache sees it)

    def unit_levels(self, levels: Sequence[int | str]) -> dict[str, list[str]] | None:
        """The levels each unit may take where the target restricts them by shape; None: every unit all."""
        return None

    @abstractmethod
    def size(self, plan: CompressionPlan) -> SizeReport:
        """The plan's bytes as the target stores them."""

    @property
    @abstractmethod
    def dense_bytes(self) -> int:
        """The uncompressed model's bytes, the figure sizes are fractions of."""

    @abstractmethod
    def check_plan(self, plan: CompressionPlan) -> None:
        """ValueError (one line) for a plan the units cannot take: units it does not have, levels they cannot."""

    @abstractmethod
    def stitch(self, plan: CompressionPlan) -> SizeReport:
        """Make the resident model compute with `plan` (checked by `check_plan`), returning its size."""

    @abstractmethod
    def restore_dense(self) -> None:
        """Put every unit back to its dense weight."""

    @abstractmethod
    def prepare(self) -> None:
        """Compute once, before trials run in parallel, what every stitch will need (calibration statistics)."""

    def precompute(self, unit_levels: Mapping[str, Sequence[str]] | None, progress: bool) -> str | None:
        """Compute once, before a study's first trial, every stored form a trial may take at `unit_levels` (GGUF
        blocks, in parallel, into the cache); a line for the log, None where the backend computes nothing ahead."""
        return None

    @abstractmethod
    def for_export(self, plan: CompressionPlan) -> tuple[dict[str, CompressedLinear], Mapping[str, Any] | None]:
        """Make the resident model compute with `plan` from its dense weights, returning each compressed Linear's
        stored form and, where the backend holds them, the tensors as the target stores them."""

    def export_bytes(self, model: PreTrainedModel, plan: CompressionPlan, writer: Target | None) -> int:
        """The accounted bytes of `model` (computing with `plan`) written by `writer` (None: a dense folder)."""
        return self.size(plan).total_bytes


class Target(ABC):
    name: ClassVar[str]
    export_format: ClassVar[str]  # what `autocompress export` writes of its studies (`--format` names it)
    runtime: ClassVar[str | None] = None  # the runtime that judges its written files, when not transformers
    runs_structure: ClassVar[bool] = False  # whether its runtime runs structural levels (`search.structure`)
    predicts_speed: ClassVar[bool] = False  # whether `speed_model` predicts its runtime's tokens/s of a plan
    serves_in_dtype: ClassVar[bool] = False  # whether `compression.serve_dtype` sets what untouched tensors are in
    serve_dtype: torch.dtype | None = None  # what the untouched tensors are stored in; None: the target's own rule

    def for_config(self, config: Config) -> Target:
        """This target with the settings `config` gives it (vLLM's serving dtype)."""
        return self

    def size_presets(self) -> tuple[str, ...]:
        """The runtime's presets a size limit may name (`budget: {size: q4_k_m}`): the file each writes."""
        return ()

    def preset_ceiling(self, config: Config, preset: str) -> int:
        """The bytes a trial of the config's study may count under a size limit named `preset` (`size_presets`)."""
        raise ValueError(f"size {preset!r}: the {self.name} target names no preset sizes")

    def check_config(self, config: Config) -> None:
        """Raise ValueError (one line) for sparsity or levels of the config the runtime cannot run."""
        for name in config.search.formats or ():
            if parse_level(name).method == GGUF_METHOD:
                raise ValueError(
                    f"search.formats: {name} is a llama.cpp tensor type, a level of compression.target: gguf only"
                )

    def check_model(self, config: Config) -> None:
        """Raise UserError (one line) for a level the model's Linears cannot take, reading its config only."""
        return None

    def check_search(self, config: Config) -> None:
        """Raise UserError (one line) for a search of the config that cannot run, reading the model's config only
        (`search` calls it before the study's storage opens): what `check_model` refuses, and whatever else the
        target can tell without the weights."""
        self.check_model(config)

    def conclude(self, study: optuna.Study, location: StudyLocation) -> list[str]:
        """After a search or `report`: write what the target's runtime judges of the study's result beside its
        outputs, and return the lines to print (none by default)."""
        return []

    @abstractmethod
    def weights(self, session: CompressionSession) -> Weights:
        """The weights backend of the session's resident model."""

    def speed_model(self, session: CompressionSession, presets: Sequence[str] = ()) -> SpeedModel:
        """The runtime's speed model of the session's plans, measured on this machine where not cached, holding the
        `presets` too (`predicts_speed`); on a GPU the table would come from the device, which is not measured
        here."""
        raise ValueError(f"the {self.name} target predicts no speed of its runtime")

    def export_refusal(self, format: str) -> str | None:
        """Why a study of this target cannot be written in `format` (another target's, or the dense `hf`); None: it
        can."""
        return None

    def seeds(self, session: CompressionSession, unit_levels: Mapping[str, Sequence[str]]) -> list[PresetSeed] | None:
        """The runtime's own presets as the seed trials of a study, replacing the uniform baselines; None: none."""
        return None

    @abstractmethod
    def export(self, given: ExportInput, out_dir: Path) -> Written:
        """Write `given` in the target's own format into `out_dir` (prepared: absent, empty or an earlier export),
        all at once (staged, then renamed)."""

    def describe(self, compression: CompressionConfig, code) -> str | None:
        """The study's methods in one line for reports (names passed through `code`); None: the generic line."""
        return None

    dense_form: ClassVar[str] = "in fp16"  # what the dense bytes are, for reports

    def judges(self, path: Path) -> bool:
        """Whether `path` is a file of this target that its own runtime judges (`evaluate`)."""
        return False

    def evaluate(
        self,
        path: Path,
        data: DataConfig | None,
        device: str | None,
        new_tokens: int,
        dense: bool,
        against: Path | None = None,
        threads: int | None = None,
    ) -> dict[str, Any]:
        """`autocompress evaluate` of a file `judges` claims, its runtime on `threads` CPU threads (None: all); with
        `against`, another of its files scored on the same windows."""
        raise NotImplementedError(f"the {self.name} target's files are evaluated as our artifact")

    def evaluation_lines(self, result: dict[str, Any]) -> list[str]:
        """The figures of `evaluate` as an aligned table."""
        raise NotImplementedError(f"the {self.name} target's files are evaluated as our artifact")
