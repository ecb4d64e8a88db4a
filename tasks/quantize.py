"""The `quantize` stage: smaller, cheaper variants of the fine-tuned model, each measured against the
full-precision model on the same test rows and gated on its ROUGE-L loss.

Inputs: `artifacts/train/model`, `artifacts/split/test.jsonl`. Outputs: one folder per method under
`artifacts/quantize/<method>/` (loadable with `load_quantized`, marked by `sftflow_quantization.json`),
`artifacts/quantize/predictions.jsonl`, `metrics/quantize.json` (flat keys `<variant>.size_ratio`,
`.latency_ratio`, `.rouge-l`, `.rouge-l_drop`, `.passed`; ratios are variant ÷ full, below 1 is better)
and `plots/quantize/comparison.png`.

Methods:

- `int8` (CPU): every `nn.Linear` (the tied `lm_head` included) becomes PyTorch's dynamically quantized
  int8 linear (`torch.ao.nn.quantized.dynamic.Linear`: int8 weights with one scale per output channel,
  activations quantized per batch, int8 x int8 GEMM in fbgemm/oneDNN); embeddings are stored as int8 with
  one scale per row and dequantized on load. Saved as plain int8 + float32 tensors in safetensors (no
  pickle) with a marker naming the modules; `load_quantized` rebuilds exactly the modules `quantize_int8`
  built, so a reloaded model generates exactly what it generated before saving.
- `bnb-int8`, `bnb-nf4` (CUDA): bitsandbytes LLM.int8() and 4-bit NF4 through transformers'
  `BitsAndBytesConfig`, saved with `save_pretrained` (safetensors), `device_map="auto"`.

Why this int8 path (`python -m bench.quantize`: default-shaped model, 32 rows, batch 32, 48 new
tokens, 1 torch thread; CPU time ÷ fp32 in the same run, best of 3 interleaved passes; size ÷ fp32):

- torchao 0.18 `Int8WeightOnlyConfig`: time x1.05 (x1.41 in an earlier wall-clock run), size x0.48;
  `Int8DynamicActivationInt8WeightConfig`: time x1.44-1.54, size x0.48. On CPU in eager mode
  torchao's `Int8Tensor` converts the int8 weight back to float (or calls `torch._int_mm`) on every
  matmul; its fast CPU kernels need `torch.compile` or a torchao build with its C++ CPU ops, which the
  wheel here lacks. The tied embedding stays fp32, hence only x0.48.
- optimum-quanto 0.2.7 `qint8` weights: time x1.14, size x0.48: it dequantizes before the float matmul
  too (its int8 CPU kernel serves only bf16 activations), and its int8 activations break transformers 5
  generation (`_to_copy()` on a quantized logits tensor). Its last release is from early 2025.
- PyTorch dynamic quantization (ours): time x0.76-0.91, the only one faster, because it runs a real
  int8 GEMM (1.5-3x faster per matmul than fp32 at these shapes), and size x0.25 because the tied
  embedding / lm_head matrix is stored once in int8 too. Its Python entry point
  `torch.ao.quantization.quantize_dynamic` is deprecated in favour of torchao (pytorch/ao#2259), so we
  do not call it: we build the quantized modules from our own safetensors tensors through the module
  class and the public `torch.quantize_per_channel`, the kernels stay those of torch itself. Torch
  2.13 also warns that the quantized dtypes these modules hold (`torch.qint8`) will be removed in a
  future release (pytorch/pytorch#184982). That is why the files hold no torch-specific object: plain
  int8 weights with one float32 scale per output channel are exactly torchao's `Int8Tensor` (`qdata`,
  `scale`), so when torch drops qint8 only `apply_int8` changes (to torchao, or to whatever int8 CPU
  kernel is then fastest), not the saved variants.

Caveat: the stage itself, at 2 threads on a shared 2-core machine at load ~7, measured wall x1.23 and
CPU time x1.01 for int8 (64 rows); both are written (`latency_ratio`, `cpu_time_ratio`) because on a
busy machine either alone misleads.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.config import Params
from tasks.errors import StageError
from tasks.io import read_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)

MARKER_FILE = "sftflow_quantization.json"
WEIGHTS_FILE = "model.safetensors"
CPU_METHODS = ("int8",)
GPU_METHODS = ("bnb-int8", "bnb-nf4")
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- int8 (CPU)


def _int8_rows(weight: Any) -> tuple[Any, Any]:
    """Symmetric int8 with one float32 scale per row (output channel of a linear, token of an embedding)."""
    import torch

    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def int8_state(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The int8 form of a model: tensors for safetensors and the layout that says how to rebuild it.

    Every `nn.Linear` and `nn.Embedding` weight becomes `<module>.weight_int8` (int8) and
    `<module>.weight_scale` (float32, one per row); a weight shared by two modules (tied embeddings) is
    stored once and the second module is listed in `aliases`. Every other parameter and persistent
    buffer is kept in float32 under its usual name.

    Args:
        model: a float causal LM on the CPU.

    Returns:
        (tensors, layout) where layout has `linear`, `embedding` (module names) and `aliases`
        (module name -> module whose int8 weight it reuses).
    """
    import torch

    tensors: dict[str, Any] = {}
    layout: dict[str, Any] = {"linear": [], "embedding": [], "aliases": {}}
    owner_of: dict[int, str] = {}
    handled: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        layout["linear" if isinstance(module, torch.nn.Linear) else "embedding"].append(name)
        handled.add(f"{name}.weight")
        if id(module.weight) in owner_of:
            layout["aliases"][name] = owner_of[id(module.weight)]
        else:
            owner_of[id(module.weight)] = name
            tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"] = _int8_rows(module.weight)
    for key, value in model.state_dict().items():
        if key not in handled:
            tensors[key] = value.detach().float().contiguous() if value.is_floating_point() else value.contiguous()
    return tensors, layout


