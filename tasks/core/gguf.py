"""GGUF variants: the final model converted and quantized by llama.cpp, the way small LLMs are deployed
on CPUs (llama.cpp, Ollama, LM Studio), and generated with through llama-cpp-python exactly as the
Hugging Face path generates (the same prompt token ids, greedy, the same stop tokens and repetition controls).

- Conversion: llama.cpp's own `convert_hf_to_gguf.py` (with its `conversion/` package and its `gguf-py`),
  from the pinned llama-cpp-python source distribution (`LLAMA_CPP_PYTHON`), run in a subprocess on the
  Hugging Face folder (`--outtype f16`). The sdist is fetched once by pip (sha256 checked), or taken from
  `$SFTFLOW_LLAMA_SDIST`, and the three converter pieces are kept under
  `~/.cache/sftflow/llama.cpp/<version>/` (`$SFTFLOW_LLAMA_CPP_CONVERTER` names a folder holding them
  instead). The wheel of llama-cpp-python does not ship the converter, hence the sdist.
- Quantization: `llama_cpp.llama_model_quantize` (llama.cpp's quantizer, what `llama-quantize` runs) from
  the f16 file: `gguf-q8_0` (8-bit blocks of 32) and `gguf-q4_k_m` (4-bit k-quants, blocks of 256, some
  tensors kept at 6 bits). A tensor whose rows do not divide into the block size is stored by llama.cpp
  in a fallback type (its log says which): a model must be at least 256 wide for k-quants to apply throughout.
- Generation: `GgufModel` is a llama.cpp model behind the one method `tasks.core.generation.generate`
  and the app's streaming call on a Hugging Face model (`generate(input_ids, attention_mask,
  generation_config, logits_processor, streamer)`), so every caller feeds it the same token ids
  (built with the Hugging Face tokenizer and chat template: `tasks.core.prompt.encode_prompt`), stops on
  the same tokens and applies the same repetition processors (over the generated tokens only). The rows
  of a batch decode together, one llama.cpp sequence each; the logits of each step are llama.cpp's, the
  choice is the argmax, as in transformers' greedy search.
- The conversion check (`conversion_problems`): what a llama.cpp or Ollama user gets from the file
  alone must be what was scored: its embedded chat template is the tokenizer's, and its own tokenizer
  turns every scored prompt into the same token ids. A file that fails it is not served.

Which models convert: a Hugging Face folder whose architecture llama.cpp's converter registers
(`supported_architectures`) and whose tokenizer is a BPE or sentencepiece vocabulary (`tokenizer.json`
of type BPE/Unigram, or `tokenizer.model`). The scratch base's character tokenizer (a WordLevel model)
is not one: `unsupported_reason` says so, and the quantize stage skips the GGUF methods with that reason.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

from tasks.core.errors import StageError

log = logging.getLogger(__name__)

GGUF_METHODS = ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m")
GGUF_FILE = "model.gguf"
LLAMA_CPP_PYTHON = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp"
CONVERTER_PIECES = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
# llama.cpp's `llama_ftype` of each quantized method (llama.h), and how each is described in the marker.
FTYPES = {"gguf-q8_0": 7, "gguf-q4_k_m": 15}
SCHEMES = {
    "gguf-f16": "llama.cpp GGUF, float16 weights (convert_hf_to_gguf.py --outtype f16)",
    "gguf-q8_0": "llama.cpp GGUF Q8_0: 8-bit weights in blocks of 32 with one f16 scale each, from the f16 file",
    "gguf-q4_k_m": "llama.cpp GGUF Q4_K_M: 4-bit k-quants in super-blocks of 256 (some attention V and FFN down "
                   "tensors at Q6_K), from the f16 file",
}
INSTALL_HINT = "pip install -e '.[gguf]' (builds llama-cpp-python from source: ~15 min on 2 cores the first time)"
CONVERT_TIMEOUT_S = 3600
# Positions of the llama.cpp context a GGUF variant generates in (at most the model's own context):
# a summariser's prompt and answer fit; the KV cache of a 0.5B Qwen2 at this length is ~50 MB in f16.
CONTEXT_TOKENS = 4096


class GgufUnavailable(StageError):
    """A GGUF variant cannot be made here: the model does not convert, or llama.cpp's converter or binding is missing."""


# ----------------------------------------------------------------------------- what converts


