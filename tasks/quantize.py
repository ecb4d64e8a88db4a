"""The `quantize` stage: smaller, cheaper variants of the final model, each measured against the
full-precision model on the same test rows and gated on its ROUGE-L loss.

Inputs: the final model (`artifacts/align/model`: aligned, or the fine-tuned one passed through),
`artifacts/split/test.jsonl`, and `artifacts/evaluate/decoding.json` (the repetition controls evaluate
used; `tasks.core.decoding`). Outputs: one folder per method under `artifacts/quantize/<method>/` in the
variant format (`tasks.core.variants`: loadable with `load_quantized` in any process, marked by
`sftflow_quantization.json`), `artifacts/quantize/predictions.jsonl`, `metrics/quantize.json` (flat keys
`<variant>.size_ratio`, `.latency_ratio`, `.rouge-l`, `.rouge-l_drop`, `.passed`, `.latency_ratio_low`/`_high`,
`.served`, `.reason`; ratios are variant ÷ full, below 1 is better) and `plots/quantize/comparison.png`.

Methods (the format itself: `tasks.core.variants`):

- `int8` (CPU): PyTorch's dynamically quantized int8 linears (a real int8 GEMM) with int8 embeddings.
  Chosen over torchao and optimum-quanto because on this CPU in eager mode both dequantize on every
  matmul and ran slower than fp32, while this ran faster at a quarter of the size; the measurements
  and the reasoning (deprecations, why the files hold plain int8 + scales) are in
  `bench/results/quantize-choice.md`, produced by `python -m bench quantize`.
- `bnb-int8`, `bnb-nf4` (CUDA): bitsandbytes LLM.int8() and 4-bit NF4 through transformers'
  `BitsAndBytesConfig`, saved with `save_pretrained` (safetensors), `device_map="auto"`.
- `bf16`: the model in bfloat16, scored in bf16 on the device class this stage runs on (the GPU when
  there is one, else the CPU) and recorded so (`<variant>.on_cuda`, `variants` in the metrics, the
  marker's `dtype`/`device`): what `serve.variant_gpu: bf16` serves, and only where it was scored.
- `gguf-f16`, `gguf-q8_0`, `gguf-q4_k_m` (CPU): the model converted by llama.cpp's `convert_hf_to_gguf.py`
  (once, to f16) and quantized by llama.cpp's quantizer, generated through llama-cpp-python with the same
  prompt token ids, greedy, the same stop tokens and repetition controls (`tasks.core.gguf`); scored and
  speed-checked beside int8 against the same full model. A model llama.cpp cannot convert (the scratch
  base's character tokenizer, an architecture its converter lacks) or a machine without llama-cpp-python
  or its converter skips them: `<variant>.skipped` and `.reason` say why, nothing is written and the stage
  goes on. A GGUF variant also passes the conversion check (`<variant>.conversion_check`: the file's own
  chat template and tokenizer give the prompts that were scored) or is not served; `register` registers
  only GGUF variants that passed.

Every variant is scored by the same generator, on the same batches, as the pyfunc model and the app
generate (rows batched by prompt token length, as `tasks.core.generation.generate` batches them), so the
figure registered for a variant is what its registered model produces on those rows.

Both wall time (`latency_ratio`) and CPU time (`cpu_time_ratio`) are written: on a busy machine
either alone misleads.

A variant is served only when it pays. After the quality pass, a speed check generates the first
`quantize.latency_rows` rows (default 16) `quantize.latency_repeats` times (default 3) with the full
model and every variant of the device, on the same batches, interleaved batch by batch and with the
model order rotated each repeat; each repeat gives a ratio variant ÷ full, and the range is the
lowest to the highest of them (no bootstrap: the highest is the upper end). A CPU variant is served
(`<variant>.served`) only when that highest ratio is below 1.0 and its ROUGE-L passed the gate;
otherwise `<variant>.reason` says why (`slower than full precision: ratio a–b`), `register` tags the
main version with the decision and the app serves full precision (`tasks.core.registry.resolve_variant`).
On a GPU the ratio range is recorded but not gated: a bitsandbytes or bf16 variant is asked for its memory.
The check costs 2 × repeats generations of 16 rows per variant, well under the quality pass over the
whole test split.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.core.data import read_split
from tasks.core.decoding import apply_decoding, decoding_file
from tasks.core.errors import StageError
from tasks.core.gguf import GGUF_METHODS, GgufUnavailable
from tasks.core.generation import GenerationSettings, encode_prompts, generate
from tasks.core.io import dir_sha256, write_json, write_jsonl
from tasks.core.modeling import load_for_inference, load_model_and_tokenizer, load_tokenizer
from tasks.core.plots import save_figure
from tasks.core.scoring import score
from tasks.core.stage_params import StageParams, stage_entry
from tasks.core.variants import (
    GPU_METHODS,
    METHOD_DTYPES,
    apply_int8,
    int8_state,
    load_quantized,
    require_cuda,
    save_bf16,
    save_int8,
    variant_device,
    weights_bytes,
    write_marker,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- int8 (CPU)


def quantize_int8(model: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Quantize a float model to int8 in place (see the module docstring for the scheme).

    Returns:
        (model, tensors, layout): the int8 model and what `save_int8` writes.
    """
    tensors, layout = int8_state(model)
    return apply_int8(model, tensors, layout), tensors, layout