def apply_int8(model: Any, tensors: dict[str, Any], layout: dict[str, Any]) -> Any:
    """Put the int8 form into a model of the same architecture (in place): the one path shared by
    `quantize_int8` and `load_quantized`, so both give bit-identical outputs.

    Linears become `torch.ao.nn.quantized.dynamic.Linear` (int8 weight, per-channel scales); embeddings
    get their int8 weight dequantized (a lookup costs no matmul; only the disk copy is int8).

    Returns:
        The model, in eval mode.

    Raises:
        StageError: the tensors do not fit the model, or this torch has no quantized engine.
    """
    import torch

    if torch.backends.quantized.engine == "none":
        raise StageError(
            "this torch build has no quantized CPU engine (torch.backends.quantized.supported_engines is "
            f"{torch.backends.quantized.supported_engines}); use a CPU torch wheel for x86 or ARM"
        )
    quantized = set(layout["linear"]) | set(layout["embedding"])
    rest = {k: v for k, v in tensors.items() if not k.endswith((".weight_int8", ".weight_scale"))}
    result = model.load_state_dict(rest, strict=False)
    missing = [k for k in result.missing_keys if k.rsplit(".", 1)[0] not in quantized]
    if missing or result.unexpected_keys:
        raise StageError(
            f"the int8 weights do not fit this architecture (missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}): re-run `sftflow quantize` on the model"
        )

    def source(name: str) -> tuple[Any, Any]:
        src = layout["aliases"].get(name, name)
        return tensors[f"{src}.weight_int8"], tensors[f"{src}.weight_scale"]

    for name in layout["embedding"]:
        q, scale = source(name)
        module = model.get_submodule(name)
        module.weight = torch.nn.Parameter(q.float() * scale[:, None], requires_grad=False)
    with warnings.catch_warnings():
        # Known and documented above (pytorch/pytorch#184982): the qint8 deprecation, once per module.
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*are deprecated")
        for name in layout["linear"]:
            _replace_linear(model, name, *source(name))
    model.eval()
    return model