def llama_cpp() -> Any:
    """The `llama_cpp` module of the pinned llama-cpp-python.

    Raises:
        GgufUnavailable: it is not installed, or it is another version.
    """
    try:
        import llama_cpp as module
    except ImportError as e:
        raise GgufUnavailable(f"llama-cpp-python is not installed: {INSTALL_HINT}") from e
    if module.__version__ != LLAMA_CPP_PYTHON:
        raise GgufUnavailable(
            f"llama-cpp-python {module.__version__} is installed; GGUF variants are checked on {LLAMA_CPP_PYTHON}: {INSTALL_HINT}"
        )
    return module


def unsupported_reason(model_dir: Path, converter: Path | None = None) -> str | None:
    """Why llama.cpp's converter cannot convert this Hugging Face folder, or None when it can try.

    Checked without running the converter: the tokenizer (a BPE or sentencepiece vocabulary; the scratch
    base's character tokenizer is a WordLevel one) and, when the converter is at hand, the architecture.
    """
    model_dir = Path(model_dir)
    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        kind = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("model", {}).get("type")
        if kind not in ("BPE", "Unigram") and not (model_dir / "tokenizer.model").is_file():
            return (f"its tokenizer is a {kind} vocabulary (the scratch base's character tokenizer is one), which "
                    "llama.cpp does not convert: GGUF needs a BPE or sentencepiece tokenizer (a real base model)")
    elif not (model_dir / "tokenizer.model").is_file():
        return "it has no tokenizer.json or tokenizer.model for llama.cpp's converter to read"
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if converter is not None:
        known = supported_architectures(converter)
        if not any(a in known for a in architectures):
            return f"llama.cpp's converter ({LLAMA_CPP_PYTHON}) has no converter for the architecture {architectures}"
    return None


def supported_architectures(converter: Path) -> set[str]:
    """The Hugging Face architecture names llama.cpp's converter registers (`@ModelBase.register(...)`)."""
    names: set[str] = set()
    for source in sorted((Path(converter) / "conversion").glob("*.py")):
        for args in re.findall(r"@ModelBase\.register\(([^)]*)\)", source.read_text(encoding="utf-8")):
            names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args))
    return names


# ----------------------------------------------------------------------------- llama.cpp's converter


def converter_dir() -> Path:
    """The folder holding llama.cpp's `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/` (module docstring).

    Raises:
        GgufUnavailable: the sdist cannot be had (no network and no `$SFTFLOW_LLAMA_SDIST`) or is not the pinned one.
    """
    given = os.environ.get("SFTFLOW_LLAMA_CPP_CONVERTER")
    if given:
        folder = Path(given)
        missing = [p for p in CONVERTER_PIECES if not (folder / p).exists()]
        if missing:
            raise GgufUnavailable(f"SFTFLOW_LLAMA_CPP_CONVERTER={folder} lacks {missing} (a llama.cpp source tree's top folder)")
        return folder
    root = Path.home() / ".cache" / "sftflow" / "llama.cpp"
    folder = root / LLAMA_CPP_PYTHON
    if all((folder / p).exists() for p in CONVERTER_PIECES):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sftflow-llama-sdist-", dir=root) as tmp:
        tarball = _sdist(Path(tmp))
        wanted = tuple(f"{_VENDOR}/{p}" for p in CONVERTER_PIECES)
        with tarfile.open(tarball, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(wanted) and (m.isfile() or m.isdir())]
            tar.extractall(Path(tmp) / "x", members=members, filter="data")
        staging = Path(tmp) / "x" / _VENDOR
        missing = [p for p in CONVERTER_PIECES if not (staging / p).exists()]
        if missing:
            raise GgufUnavailable(f"{tarball.name} lacks {missing} under {_VENDOR}")
        try:  # renamed into place, so that a concurrent process never reads half of it
            staging.rename(folder)
        except OSError:
            if not all((folder / p).exists() for p in CONVERTER_PIECES):
                raise
    return folder