# ----------------------------------------------------------------------------- bitsandbytes (CUDA)


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


def quantize_bnb(
    model_dir: Path, method: str, out_dir: Path, trust_remote_code: bool = False, source_sha256: str | None = None
) -> tuple[Any, Any]:
    """Quantize a model folder with bitsandbytes while loading it on the GPU(s) and save the result.

    Returns:
        (model, tokenizer), the quantized model as loaded (on CUDA).

    Raises:
        StageError: no CUDA, or bitsandbytes is not installed.
    """
    import torch
    from transformers import AutoModelForCausalLM

    require_cuda(method)
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
    tokenizer = load_tokenizer(str(model_dir), trust_remote_code)
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
        source_sha256=source_sha256,
    )
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- measuring


def timed_generate(
    models: dict[str, tuple[Any, Any]], rows: Sequence[dict[str, Any]], settings: GenerationSettings, progress: bool = True
) -> tuple[dict[str, list[str]], dict[str, float], dict[str, float]]:
    """Generate with every model on the same batches, interleaved batch by batch so that machine load
    falls on all of them alike.

    Returns:
        (predictions, wall seconds, CPU seconds) per model name.
    """
    from tqdm.auto import tqdm

    batch_size = settings.batch_size
    # The batches generate itself makes (prompt token length, longest first), so that each model's outputs
    # are what it gives for all the rows at once (the pyfunc's predict); the order is restored below.
    _, tokenizer = next(iter(models.values()))
    lengths = [len(ids) for ids in encode_prompts(tokenizer, [r["text"] for r in rows], settings)]
    order = sorted(range(len(rows)), key=lambda i: (-lengths[i], i))
    preds: dict[str, list[str]] = {name: [""] * len(rows) for name in models}
    wall = dict.fromkeys(models, 0.0)
    cpu = dict.fromkeys(models, 0.0)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="quantize: generate", unit="batch", disable=not progress):
        texts = [rows[i]["text"] for i in batch]
        for name, (model, tokenizer) in models.items():
            t_wall, t_cpu = time.perf_counter(), time.process_time()
            out = generate(model, tokenizer, texts, settings)
            wall[name] += time.perf_counter() - t_wall
            cpu[name] += time.process_time() - t_cpu
            for i, p in zip(batch, out):
                preds[name][i] = p
    return preds, wall, cpu