def _replace_linear(model: Any, name: str, q: Any, scale: Any) -> None:
    """Swap the float linear `name` for a dynamically quantized int8 linear holding `q` and `scale`."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    old = model.get_submodule(name)
    new = DynamicInt8Linear(old.in_features, old.out_features, bias_=old.bias is not None, dtype=torch.qint8)
    # q * scale re-quantizes to exactly q: the float error is far below half a step.
    qweight = torch.quantize_per_channel(
        q.float() * scale[:, None], scale.double(), torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8
    )
    new.set_weight_bias(qweight, None if old.bias is None else old.bias.detach().float())
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_int8(model: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Quantize a float model to int8 in place (see the module docstring for the scheme).

    Returns:
        (model, tensors, layout): the int8 model and what `save_int8` writes.
    """
    tensors, layout = int8_state(model)
    return apply_int8(model, tensors, layout), tensors, layout


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def save_int8(tensors: dict[str, Any], layout: dict[str, Any], model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Write the int8 form as safetensors + config + tokenizer + the marker file."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "sftflow_quantization": "int8"})
    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_marker(
        out_dir,
        "int8",
        library="torch.ao.nn.quantized.dynamic (fbgemm/onednn int8 GEMM)",
        scheme="symmetric int8 weights, one float32 scale per output channel; int8 activations per batch",
        layout=layout,
    )


def write_marker(out_dir: Path, method: str, *, library: str, scheme: str, layout: dict[str, Any] | None = None) -> None:
    """The marker that says how a folder was quantized and which loader reads it (`load_quantized`)."""
    marker = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "library": library,
        "scheme": scheme,
        "loader": "tasks.quantize.load_quantized",
        "versions": _versions(),
    }
    if layout is not None:
        marker["weights_file"] = WEIGHTS_FILE
        marker["layout"] = layout
    write_json(Path(out_dir) / MARKER_FILE, marker)


def read_marker(path: Path) -> dict[str, Any]:
    """The marker of a quantized folder.

    Raises:
        StageError: the folder has no marker or names a method this code does not know.
    """
    marker_path = Path(path) / MARKER_FILE
    if not marker_path.exists():
        raise StageError(f"{path} has no {MARKER_FILE}: it is not a quantized model; load it with load_model_and_tokenizer")
    marker = json.loads(marker_path.read_text(encoding="utf-8"))
    if marker.get("method") not in CPU_METHODS + GPU_METHODS:
        raise StageError(f"{marker_path}: unknown quantization method {marker.get('method')!r}")
    return marker


def load_quantized(path: str | Path, device_map: Any = "auto") -> tuple[Any, Any]:
    """Load a folder written by the quantize stage, in any process.

    Args:
        path: `artifacts/quantize/<method>` (or its copy in the MLflow registry).
        device_map: for the bitsandbytes methods (`auto` spreads a large model over the GPUs); the
            int8 method always loads on the CPU.

    Returns:
        (model, tokenizer) ready for `tasks.generation.generate`, in eval mode.

    Raises:
        StageError: no marker, an unknown method, weights that do not fit, or a GPU method without CUDA.
    """
    import torch

    path = Path(path)
    marker = read_marker(path)
    method = marker["method"]
    if method == "int8":
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        from tasks.modeling import _load_tokenizer

        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model = apply_int8(model, load_file(str(path / marker["weights_file"])), marker["layout"])
        tokenizer = _load_tokenizer(str(path), trust_remote_code=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        if (path / "generation_config.json").exists():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(path)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    _require_cuda(method)
    from tasks.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, dtype=torch.bfloat16, device_map=device_map)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- bitsandbytes (CUDA)