def _sdist(workdir: Path) -> Path:
    """The pinned llama-cpp-python sdist: `$SFTFLOW_LLAMA_SDIST`, or downloaded by pip into `workdir`."""
    given = os.environ.get("SFTFLOW_LLAMA_SDIST")
    if given:
        path = Path(given)
    else:
        spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", spec, "-d", str(workdir)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        found = sorted(workdir.glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not found:
            raise GgufUnavailable(
                f"llama.cpp's converter comes from the {spec} sdist, and `pip download {spec}` failed "
                f"({done.stderr.strip()[-300:]}); set SFTFLOW_LLAMA_SDIST to the tarball"
            )
        path = found[0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise GgufUnavailable(f"{path} is not llama-cpp-python {LLAMA_CPP_PYTHON} (sha256 {digest[:12]}, expected {SDIST_SHA256[:12]})")
    return path


def convert(model_dir: Path, out_file: Path, converter: Path, outtype: str = "f16") -> None:
    """Convert a Hugging Face folder to one GGUF file with llama.cpp's converter (its own gguf-py first on the path).

    Raises:
        GgufUnavailable: the converter failed (the end of its error output says why).
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(converter) / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(Path(converter) / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
           "--outfile", str(out_file)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=CONVERT_TIMEOUT_S)
    if done.returncode != 0 or not Path(out_file).is_file():
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        raise GgufUnavailable(f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir}: {' / '.join(lines[-3:])[-500:]}")


def quantize_file(source: Path, out_file: Path, method: str, threads: int) -> None:
    """Quantize a GGUF file to `method`'s type with llama.cpp's quantizer.

    Raises:
        StageError: llama.cpp returned an error.
    """
    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = FTYPES[method]
    params.nthread = threads
    code = lib.llama_model_quantize(str(source).encode(), str(out_file).encode(), params)
    if code != 0 or not Path(out_file).is_file():
        raise StageError(f"llama.cpp's quantizer failed ({code}) making {method} from {source}")


def write_variant(
    model_dir: Path, method: str, folder: Path, tokenizer: Any, f16_file: Path, *, threads: int, source_sha256: str | None
) -> None:
    """Write a GGUF variant folder: `model.gguf`, the Hugging Face config, generation config and tokenizer
    (prompts are built with it, as for the full model), and the variant marker."""
    from tasks.core.variants import write_marker

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if method == "gguf-f16":
        shutil.copyfile(f16_file, folder / GGUF_FILE)
    else:
        quantize_file(f16_file, folder / GGUF_FILE, method, threads)
    for name in ("config.json", "generation_config.json"):
        if (Path(model_dir) / name).is_file():
            shutil.copyfile(Path(model_dir) / name, folder / name)
    tokenizer.save_pretrained(folder)
    write_marker(folder, method, library=f"llama.cpp via llama-cpp-python {LLAMA_CPP_PYTHON}", scheme=SCHEMES[method],
                 source_sha256=source_sha256, weights_file=GGUF_FILE)


# ----------------------------------------------------------------------------- generating


_OPEN: weakref.WeakSet[GgufModel] = weakref.WeakSet()


@atexit.register
def _close_open_models() -> None:
    """Free llama.cpp's models before the interpreter tears its modules down (llama-cpp-python's own
    `__del__` then fails with a traceback on stderr)."""
    for model in list(_OPEN):
        model.close()


class GgufModel:
    """A GGUF file run by llama.cpp, generating like a Hugging Face causal LM for `tasks.core.generation`.

    The rows of a call decode together, one llama.cpp sequence each (`n_seq_max` = rows, a KV cache per
    sequence sized to the longest prompt plus `max_new_tokens`): each step is one llama.cpp batch of
    every row still writing, so the weights are read once a step for all of them, as in a batched
    transformers step. The context is kept while it is big enough for the next call.

    Attributes:
        config: the Hugging Face config (its context length, for `generate`'s warning).
        generation_config: the Hugging Face generation config (its eos, for `stop_token_ids`).
        path: the GGUF file (read into memory at load: it may be removed afterwards).
        threads: llama.cpp's threads (those torch uses in this process: the full model's).
        context: most positions one row may use (`CONTEXT_TOKENS`, at most the model's context).
    """

    training = False

    def __init__(self, path: Path, config: Any, generation_config: Any, threads: int) -> None:
        lib = llama_cpp()
        self.path, self.config, self.generation_config, self.threads = Path(path), config, generation_config, threads
        self._lib = lib
        self._lock = threading.Lock()  # one llama.cpp context: concurrent calls take turns
        model_context = int(getattr(config, "max_position_embeddings", 0) or 0) or CONTEXT_TOKENS
        self.context = min(model_context, CONTEXT_TOKENS)
        # Read into memory (no mmap): a registered variant is loaded from a download folder that is then removed.
        # This context only tokenizes; generation runs in `_context`'s.
        self._llama = lib.Llama(model_path=str(self.path), n_ctx=256, n_batch=256, n_threads=threads,
                                n_threads_batch=threads, logits_all=False, use_mmap=False, verbose=False, seed=0)
        self._ctx: Any = None
        self._ctx_shape = (0, 0)
        _OPEN.add(self)

    @property
    def device(self) -> Any:
        import torch

        return torch.device("cpu")

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF file's key/value metadata (chat template, tokenizer settings...)."""
        return dict(self._llama.metadata)

    def eval(self) -> GgufModel:
        return self

    def train(self, mode: bool = True) -> GgufModel:
        if mode:
            raise StageError("a GGUF variant cannot be trained")
        return self

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """llama.cpp's own tokenization of `text` (special tokens parsed), as llama.cpp or Ollama would feed it."""
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def _context(self, rows: int, per_row: int) -> Any:
        """A llama.cpp context for `rows` sequences of `per_row` positions each (the kept one when big enough)."""
        from llama_cpp import _internals

        if self._ctx is not None and self._ctx_shape[0] >= rows and self._ctx_shape[1] >= per_row:
            return self._ctx
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        per_row = -(-per_row // 256) * 256
        params = self._lib.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = rows * per_row, rows, False
        params.n_batch = params.n_ubatch = max(512, rows)
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        self._ctx = _internals.LlamaContext(model=self._llama._model, params=params, verbose=False)
        self._ctx_shape = (rows, per_row)
        return self._ctx

    def generate(self, input_ids: Any, attention_mask: Any, generation_config: Any, logits_processor: Any = None,
                 streamer: Any = None, **unused: Any) -> Any:
        """Greedy generation of every row, as transformers' `generate` returns it: the (left-padded) input
        followed by the new tokens, rows that stopped early padded with the pad token.

        Raises:
            StageError: a prompt plus `max_new_tokens` does not fit `context`.
        """
        import torch

        if unused:
            raise TypeError(f"GgufModel.generate does not take {sorted(unused)}")
        if streamer is not None and input_ids.shape[0] != 1:
            raise ValueError("streaming generates one row at a time")
        stops = {int(t) for t in _as_list(generation_config.eos_token_id)}
        pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else min(stops)
        max_new = int(generation_config.max_new_tokens)
        padded = input_ids.tolist()
        prompts = [[t for t, m in zip(row, mask) if m] for row, mask in zip(padded, attention_mask.tolist())]
        longest = max(len(p) for p in prompts)
        if longest + max_new > self.context:
            raise StageError(
                f"a prompt of {longest} tokens + max_new_tokens {max_new} does not fit the GGUF variant's "
                f"context of {self.context} tokens: shorten the text (train.max_source_length) or max_new_tokens"
            )
        if streamer is not None:
            streamer.put(input_ids.cpu())
        new: list[list[int]] = [[] for _ in prompts]
        group = max(1, int(self._lib.llama_max_parallel_sequences()))
        with self._lock:
            for first in range(0, len(prompts), group):
                rows = list(range(first, min(first + group, len(prompts))))
                self._decode_rows(rows, prompts, padded, new, max_new, stops, logits_processor, streamer)
        if streamer is not None:
            streamer.end()
        out = [row + n for row, n in zip(padded, new)]
        width = max(len(r) for r in out)
        return torch.tensor([r + [pad] * (width - len(r)) for r in out], dtype=torch.long)

    def _decode_rows(self, rows: list[int], prompts: list[list[int]], padded: list[list[int]], new: list[list[int]],
                     max_new: int, stops: set[int], logits_processor: Any, streamer: Any) -> None:
        """Decode `rows` together (sequence k of the context is the k-th of them), filling `new` in place."""
        import numpy as np
        import torch
        from llama_cpp import _internals

        lib = self._lib
        ctx = self._context(len(rows), max(len(prompts[i]) for i in rows) + max_new)
        lib.llama_memory_clear(lib.llama_get_memory(ctx.ctx), True)
        n_batch = max(512, len(rows))
        batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        n_vocab = self._llama.n_vocab()

        def logits(j: int) -> Any:
            pointer = lib.llama_get_logits_ith(ctx.ctx, j)
            return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(n_vocab,)).copy())[None, :]

        def put(tokens: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
            b = batch.batch
            b.n_tokens = len(tokens)
            for j, (token, pos, seq, wants) in enumerate(tokens):
                b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = token, pos, 1, wants
                b.seq_id[j][0] = seq
            ctx.decode(batch)

        try:
            scores: dict[int, Any] = {}
            for k, i in enumerate(rows):  # each prompt, in chunks of n_batch tokens; logits of its last token
                prompt = prompts[i]
                for start in range(0, len(prompt), n_batch):
                    chunk = prompt[start:start + n_batch]
                    put([(t, start + j, k, start + j == len(prompt) - 1) for j, t in enumerate(chunk)])
                scores[i] = logits(len(prompt) - 1 - (len(prompt) - 1) // n_batch * n_batch)
            active = list(rows)
            while active:
                writing = []
                for i in active:
                    row_scores = scores[i]
                    if logits_processor:
                        row_scores = logits_processor(torch.tensor([padded[i] + new[i]], dtype=torch.long), row_scores)
                    token = int(torch.argmax(row_scores, dim=-1))
                    new[i].append(token)
                    if streamer is not None:
                        streamer.put(torch.tensor([token]))
                    if token not in stops and len(new[i]) < max_new:
                        writing.append(i)
                if not writing:
                    break
                put([(new[i][-1], len(prompts[i]) + len(new[i]) - 1, rows.index(i), True) for i in writing])
                scores = {i: logits(j) for j, i in enumerate(writing)}
                active = writing
        finally:
            batch.close()

    def __del__(self) -> None:
        self.close()  # the contexts before the model they use

    def close(self) -> None:
        if getattr(self, "_ctx", None) is not None:
            self._ctx.close()
            self._ctx = None
        if getattr(self, "_llama", None) is not None:
            self._llama.close()
            self._llama = None


def load_gguf(folder: Path, threads: int | None = None) -> tuple[GgufModel, Any]:
    """Load a GGUF variant folder (`write_variant`): the llama.cpp model and the Hugging Face tokenizer
    that builds its prompts (pad token set, left padding, as `load_model_and_tokenizer` gives it).

    Raises:
        GgufUnavailable: llama-cpp-python is not installed.
    """
    import torch
    from transformers import AutoConfig, GenerationConfig

    from tasks.core.modeling import load_tokenizer

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    generation_config = (GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file()
                         else GenerationConfig.from_model_config(config))
    tokenizer = load_tokenizer(str(folder), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return GgufModel(folder / GGUF_FILE, config, generation_config, threads or torch.get_num_threads()), tokenizer


def conversion_problems(model: GgufModel, tokenizer: Any, texts: list[str], settings: Any) -> list[str]:
    """What a llama.cpp or Ollama user would get differently from the GGUF file alone (empty: nothing).

    The file's embedded chat template must be the tokenizer's (when prompts go through it), and llama.cpp's
    tokenizer must give every prompt the token ids the Hugging Face tokenizer gives it (`encode_prompt`:
    a chat-rendered prompt without added special tokens, a plain one with them).
    """
    from tasks.core.generation import encode_prompts
    from tasks.core.prompt import build_prompt, uses_chat_template

    problems = []
    chat = uses_chat_template(tokenizer, settings.use_chat_template)
    if chat:
        embedded = model.metadata.get("tokenizer.chat_template")
        if embedded != tokenizer.chat_template:
            problems.append("the GGUF file's chat template differs from the tokenizer's" if embedded
                            else "the GGUF file carries no chat template")
    expected = encode_prompts(tokenizer, texts, settings)
    differ = 0
    for text, ids in zip(texts, expected):
        prompt = build_prompt(text, settings.prompt_template, tokenizer, settings.use_chat_template)
        if tokenizer(prompt, add_special_tokens=not chat)["input_ids"] == ids:
            same = model.tokenize(prompt, add_special=not chat) == ids
        else:  # the text was cut to max_source_length: both tokenizers on the prompt those ids spell
            spelled = tokenizer.decode(ids, skip_special_tokens=False)
            same = model.tokenize(spelled, add_special=False) == tokenizer(spelled, add_special_tokens=False)["input_ids"]
        differ += not same
    if differ:
        problems.append(f"llama.cpp tokenizes {differ} of {len(texts)} prompts differently from the Hugging Face tokenizer")
    return problems


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]


# ----------------------------------------------------------------------------- Ollama


_PROMPT_SLOT = "\x00sftflow-prompt\x00"


def _go_literal(text: str) -> str:
    """Text as a literal inside a Go template (Ollama's TEMPLATE): `{{` and `}}` written as actions that print them."""
    return text.replace("{{", "\x01").replace("}}", '{{ "}}" }}').replace("\x01", '{{ "{{" }}')


def runtime_adds_bos(gguf_file: Path) -> bool:
    """Whether llama.cpp (and so Ollama) puts the BOS token before a prompt it tokenizes from this file's vocabulary."""
    llama = llama_cpp().Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    try:
        return llama.tokenize(b"x", add_bos=True, special=False)[:1] == [llama.token_bos()]
    finally:
        llama.close()


def ollama_template(tokenizer: Any, prompt_template: str, use_chat_template: bool, runtime_adds_bos: bool = False) -> str:
    """Ollama's TEMPLATE that renders exactly the prompt the model was scored on, with the user's text as `.Prompt`.

    The prompt is built as every stage builds it (`tasks.core.prompt.build_prompt`: `data.prompt_template`,
    then the tokenizer's chat template when used) around a placeholder, which becomes `{{ .Prompt }}`. When
    the runtime adds the BOS token itself (`runtime_adds_bos`: Llama 3's `<|begin_of_text|>`, Mistral's
    `<s>`), the template's own leading BOS is left out, so the model sees it once.
    """
    from tasks.core.prompt import build_prompt

    rendered = build_prompt(_PROMPT_SLOT, prompt_template, tokenizer, use_chat_template)
    bos = tokenizer.bos_token
    if runtime_adds_bos and bos and rendered.startswith(bos):
        rendered = rendered[len(bos):]  # the runtime puts it there: written once, not twice
    if rendered.count(_PROMPT_SLOT) != 1:
        raise StageError("the prompt template must hold {text} exactly once to be written as an Ollama TEMPLATE")
    before, after = rendered.split(_PROMPT_SLOT)
    template = f"{_go_literal(before)}{{{{ .Prompt }}}}{_go_literal(after)}"
    if '"""' in template:
        raise StageError('the rendered prompt holds """, which an Ollama Modelfile cannot quote')
    return template


def ollama_modelfile(
    tokenizer: Any, generation_config: Any, settings: dict[str, Any], gguf_name: str, header: str, runtime_adds_bos: bool = False
) -> str:
    """An Ollama `Modelfile` that generates as the GGUF variant was scored: the same prompt (TEMPLATE), the
    same stop tokens (`tasks.core.generation.stop_token_ids`), greedy (temperature 0, top_k 1), at most
    `max_new_tokens` new tokens (num_predict); Ollama's own repetition penalty (1.1 by default) is set to
    the version's (1 when it has none).

    Args:
        tokenizer: the variant's Hugging Face tokenizer.
        generation_config: its generation config (eos).
        settings: the version's `sftflow.json`.
        gguf_name: the GGUF file's name beside the Modelfile.
        header: comment lines saying where it comes from.
        runtime_adds_bos: llama.cpp adds BOS for this file (`runtime_adds_bos`).
    """
    from types import SimpleNamespace

    from tasks.core.generation import stop_token_ids

    use_chat = bool(settings["use_chat_template"])
    stops = tokenizer.convert_ids_to_tokens(stop_token_ids(SimpleNamespace(generation_config=generation_config), tokenizer, use_chat))
    lines = [*(f"# {line}" for line in header.splitlines()), f"FROM ./{gguf_name}",
             f'TEMPLATE """{ollama_template(tokenizer, settings["prompt_template"], use_chat, runtime_adds_bos)}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    penalty = float(settings.get("repetition_penalty", 1.0))
    lines += ["PARAMETER temperature 0", "PARAMETER top_k 1", f"PARAMETER num_predict {int(settings['max_new_tokens'])}",
              f"PARAMETER num_ctx {CONTEXT_TOKENS}", f"PARAMETER repeat_penalty {penalty:g}"]
    if penalty != 1.0:
        lines.append("# Ollama's repeat_penalty also counts the prompt's tokens (last repeat_last_n); sftflow's counts "
                     "only generated ones: outputs can differ from the scored ones.")
    if int(settings.get("no_repeat_ngram_size", 0)):
        lines.append(f"# no_repeat_ngram_size {settings['no_repeat_ngram_size']} (the scored decoding) has no Ollama "
                     "parameter: outputs can differ from the scored ones.")
    return "\n".join(lines) + "\n"