def repeated_latency(
    models: dict[str, tuple[Any, Any]], rows: Sequence[dict[str, Any]], settings: GenerationSettings, repeats: int
) -> dict[str, list[float]]:
    """Wall seconds of each model on the same rows and batches (`timed_generate`), `repeats` times.

    The models take turns batch by batch within a repeat, and who goes first rotates from one repeat
    to the next, so that neither load from other jobs nor warm caches favour one model.

    Returns:
        {model name: [seconds of repeat 1, 2, ...]}.
    """
    names = list(models)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        turn = names[r % len(names):] + names[: r % len(names)]
        _, wall, _ = timed_generate({name: models[name] for name in turn}, rows, settings, progress=False)
        for name in names:
            seconds[name].append(wall[name])
    return seconds


def serve_decision(
    name: str, *, full_s: Sequence[float], variant_s: Sequence[float], device: str, passed: bool, drop: float, max_drop: float
) -> dict[str, Any]:
    """Whether the app serves a variant: its ROUGE-L passed and, on the CPU, it is faster than full
    precision in every repeat (the highest variant ÷ full ratio is below 1.0).

    Returns:
        `<name>.latency_ratios` (one per repeat), `.latency_ratio_low`, `.latency_ratio_high`, `.served`, `.reason`.
    """
    ratios = [v / f for v, f in zip(variant_s, full_s)]
    low, high = min(ratios), max(ratios)
    span = f"ratio {low:.3f}–{high:.3f} (variant ÷ full over {len(ratios)} repeats)"
    if not passed:
        served, reason = False, f"ROUGE-L drop {drop:.2f} > quantize.max_drop {max_drop:g}"
    elif device != "cpu":
        served, reason = True, f"on the GPU a variant is served for its memory, speed not gated: {span}"
    elif high < 1.0:
        served, reason = True, f"faster than full precision: {span}"
    else:
        served, reason = False, f"slower than full precision: {span}"
    return {
        f"{name}.latency_ratios": ratios,
        f"{name}.latency_ratio_low": low,
        f"{name}.latency_ratio_high": high,
        f"{name}.served": served,
        f"{name}.reason": reason,
    }


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


@stage_entry("quantize")
def run(cfg: StageParams) -> dict[str, Any]:
    """Quantize the final model with each of `quantize.methods` and measure every variant.

    Each variant is saved, reloaded from its folder (so what is measured is what serves) and run on
    the same test rows and batches as the full-precision model on the same device.

    Returns:
        The metrics written to `metrics/quantize.json`.

    Raises:
        StageError: the model or test split is missing, or a GPU method is asked for without CUDA.
    """
    import torch

    layout, methods = cfg.layout, list(cfg.quantize.methods)
    model_dir = layout.final_model
    if not (model_dir / "config.json").exists():
        raise StageError(f"{model_dir} holds no model: run `sftflow {model_dir.parent.name}` first")
    for method in methods:
        if method in GPU_METHODS:
            require_cuda(method)
    rows = read_split(layout, "test", limit=cfg.quantize.rows)
    model_sha = dir_sha256(model_dir)
    # The repetition controls evaluate used (and chose on val, with evaluate.tune_decoding) for these weights.
    settings = apply_decoding(GenerationSettings.of(cfg), decoding_file(layout), model_sha)
    threads = torch.get_num_threads()
    log.info("quantizing %s with %s; measuring on %d test rows (%d threads)", model_dir, methods, len(rows), threads)
    metrics: dict[str, Any] = {
        "rows": len(rows),
        "batch_size": settings.batch_size,
        "max_new_tokens": settings.max_new_tokens,
        "threads": threads,
        "max_drop": cfg.quantize.max_drop,
        "latency_repeats": cfg.quantize.latency_repeats,
        "latency_rows": len(rows[: cfg.quantize.latency_rows or None]),
        "model_sha256": model_sha,
        "decoding": {k: getattr(settings, k) for k in ("no_repeat_ngram_size", "repetition_penalty")},
    }
    columns: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="sftflow-gguf-") as tmp:
        gguf_source, skipped = _convert_gguf([m for m in methods if m in GGUF_METHODS], model_dir, Path(tmp))
        for method, reason in skipped.items():
            log.warning("%s skipped: %s", method, reason)
            shutil.rmtree(layout.variant_dir(method), ignore_errors=True)  # nothing stale for register to find
            metrics.update({f"{method}.skipped": True, f"{method}.served": False, f"{method}.reason": f"skipped: {reason}"})
        methods = [m for m in methods if m not in skipped]
        for device in ("cpu", "cuda"):
            on_device = [m for m in methods if variant_device(m) == device]
            if on_device:
                figures, predictions = _measure_on(device, on_device, model_dir, model_sha, rows, settings, cfg, gguf_source)
                metrics.update(figures)
                columns.update(predictions)
    metrics["skipped"] = sorted(skipped)
    metrics["passed"] = all(metrics[f"{m}.passed"] for m in methods)
    # Where and in which dtype each variant was scored: where it serves (the marker says the same).
    metrics["variants"] = {m: {"dtype": METHOD_DTYPES[m][1], "device": variant_device(m)} for m in methods}
    write_jsonl(
        layout.stage_dir("quantize") / "predictions.jsonl",
        [{"id": r["id"], "reference": r["summary"], **{k: v[i] for k, v in columns.items()}} for i, r in enumerate(rows)],
    )
    write_json(layout.metrics_file("quantize"), metrics)
    if methods:  # every method skipped (GGUF alone on a model llama.cpp cannot convert): nothing to plot
        plot_comparison(metrics, methods, layout.plots_dir("quantize") / "comparison.png")
    return metrics


