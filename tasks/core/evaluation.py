"""Score any model on any rows: generate (through a cache) and compute ROUGE/BLEU. The one path the
evaluate, select and quantize stages use, so every figure in the registry is measured the same way.

Generations are cached in `evaluate.cache_dir`, outside DVC's outputs, so an unchanged model is never
asked to generate the same rows twice (the base model across retrains, the fine-tuned model when only
scoring code changed). The key holds everything that changes a generated text: the model's content,
the rows, the generation settings, the source of the code that generates (`GENERATING_MODULES`), the
torch / transformers / tokenizers versions, and the device and dtype the model runs in. So when
dvc.yaml re-runs a stage because that code changed, the cache cannot hand back the old text.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from tasks.core.errors import StageError
from tasks.core.generation import GenerationSettings, generate
from tasks.core.io import dir_sha256, read_json, sha256_bytes, write_json
from tasks.core.modeling import load_for_inference
from tasks.core.scoring import score

log = logging.getLogger(__name__)

CACHE_VERSION = 2
# The modules whose code decides what a model writes for a prompt (not how it is scored).
GENERATING_MODULES = (
    "tasks.core.generation",
    "tasks.core.prompt",
    "tasks.core.modeling",
    "tasks.core.variants",
    "tasks.core.evaluation",
)
RUNTIME_PACKAGES = ("torch", "transformers", "tokenizers")


def code_sha256() -> str:
    """sha256 over the source of `GENERATING_MODULES`, in order (read once per process)."""
    return _sources_sha256(GENERATING_MODULES)


@lru_cache(maxsize=8)
def _sources_sha256(modules: tuple[str, ...]) -> str:
    parts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise StageError(f"cannot find the source of {name} to key the generation cache")
        parts.append(name + "\0" + sha256_bytes(Path(spec.origin).read_bytes()))
    return sha256_bytes("\n".join(parts).encode())


def runtime_versions() -> dict[str, str]:
    """Versions of the libraries that run generation."""
    return {name: metadata.version(name) for name in RUNTIME_PACKAGES}


def model_placement(model: Any | None) -> dict[str, str]:
    """Where and in which dtype a model generates: a loaded one as it is, a folder as `predict` loads it."""
    if model is None:
        import torch

        return {"device": "cuda" if torch.cuda.is_available() else "cpu", "dtype": "torch.float32"}
    return {"device": str(model.device.type), "dtype": str(model.dtype)}


def rows_sha256(rows: Sequence[dict[str, Any]]) -> str:
    """Content hash of the rows a model generates for (ids and texts, in order)."""
    payload = json.dumps([[r["id"], r["text"]] for r in rows], ensure_ascii=False)
    return sha256_bytes(payload.encode("utf-8"))


@dataclass(frozen=True)
class Evaluator:
    """Generates for rows and scores against their summaries, with one set of settings.

    Attributes:
        generation: how summaries are generated.
        language: `zh` (jieba words) or `en` for scoring.
        bootstrap_samples: resamples for the 95% intervals.
        seed: the bootstrap's seed.
        cache_dir: where generations are cached (None: no cache).
        trust_remote_code: passed when a model folder is loaded.
    """

    generation: GenerationSettings
    language: str
    bootstrap_samples: int = 1000
    seed: int = 42
    cache_dir: Path | None = None
    trust_remote_code: bool = False

    @classmethod
    def of(cls, params: Any) -> Evaluator:
        """From a stage's params (`tasks.core.config.GENERATION_KEYS`, `SCORING_KEYS` and `model.trust_remote_code`)."""
        return cls(
            generation=GenerationSettings.of(params),
            language=params.data.language,
            bootstrap_samples=params.evaluate.bootstrap_samples,
            seed=params.evaluate.seed,
            cache_dir=Path(params.evaluate.cache_dir),
            trust_remote_code=params.model.trust_remote_code,
        )

    def cache_key(self, model_sha256: str, rows: Sequence[dict[str, Any]], model: Any | None = None) -> str:
        """The cache key of a generation: model content and placement, rows, settings, code and library versions.

        Args:
            model_sha256: the model's content hash.
            rows: the rows generated for.
            model: the loaded model, or None for a folder (`predict` then loads it on the GPU if any, fp32).
        """
        payload = {
            "version": CACHE_VERSION,
            "model": model_sha256,
            "rows": rows_sha256(rows),
            "generation": self.generation.output_key(),
            "code": code_sha256(),
            "runtime": runtime_versions(),
            **model_placement(model),
        }
        return sha256_bytes(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8"))

    def predict(
        self,
        model: str | Path | Any,
        rows: Sequence[dict[str, Any]],
        *,
        tokenizer: Any | None = None,
        model_sha256: str | None = None,
        progress: bool = True,
    ) -> list[str]:
        """Generate a summary for each row, through the cache when the model's content hash is known.

        Args:
            model: a model folder, or an already-loaded model (then `tokenizer` is required).
            rows: dicts with `id` and `text`.
            tokenizer: the tokenizer of a loaded model.
            model_sha256: content hash of a loaded model (e.g. its folder's hash plus the quantization
                method); without it a loaded model is not cached. A folder is hashed here.
            progress: show a progress bar.

        Returns:
            One prediction per row, in order.

        Raises:
            StageError: the folder cannot be loaded, or a loaded model comes without its tokenizer.
        """
        is_dir = isinstance(model, (str, Path))
        if is_dir and model_sha256 is None:
            if not Path(model).is_dir():
                raise StageError(f"model directory {model} does not exist: run the stage that writes it first")
            model_sha256 = dir_sha256(Path(model))
        key = self.cache_key(model_sha256, rows, None if is_dir else model) if model_sha256 else None
        if key is not None and (cached := self._cache_read(key, rows)) is not None:
            return cached
        if is_dir:
            # float32 on the GPU when there is one (spread over GPUs when one is too small; refused with the
            # figures before loading when the memory cannot hold it): the placement the cache key names.
            model, tokenizer = load_for_inference(model, "float32", trust_remote_code=self.trust_remote_code)
        elif tokenizer is None:
            raise StageError("predict got a loaded model without its tokenizer")
        predictions = generate(model, tokenizer, [r["text"] for r in rows], self.generation, progress=progress)
        if key is not None:
            self._cache_write(key, rows, predictions)
        return predictions

    def evaluate(
        self,
        model: str | Path | Any,
        rows: Sequence[dict[str, Any]],
        *,
        tokenizer: Any | None = None,
        model_sha256: str | None = None,
        progress: bool = True,
    ) -> tuple[list[str], dict[str, Any]]:
        """Generate for `rows` and score against their summaries.

        Args:
            model, tokenizer, model_sha256, progress: as in `predict`.
            rows: dicts with `id`, `text`, `summary`.

        Returns:
            (predictions, scores) where scores is `tasks.core.scoring.score`'s dict (means, intervals,
            `empty_predictions`, `per_row`).
        """
        predictions = self.predict(model, rows, tokenizer=tokenizer, model_sha256=model_sha256, progress=progress)
        return predictions, self.score(predictions, [r["summary"] for r in rows])

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
        """ROUGE/BLEU of predictions against references, with bootstrap intervals."""
        return score(predictions, references, self.language, bootstrap_samples=self.bootstrap_samples, seed=self.seed)

    def _cache_read(self, key: str, rows: Sequence[dict[str, Any]]) -> list[str] | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.json"
        if not path.exists():
            return None
        try:
            cached = read_json(path)
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable generation cache %s: %s", path, e)
            return None
        if cached.get("ids") != [r["id"] for r in rows] or len(cached.get("predictions", [])) != len(rows):
            log.warning("ignoring generation cache %s: it does not match the rows", path)
            return None
        log.info("generation cache hit: %s (%d rows)", path, len(rows))
        return list(cached["predictions"])

    def _cache_write(self, key: str, rows: Sequence[dict[str, Any]], predictions: list[str]) -> None:
        if self.cache_dir is not None:
            write_json(self.cache_dir / f"{key}.json", {"ids": [r["id"] for r in rows], "predictions": predictions})