def _require_cuda(method: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise StageError(
            f"quantization method {method!r} needs a CUDA GPU and bitsandbytes; on this machine keep "
            "quantize.methods=[int8] (e.g. -S 'quantize.methods=[int8]')"
        )


def bnb_config(method: str) -> Any:
    """transformers' BitsAndBytesConfig for `bnb-int8` (LLM.int8()) or `bnb-nf4` (4-bit NF4, bf16 compute)."""
    import torch
    from transformers import BitsAndBytesConfig

    if method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if method == "bnb-nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    raise StageError(f"not a bitsandbytes method: {method!r} (choose bnb-int8 or bnb-nf4)")


def quantize_bnb(model_dir: Path, method: str, out_dir: Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Quantize a model folder with bitsandbytes while loading it on the GPU(s) and save the result.

    Returns:
        (model, tokenizer), the quantized model as loaded (on CUDA).

    Raises:
        StageError: no CUDA, or bitsandbytes is not installed.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.modeling import _load_tokenizer

    _require_cuda(method)
    try:
        import bitsandbytes
    except ImportError as e:
        raise StageError(f"{method} needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from e
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=bnb_config(method),
        device_map="auto",
        dtype=torch.bfloat16,
        trust_remote_code=trust_remote_code,
    )
    tokenizer = _load_tokenizer(str(model_dir), trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_marker(
        out_dir,
        method,
        library=f"bitsandbytes {bitsandbytes.__version__} via transformers BitsAndBytesConfig",
        scheme="LLM.int8() (int8 weights, fp16 outliers)" if method == "bnb-int8" else "4-bit NF4, double quantization, bf16 compute",
    )
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- measuring


def weights_bytes(folder: Path) -> int:
    """Bytes of the weight files (`*.safetensors`, `*.bin`) in a model folder."""
    files = [p for p in Path(folder).iterdir() if p.suffix in {".safetensors", ".bin"}]
    if not files:
        raise StageError(f"{folder} holds no weight files (*.safetensors)")
    return sum(p.stat().st_size for p in files)


def timed_generate(
    models: dict[str, tuple[Any, Any]], rows: Sequence[dict[str, Any]], params: Params, progress: bool = True
) -> tuple[dict[str, list[str]], dict[str, float], dict[str, float]]:
    """Generate with every model on the same batches, interleaved batch by batch so that machine load
    falls on all of them alike.

    Returns:
        (predictions, wall seconds, CPU seconds) per model name.
    """
    from tqdm.auto import tqdm

    from tasks.evaluate import generation_settings
    from tasks.generation import generate

    settings = generation_settings(params)
    batch_size = params.evaluate.batch_size
    # Similar lengths per batch, as generate itself would sort them; the order is restored below.
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["text"]), i))
    preds: dict[str, list[str]] = {name: [""] * len(rows) for name in models}
    wall = dict.fromkeys(models, 0.0)
    cpu = dict.fromkeys(models, 0.0)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="quantize: generate", unit="batch", disable=not progress):
        texts = [rows[i]["text"] for i in batch]
        for name, (model, tokenizer) in models.items():
            t_wall, t_cpu = time.perf_counter(), time.process_time()
            out = generate(
                model,
                tokenizer,
                texts,
                prompt_template=settings["prompt_template"],
                use_chat_template=settings["use_chat_template"],
                max_new_tokens=settings["max_new_tokens"],
                batch_size=batch_size,
                max_source_length=settings["max_source_length"],
            )
            wall[name] += time.perf_counter() - t_wall
            cpu[name] += time.process_time() - t_cpu
            for i, p in zip(batch, out):
                preds[name][i] = p
    return preds, wall, cpu


def gate(full_rouge_l: float, variant_rouge_l: float, max_drop: float) -> dict[str, Any]:
    """The quality gate of one variant: its ROUGE-L drop in points and whether it is within `max_drop`."""
    drop = full_rouge_l - variant_rouge_l
    return {"rouge-l_drop": drop, "passed": drop <= max_drop}