def _convert_gguf(methods: list[str], model_dir: Path, tmp: Path) -> tuple[Path | None, dict[str, str]]:
    """Convert the final model to one f16 GGUF file for the GGUF `methods` (each quantizes from it).

    Returns:
        (the f16 file, or None; {method: why it is skipped}): every GGUF method is skipped, with the
        reason, when the model cannot be converted or llama-cpp-python or llama.cpp's converter is missing.
    """
    from tasks.core.gguf import convert, converter_dir, llama_cpp, unsupported_reason

    if not methods:
        return None, {}
    try:
        reason = unsupported_reason(model_dir)  # the tokenizer: checked first, costs nothing
        if reason is None:
            llama_cpp()
            converter = converter_dir()
            reason = unsupported_reason(model_dir, converter)
        if reason is not None:
            return None, dict.fromkeys(methods, f"llama.cpp cannot convert {model_dir}: {reason}")
        out = tmp / "model-f16.gguf"
        started = time.perf_counter()
        convert(model_dir, out, converter)
        log.info("converted %s to GGUF f16 with llama.cpp in %.1f s", model_dir, time.perf_counter() - started)
        return out, {}
    except GgufUnavailable as e:
        return None, dict.fromkeys(methods, str(e))


def _write_variant(
    method: str, model_dir: Path, folder: Path, tokenizer: Any, trust_remote_code: bool, source_sha256: str,
    gguf_source: Path | None = None,
) -> None:
    """Quantize the model folder with `method` into `folder` (the variant format, naming its source); a
    GGUF method from `gguf_source`, the f16 file `_convert_gguf` wrote."""
    import torch

    if method in GGUF_METHODS:
        from tasks.core.gguf import write_variant

        if gguf_source is None:
            raise StageError(f"{method}: no GGUF conversion of {model_dir} to quantize from")
        write_variant(model_dir, method, folder, tokenizer, gguf_source, threads=torch.get_num_threads(),
                      source_sha256=source_sha256)
    elif method == "int8":
        source, _ = load_model_and_tokenizer(model_dir, trust_remote_code=trust_remote_code)
        _, tensors, int8_layout = quantize_int8(source)
        save_int8(tensors, int8_layout, source, tokenizer, folder, source_sha256=source_sha256)
    elif method == "bf16":
        save_bf16(model_dir, folder, tokenizer, trust_remote_code, source_sha256=source_sha256)
    else:
        quantize_bnb(model_dir, method, folder, trust_remote_code, source_sha256=source_sha256)


