"""The MLflow pyfunc model of a summariser, logged as "models from code": nothing is pickled.

`tasks.register` logs this file as the model's code (`python_model=<this file>`); MLflow runs it
at load time and takes the model set by `mlflow.models.set_model` below. The model's artifacts are
the Hugging Face folder (`hf_model`: safetensors + tokenizer; a quantized variant's folder carries
the quantize stage's marker and loads through `tasks.core.variants.load_quantized`, in the dtype and on
the device class quantize scored it in: a `bf16` variant generates in bf16 where it was scored, a GGUF
variant (`gguf-*`) in llama.cpp through llama-cpp-python, which the loading environment then needs) and
`sftflow.json` (generation settings), so a loaded model generates exactly like the stage that scored it
(`evaluate` for the full model, `quantize` for a variant):

    loaded = mlflow.pyfunc.load_model("models:/sftflow-summarizer@champion")
    loaded.predict(pd.DataFrame({"text": ["..."]}))          # -> one summary per row
    loaded.unwrap_python_model().model / .tokenizer / .settings   # for streaming in the app

The package `tasks` must be importable where the model is loaded (it is installed with sftflow).
https://mlflow.org/docs/latest/ml/model/models-from-code/
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

from tasks.core.generation import GenerationSettings, generate
from tasks.core.modeling import load_model_and_tokenizer
from tasks.core.variants import MARKER_FILE, load_quantized

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "hf_model"
SETTINGS_ARTIFACT = "settings"
SETTINGS_FILE = "sftflow.json"
SETTINGS_KEYS = ("prompt_template", "use_chat_template", "max_new_tokens", "batch_size", "language")


class SummarizerModel(PythonModel):
    """Greedy summarisation with a causal LM; `predict` takes a DataFrame with a `text` column."""

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.settings: dict[str, Any] = {}

    def load_context(self, context: Any) -> None:
        """Load the weights (safetensors, or a quantized variant through tasks.quantize) and settings."""
        settings = json.loads(Path(context.artifacts[SETTINGS_ARTIFACT]).read_text(encoding="utf-8"))
        missing = [k for k in SETTINGS_KEYS if k not in settings]
        if missing:
            raise ValueError(f"{SETTINGS_FILE} of this model lacks {missing}; re-register the model")
        model_dir = Path(context.artifacts[MODEL_ARTIFACT])
        if (model_dir / MARKER_FILE).exists():  # the folder says it is quantized, and how
            model, tokenizer = load_quantized(model_dir)
        else:
            model, tokenizer = load_model_and_tokenizer(model_dir)
        model.eval()
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        log.info("loaded summariser from %s (quantization: %s)", model_dir, settings.get("quantization"))

    # No type hints on predict: MLflow 3 would build its input validation from them.
    def predict(self, context, model_input, params=None):
        """One greedy summary per row of `model_input` (a DataFrame with `text`, or a list of str)."""
        return generate(self.model, self.tokenizer, _texts(model_input), self.generation)

    @property
    def generation(self) -> GenerationSettings:
        """The generation settings the model was evaluated with (from `sftflow.json`)."""
        return GenerationSettings.from_dict(self.settings)


def _texts(model_input: Any) -> list[str]:
    """The input texts: a DataFrame's `text` column, a dict with `text`, a str or a list of str."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "text" not in model_input.columns:
            raise ValueError(f"input needs a `text` column; it has {list(model_input.columns)}")
        values = model_input["text"].tolist()
    elif isinstance(model_input, dict):
        values = model_input["text"]
        values = [values] if isinstance(values, str) else list(values)
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise ValueError(f"rows {bad[:5]} of the input are not strings")
    return values


mlflow.models.set_model(SummarizerModel())