def variant_metrics(
    name: str,
    *,
    full: dict[str, float],
    variant: dict[str, float],
    agreement: float,
    max_drop: float,
) -> dict[str, Any]:
    """Flat `<name>.*` metrics of a variant against the full model measured in the same run.

    Args:
        name: the method (`int8`, `bnb-nf4`...).
        full: the full model's `size_bytes`, `latency_s`, `cpu_s`, `rouge-l`.
        variant: the same keys for the variant.
        agreement: share of rows whose prediction equals the full model's.
        max_drop: `quantize.max_drop`.

    Returns:
        `<name>.size_mb`, `.size_ratio`, `.latency_s`, `.latency_ratio`, `.cpu_time_ratio`, `.rouge-l`,
        `.rouge-l_drop`, `.agreement`, `.passed` (ratios are variant ÷ full).
    """
    g = gate(full["rouge-l"], variant["rouge-l"], max_drop)
    return {
        f"{name}.size_mb": variant["size_bytes"] / 1e6,
        f"{name}.size_ratio": variant["size_bytes"] / full["size_bytes"],
        f"{name}.latency_s": variant["latency_s"],
        f"{name}.latency_ratio": variant["latency_s"] / full["latency_s"],
        f"{name}.cpu_time_ratio": variant["cpu_s"] / full["cpu_s"] if full["cpu_s"] > 0 else float("nan"),
        f"{name}.rouge-l": variant["rouge-l"],
        f"{name}.rouge-l_drop": g["rouge-l_drop"],
        f"{name}.agreement": agreement,
        f"{name}.passed": g["passed"],
    }