def _measure_on(
    device: str,
    methods: list[str],
    model_dir: Path,
    model_sha256: str,
    rows: list[dict[str, Any]],
    settings: GenerationSettings,
    cfg: StageParams,
    gguf_source: Path | None = None,
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Write, reload and measure the variants of one device against the full model on that device (a GGUF
    variant quantized from `gguf_source`, and checked to give the scored prompts from its file alone).

    Returns:
        (flat metrics of the full model and each variant, predictions by model name).
    """
    import torch

    trust, language, max_drop = cfg.model.trust_remote_code, cfg.data.language, cfg.quantize.max_drop
    full_name = "full" if device == "cpu" else "full-cuda"
    full_model, tokenizer = load_for_inference(model_dir, "float32", device, trust_remote_code=trust)
    models = {full_name: (full_model, tokenizer)}
    full_size = weights_bytes(model_dir)
    conversion: dict[str, list[str]] = {}
    for method in methods:
        folder = cfg.layout.variant_dir(method)
        _write_variant(method, model_dir, folder, tokenizer, trust, model_sha256, gguf_source)
        models[method] = load_quantized(folder)
        if method in GGUF_METHODS:
            from tasks.core.gguf import conversion_problems

            conversion[method] = conversion_problems(*models[method], [r["text"] for r in rows], settings)
        log.info("%s: %.2f MB of weights (full: %.2f MB)", method, weights_bytes(folder) / 1e6, full_size / 1e6)
    preds, wall, cpu = timed_generate(models, rows, settings)
    # The speed check, after the quality pass warmed every model: repeats on a few rows, same batches.
    repeats = repeated_latency(models, rows[: cfg.quantize.latency_rows or None], settings, cfg.quantize.latency_repeats)
    references = [r["summary"] for r in rows]
    full = {"size_bytes": full_size, "latency_s": wall[full_name], "cpu_s": cpu[full_name],
            "rouge-l": score(preds[full_name], references, language)["rouge-l"]}
    metrics = {f"{full_name}.size_mb": full_size / 1e6, f"{full_name}.latency_s": wall[full_name], f"{full_name}.rouge-l": full["rouge-l"]}
    for method in methods:
        variant = {"size_bytes": weights_bytes(cfg.layout.variant_dir(method)), "latency_s": wall[method],
                   "cpu_s": cpu[method], "rouge-l": score(preds[method], references, language)["rouge-l"]}
        agreement = sum(a == b for a, b in zip(preds[method], preds[full_name])) / len(rows)
        metrics.update(variant_metrics(method, full=full, variant=variant, agreement=agreement, max_drop=max_drop))
        metrics[f"{method}.on_cuda"] = 1.0 if device == "cuda" else 0.0
        if method in conversion:
            metrics[f"{method}.conversion_check"] = "; ".join(conversion[method]) or "passed"
            metrics[f"{method}.passed"] = metrics[f"{method}.passed"] and not conversion[method]
        metrics.update(serve_decision(
            method, full_s=repeats[full_name], variant_s=repeats[method], device=device,
            passed=metrics[f"{method}.passed"], drop=metrics[f"{method}.rouge-l_drop"], max_drop=max_drop,
        ))
        if conversion.get(method):
            metrics[f"{method}.reason"] = f"conversion check failed: {metrics[f'{method}.conversion_check']}"
        log.info("%s: %s: %s", method, "served" if metrics[f"{method}.served"] else "NOT served", metrics[f"{method}.reason"])
        log.info(
            "%s: size x%.2f, latency x%.2f, ROUGE-L %.2f vs %.2f (drop %.2f, max %.2f): %s",
            method, metrics[f"{method}.size_ratio"], metrics[f"{method}.latency_ratio"], variant["rouge-l"],
            full["rouge-l"], metrics[f"{method}.rouge-l_drop"], max_drop, "passed" if metrics[f"{method}.passed"] else "FAILED",
        )
    del models, full_model
    if device == "cuda":
        torch.cuda.empty_cache()
    return metrics, {name: preds[name] for name in [full_name, *methods]}
