"""The artifact layout: where every stage's files are. One object answers "where is split X", "where
is the model of stage Y" and "which stage holds the final model"; every stage, the flow and the
registry ask it instead of joining paths by hand.

Stage `s` writes under `artifacts/s/`, its DVC metrics to `metrics/s.json` and its plots under
`plots/s/` (the roots come from params `paths:`). dvc.yaml's `outs:` name the same paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.stages import FINAL_MODEL_STAGE, FINE_TUNED_MODEL_STAGE, STAGE_NAMES

SPLITS = ("train", "val", "test")
MODEL_DIR = "model"
SELECT_CHOICE = "choice.json"
SPLIT_ASSIGNMENTS = "assignments.jsonl"


@dataclass(frozen=True)
class Layout:
    """Paths of a project's stage outputs, relative to the project root unless the roots are absolute."""

    artifacts: Path = Path("artifacts")
    metrics: Path = Path("metrics")
    plots: Path = Path("plots")

    @classmethod
    def of(cls, paths: Any) -> Layout:
        """The layout that params `paths:` (a `PathsConfig`) describe."""
        return cls(Path(paths.artifacts), Path(paths.metrics), Path(paths.plots))

    def stage_dir(self, stage: str) -> Path:
        """Output folder of a stage (not created here)."""
        return self.artifacts / _known(stage)

    def metrics_file(self, stage: str) -> Path:
        """The DVC metrics file of a stage."""
        return self.metrics / f"{_known(stage)}.json"

    def plots_dir(self, stage: str) -> Path:
        """The DVC plots folder of a stage."""
        return self.plots / _known(stage)

    def split(self, name: str) -> Path:
        """The JSONL file of split `name` (train, val or test)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; the splits are {SPLITS}")
        return self.stage_dir("split") / f"{name}.jsonl"

    @property
    def split_assignments(self) -> Path:
        """The split stage's memory of every row's split: one `{"text_sha256", "split", "salt", "round"}` per line."""
        return self.stage_dir("split") / SPLIT_ASSIGNMENTS

    def model_dir(self, stage: str) -> Path:
        """The Hugging Face model folder a model-producing stage writes (`artifacts/<stage>/model`)."""
        return self.stage_dir(stage) / MODEL_DIR

    @property
    def base_model(self) -> Path:
        """The base model the fine-tuning starts from (pretrain's output)."""
        return self.model_dir("pretrain")

    @property
    def fine_tuned_model(self) -> Path:
        """The supervised fine-tuned model (train's output), which align starts from."""
        return self.model_dir(FINE_TUNED_MODEL_STAGE)

    @property
    def final_model(self) -> Path:
        """The model that is evaluated, quantized, registered and served (align's: aligned, or the fine-tuned one passed through)."""
        return self.model_dir(FINAL_MODEL_STAGE)

    @property
    def final_model_stage(self) -> str:
        """The stage that writes `final_model` (what to run when it is missing)."""
        return FINAL_MODEL_STAGE

    @property
    def select_choice(self) -> Path:
        """The select stage's choice of base (`{"base": ...}`)."""
        return self.stage_dir("select") / SELECT_CHOICE

    def variant_dir(self, method: str) -> Path:
        """The folder of a quantized variant of the final model."""
        return self.stage_dir("quantize") / method


def _known(stage: str) -> str:
    if stage not in STAGE_NAMES:
        raise ValueError(f"unknown stage {stage!r}; the stages are {STAGE_NAMES}")
    return stage