def plot_comparison(metrics: dict[str, Any], methods: Sequence[str], path: Path) -> None:
    """Three panels: size and latency ratios to the full model, and ROUGE-L of every variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.io import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for ax, key, title in (
        (axes[0], "size_ratio", "weights on disk ÷ full"),
        (axes[1], "latency_ratio", "generation time ÷ full"),
    ):
        values = [metrics[f"{m}.{key}"] for m in methods]
        bars = ax.bar(list(methods), values, color="tab:blue")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_title(title)
    full_name = "full" if "full.rouge-l" in metrics else "full-cuda"
    names = [full_name, *methods]
    values = [metrics[f"{full_name}.rouge-l"], *(metrics[f"{m}.rouge-l"] for m in methods)]
    colors = ["tab:grey"] + ["tab:green" if metrics[f"{m}.passed"] else "tab:red" for m in methods]
    bars = axes[2].bar(names, values, color=colors)
    axes[2].bar_label(bars, fmt="%.2f", fontsize=8)
    axes[2].set_title(f"ROUGE-L (red: drop > {metrics['max_drop']:g})")
    fig.suptitle(f"quantized variants on {metrics['rows']} test rows, batch {metrics['batch_size']}")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------- the stage


def run(params: Params) -> dict[str, Any]:
    """Quantize the fine-tuned model with each of `quantize.methods` and measure every variant.

    Each variant is saved, reloaded from its folder (so what is measured is what serves) and run on
    the same test rows and batches as the full-precision model on the same device.

    Returns:
        The metrics written to `metrics/quantize.json`.

    Raises:
        StageError: the model or test split is missing, or a GPU method is asked for without CUDA.
    """
    import torch

    from tasks.modeling import load_model_and_tokenizer
    from tasks.scoring import score

    cfg = params.quantize
    model_dir = params.paths.stage_dir("train") / "model"
    test_path = params.paths.stage_dir("split") / "test.jsonl"
    if not (model_dir / "config.json").exists():
        raise StageError(f"{model_dir} holds no model: run `sftflow train` first")
    if not test_path.exists():
        raise StageError(f"{test_path} does not exist: run `sftflow split` first")
    for method in cfg.methods:
        if method in GPU_METHODS:
            _require_cuda(method)
    rows = read_jsonl(test_path)
    if cfg.rows:
        rows = rows[: cfg.rows]
    if not rows:
        raise StageError(f"{test_path} is empty: nothing to measure the variants on")
    threads = torch.get_num_threads()
    out_dir = params.paths.stage_dir("quantize")
    references = [r["summary"] for r in rows]
    language = params.data.language
    log.info("quantizing %s with %s; measuring on %d test rows (%d threads)", model_dir, list(cfg.methods), len(rows), threads)

    metrics: dict[str, Any] = {
        "rows": len(rows),
        "batch_size": params.evaluate.batch_size,
        "max_new_tokens": params.evaluate.max_new_tokens,
        "threads": threads,
        "max_drop": cfg.max_drop,
    }
    full_size = weights_bytes(model_dir)
    prediction_columns: dict[str, list[str]] = {}
    devices = [("cpu", [m for m in cfg.methods if m in CPU_METHODS]), ("cuda", [m for m in cfg.methods if m in GPU_METHODS])]
    for device, methods in devices:
        if not methods:
            continue
        full_name = "full" if device == "cpu" else "full-cuda"
        full_model, tokenizer = load_model_and_tokenizer(model_dir, trust_remote_code=params.model.trust_remote_code)
        full_model.to(device).eval()
        models = {full_name: (full_model, tokenizer)}
        for method in methods:
            folder = out_dir / method
            if method == "int8":
                source, _ = load_model_and_tokenizer(model_dir, trust_remote_code=params.model.trust_remote_code)
                _, tensors, layout = quantize_int8(source)
                save_int8(tensors, layout, source, tokenizer, folder)
                del source, tensors
            else:
                quantize_bnb(model_dir, method, folder, params.model.trust_remote_code)
            models[method] = load_quantized(folder)
            log.info("%s: %.2f MB of weights (full: %.2f MB)", method, weights_bytes(folder) / 1e6, full_size / 1e6)
        preds, wall, cpu = timed_generate(models, rows, params)
        full_scores = score(preds[full_name], references, language)
        full = {"size_bytes": full_size, "latency_s": wall[full_name], "cpu_s": cpu[full_name], "rouge-l": full_scores["rouge-l"]}
        metrics.update({f"{full_name}.size_mb": full_size / 1e6, f"{full_name}.latency_s": wall[full_name], f"{full_name}.rouge-l": full["rouge-l"]})
        prediction_columns[full_name] = preds[full_name]
        for method in methods:
            s = score(preds[method], references, language)
            variant = {"size_bytes": weights_bytes(out_dir / method), "latency_s": wall[method], "cpu_s": cpu[method], "rouge-l": s["rouge-l"]}
            agreement = sum(a == b for a, b in zip(preds[method], preds[full_name])) / len(rows)
            metrics.update(variant_metrics(method, full=full, variant=variant, agreement=agreement, max_drop=cfg.max_drop))
            prediction_columns[method] = preds[method]
            log.info(
                "%s: size x%.2f, latency x%.2f, ROUGE-L %.2f vs %.2f (drop %.2f, max %.2f): %s",
                method, metrics[f"{method}.size_ratio"], metrics[f"{method}.latency_ratio"], s["rouge-l"],
                full["rouge-l"], metrics[f"{method}.rouge-l_drop"], cfg.max_drop,
                "passed" if metrics[f"{method}.passed"] else "FAILED",
            )
        del models, full_model
        if device == "cuda":
            torch.cuda.empty_cache()
    metrics["passed"] = all(metrics[f"{m}.passed"] for m in cfg.methods)
    write_jsonl(
        out_dir / "predictions.jsonl",
        [{"id": r["id"], "reference": r["summary"], **{k: v[i] for k, v in prediction_columns.items()}} for i, r in enumerate(rows)],
    )
    write_json(params.paths.metrics_file("quantize"), metrics)
    plot_comparison(metrics, list(cfg.methods), params.paths.plots_dir("quantize") / "comparison.png")
    return metrics
