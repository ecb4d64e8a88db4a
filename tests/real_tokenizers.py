"""Real tokenizers and chat templates, offline, and tiny random models of five families that carry them.

No model hub is reachable from where this project is built, but the llama-cpp-python source
distribution on PyPI is: it ships llama.cpp's vocabulary files (`vendor/llama.cpp/models/ggml-vocab-*.gguf`,
the real tokenizers of Qwen2, Llama 3, GPT-2, Phi-3, Llama 2 / Mistral) and real models' chat templates
(`vendor/llama.cpp/models/templates/*.jinja`). `real_tokenizer(family)`:

1. downloads the sdist once with pip (`pip download --no-deps --no-binary :all:`), checked against its
   sha256 (or takes it from `$SFTFLOW_LLAMA_SDIST`), extracts only the files the families need;
2. converts each vocabulary once with `AutoTokenizer.from_pretrained(dir, gguf_file=...)` (the `gguf`
   package; ~2-15 s each), sets the family's chat template, and saves it under
   `~/.cache/sftflow/real-tokenizers/<sdist version>/<family>/` (`$SFTFLOW_REAL_TOKENIZERS` moves the
   root), so later sessions load it in well under a second. Nothing of it is committed: the
   vocabularies' licences differ from this project's.

`tiny_model(family, out_dir)` builds a randomly initialised model of that family from a config (two
layers, width 16) around the tokenizer and saves it as a Hugging Face folder, the way a user's
`model.base` directory looks. Without network and without a cache, the tests that need these skip,
saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

SDIST = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MODELS_DIR = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/models"


@dataclass(frozen=True)
class Family:
    """One model family: its llama.cpp vocabulary, the chat template it carries, its transformers config.

    Attributes:
        name: the family (`qwen2`, ...), also the cache folder's name.
        vocab: the `ggml-vocab-*.gguf` file.
        template: the `models/templates/*.jinja` file set as the tokenizer's chat template; None keeps none.
        model_type: the transformers config's `model_type`.
    """

    name: str
    vocab: str
    template: str | None
    model_type: str


FAMILIES = {
    # eos <|endoftext|>, a turn ends with <|im_end|>: the case generation must stop on more than eos.
    "qwen2": Family("qwen2", "ggml-vocab-qwen2.gguf", "Qwen-Qwen2.5-7B-Instruct.jinja", "qwen2"),
    # GPT-2's BPE, no pad token, no chat template; its model uses transformers' Conv1D layers.
    "gpt2": Family("gpt2", "ggml-vocab-gpt-2.gguf", None, "gpt2"),
    # Llama 3's 128k BPE, no pad token, the Llama-3.2-Instruct template (turns end with <|eot_id|>).
    "llama": Family("llama", "ggml-vocab-llama-bpe.gguf", "meta-llama-Llama-3.2-3B-Instruct.jinja", "llama"),
    # Phi-3's sentencepiece vocabulary and the Phi-3.5-mini template (turns end with <|end|>); fused qkv_proj.
    "phi3": Family("phi3", "ggml-vocab-phi-3.gguf", "microsoft-Phi-3.5-mini-instruct.jinja", "phi3"),
    # Llama 2's 32k sentencepiece vocabulary (Mistral 7B's too) and the Mistral-Nemo [INST] template: turns end with eos.
    "mistral": Family("mistral", "ggml-vocab-llama-spm.gguf", "mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral"),
}


def cache_root() -> Path:
    """Where converted tokenizers live, keyed by the sdist version."""
    root = os.environ.get("SFTFLOW_REAL_TOKENIZERS")
    base = Path(root) if root else Path.home() / ".cache" / "sftflow" / "real-tokenizers"
    return base / SDIST_VERSION


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sdist(workdir: Path) -> Path:
    """The sdist tarball: `$SFTFLOW_LLAMA_SDIST`, or downloaded by pip into `workdir`; skips the test without one."""
    given = os.environ.get("SFTFLOW_LLAMA_SDIST")
    if given:
        path = Path(given)
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               f"{SDIST}=={SDIST_VERSION}", "-d", str(workdir)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        found = sorted(workdir.glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not found:
            pytest.skip(f"no real tokenizers: `{' '.join(cmd[2:])}` failed ({done.stderr.strip()[-300:]}); "
                        f"set SFTFLOW_LLAMA_SDIST to the tarball or fill {cache_root()}")
        path = found[0]
    if _sha256(path) != SDIST_SHA256:
        raise AssertionError(f"{path} is not {SDIST} {SDIST_VERSION} (sha256 differs from {SDIST_SHA256})")
    return path


def _extract(tarball: Path, names: list[str], into: Path) -> Path:
    """Extract only `MODELS_DIR/<name>` members; returns the models folder."""
    wanted = {f"{MODELS_DIR}/{n}" for n in names}
    with tarfile.open(tarball, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name in wanted and m.isfile()]
        missing = wanted - {m.name for m in members}
        if missing:
            raise AssertionError(f"{tarball.name} lacks {sorted(missing)}")
        tar.extractall(into, members=members, filter="data")
    return into / MODELS_DIR


def _marker() -> dict[str, str]:
    import transformers

    return {"sdist": f"{SDIST}=={SDIST_VERSION}", "transformers": transformers.__version__}


def _is_current(folder: Path) -> bool:
    marker = folder / "sftflow_source.json"
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text(encoding="utf-8"))
    return recorded.get("transformers") == _marker()["transformers"] and "tokenizer" in recorded


def ensure_tokenizers(families: list[str] | None = None) -> Path:
    """Convert every listed family's tokenizer into the cache unless it is there already; returns the cache root.

    The sdist is downloaded only when some family is missing, and all missing ones are converted from one download.
    """
    from transformers import AutoTokenizer

    root = cache_root()
    todo = [FAMILIES[f] for f in (families or list(FAMILIES)) if not _is_current(root / f)]
    if not todo:
        return root
    with tempfile.TemporaryDirectory(prefix="sftflow-llama-sdist-") as tmp:
        tmp = Path(tmp)
        names = [f.vocab for f in todo] + [f"templates/{f.template}" for f in todo if f.template]
        models = _extract(_sdist(tmp), names, tmp / "x")
        for family in todo:
            tokenizer = AutoTokenizer.from_pretrained(str(models), gguf_file=family.vocab)
            tokenizer.chat_template = (models / "templates" / family.template).read_text(encoding="utf-8") if family.template else None
            # Written beside the final folder and renamed, so a concurrent session never reads half of it.
            staging = Path(tempfile.mkdtemp(prefix=f".{family.name}-", dir=_mkdir(root)))
            tokenizer.save_pretrained(staging)
            # What a model config needs, so that building a model does not load the tokenizer again.
            special = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                       "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
            (staging / "sftflow_source.json").write_text(
                json.dumps({**_marker(), "vocab": family.vocab, "vocab_sha256": _sha256(models / family.vocab),
                            "template": family.template, "tokenizer": special}, indent=1), encoding="utf-8")
            shutil.rmtree(root / family.name, ignore_errors=True)
            try:
                staging.rename(root / family.name)
            except OSError:  # another session got there first with the same conversion
                shutil.rmtree(staging, ignore_errors=True)
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def real_tokenizer_dir(family: str) -> Path:
    """The cached tokenizer folder of a family (converted first when needed)."""
    return ensure_tokenizers([family]) / family


def _config(family: Family, tokenizer: dict[str, int | None]) -> object:
    """A two-layer, 16-wide config of the family around the tokenizer's vocabulary size and special tokens."""
    from transformers import AutoConfig

    special = {k: tokenizer[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if family.model_type == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=tokenizer["vocab_size"], n_positions=512, n_embd=16, n_layer=2,
                                    n_head=2, **special)
    return AutoConfig.for_model(
        family.model_type, vocab_size=tokenizer["vocab_size"], hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True, **special,
    )


def tiny_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny model of `family` with its real tokenizer and chat template, saved in `out_dir`.

    Like a base model on the hub: the generation config comes from the model config (its eos is the
    tokenizer's eos, not the chat template's end-of-turn token), and a tokenizer without a pad token
    is saved without one.
    """
    import torch
    from transformers import AutoModelForCausalLM

    spec = FAMILIES[family]
    source = real_tokenizer_dir(family)
    meta = json.loads((source / "sftflow_source.json").read_text(encoding="utf-8"))["tokenizer"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(spec, meta), dtype=torch.float32)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in source.iterdir():
        if f.name != "sftflow_source.json":
            shutil.copy2(f, out_dir / f.name)
    return out_dir
