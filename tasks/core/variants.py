"""The variant format: how a quantized copy of a model is written to a folder and loaded back, in any
process (the quantize stage writes it, the registry's pyfunc model and the app load it).

A variant folder holds the weights (safetensors), config, tokenizer and a marker file,
`sftflow_quantization.json`, naming the method, the scheme and the library versions:

- `int8` (CPU): every `nn.Linear` (the tied `lm_head` included) and every transformers `Conv1D` (GPT-2's
  attention and MLP: a linear layer whose weight is stored transposed, `(in, out)`) is PyTorch's dynamically quantized int8
  linear (`torch.ao.nn.quantized.dynamic.Linear`: int8 weights with one scale per output channel,
  activations quantized per batch); embeddings are stored as int8 with one scale per row and dequantized
  on load. The file holds plain int8 + float32 tensors (no pickle) and the marker lists the modules, so
  `load_quantized` rebuilds exactly the modules `quantize_int8` built (bit-identical generations). Why
  this scheme and not torchao or quanto: the quantize stage's docstring.
- `bnb-int8`, `bnb-nf4` (CUDA): bitsandbytes through transformers, saved with `save_pretrained`.
- `bf16`: the model's weights in bfloat16 (safetensors, half the size), generating in bf16 on the device
  class the quantize stage ran on (the GPU when it had one, else the CPU).
- `gguf-f16`, `gguf-q8_0`, `gguf-q4_k_m` (CPU): llama.cpp's GGUF file (`model.gguf`, converted and quantized
  by llama.cpp) with the Hugging Face config and tokenizer that build its prompts; generated through
  llama-cpp-python (`tasks.core.gguf`).

Evaluated = served: the marker names the dtype and the device class (`cpu` or `cuda`) a variant was
scored in by the quantize stage, and `load_quantized` loads it in exactly that dtype on that device class
(`variant_placement`), so the registered figure is what the pyfunc model and the app produce.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from tasks.core.errors import StageError
from tasks.core.gguf import GGUF_METHODS, LLAMA_CPP_PYTHON
from tasks.core.io import write_json
from tasks.core.modeling import load_for_inference, load_model, load_model_and_tokenizer, load_tokenizer, save_model

MARKER_FILE = "sftflow_quantization.json"
WEIGHTS_FILE = "model.safetensors"
CPU_METHODS = ("int8", *GGUF_METHODS)
GPU_METHODS = ("bnb-int8", "bnb-nf4")
# Variants that run on either device class: scored (and served) on the one quantize runs on.
ANY_DEVICE_METHODS = ("bf16",)
METHODS = CPU_METHODS + GPU_METHODS + ANY_DEVICE_METHODS
# The dtype each method's weights hold, and the dtype it computes in.
METHOD_DTYPES = {"int8": ("int8", "int8"), "bnb-int8": ("int8", "float16"), "bnb-nf4": ("nf4", "bfloat16"),
                 "bf16": ("bfloat16", "bfloat16"), "gguf-f16": ("float16", "float16"), "gguf-q8_0": ("q8_0", "q8_0"),
                 "gguf-q4_k_m": ("q4_k_m", "q4_k_m")}  # GGUF: llama.cpp's kernels multiply the blocks as stored
FORMAT_VERSION = 1


def variant_device(method: str) -> str:
    """The device class a method's variant is scored and served on: `cpu` (int8), `cuda` (bitsandbytes), or
    for bf16 the GPU when this process sees one, else the CPU."""
    import torch

    if method in CPU_METHODS:
        return "cpu"
    if method in GPU_METHODS:
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"


def save_bf16(model_dir: Path, out_dir: Path, tokenizer: Any, trust_remote_code: bool = False, source_sha256: str | None = None) -> None:
    """Write the bf16 variant of a model folder (weights cast to bfloat16) with its marker."""
    import torch

    model = load_model(model_dir, trust_remote_code=trust_remote_code, dtype=torch.bfloat16)
    save_model(model, tokenizer, Path(out_dir))
    write_marker(out_dir, "bf16", library="torch", scheme="bfloat16 weights and compute (the model cast, no calibration)",
                 source_sha256=source_sha256)


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
    stored once and the second module is listed in `aliases`. A `Conv1D` weight is transposed first, so
    it is stored like a Linear's, `(out, in)` with one scale per output channel. Every other parameter
    and persistent buffer is kept in float32 under its usual name.

    Args:
        model: a float causal LM on the CPU.

    Returns:
        (tensors, layout) where layout has `linear`, `conv1d`, `embedding` (module names) and `aliases`
        (module name -> module whose int8 weight it reuses).
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    tensors: dict[str, Any] = {}
    layout: dict[str, Any] = {"linear": [], "conv1d": [], "embedding": [], "aliases": {}}
    owner_of: dict[int, str] = {}
    handled: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            # Its own weight, transposed: never an alias of an embedding or a Linear (those are not transposed).
            layout["conv1d"].append(name)
            handled.add(f"{name}.weight")
            tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"] = _int8_rows(module.weight.t())
            continue
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

    Linears and Conv1Ds become `torch.ao.nn.quantized.dynamic.Linear` (int8 weight, per-channel scales;
    a Conv1D computes `x @ W + b`, which is a Linear of `W.T`); embeddings get their int8 weight dequantized (a lookup costs no matmul; only the disk copy is int8).

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
    conv1d = layout.get("conv1d", [])  # absent from variants written before Conv1D was quantized
    quantized = set(layout["linear"]) | set(conv1d) | set(layout["embedding"])
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
        for name in [*layout["linear"], *conv1d]:
            _replace_linear(model, name, *source(name))
    model.eval()
    return model


def _replace_linear(model: Any, name: str, q: Any, scale: Any) -> None:
    """Swap the float linear (or Conv1D) `name` for a dynamically quantized int8 linear holding `q` and
    `scale`, whose shape `(out, in)` gives the layer's."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    old = model.get_submodule(name)
    out_features, in_features = q.shape
    new = DynamicInt8Linear(in_features, out_features, bias_=old.bias is not None, dtype=torch.qint8)
    # q * scale re-quantizes to exactly q: the float error is far below half a step.
    qweight = torch.quantize_per_channel(
        q.float() * scale[:, None], scale.double(), torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8
    )
    new.set_weight_bias(qweight, None if old.bias is None else old.bias.detach().float())
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _versions(method: str) -> dict[str, str]:
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if method in GGUF_METHODS:
        versions["llama-cpp-python"] = LLAMA_CPP_PYTHON
    return versions


def save_int8(
    tensors: dict[str, Any], layout: dict[str, Any], model: Any, tokenizer: Any, out_dir: Path, source_sha256: str | None = None
) -> None:
    """Write the int8 form as safetensors + config + tokenizer + the marker file (naming the source model's hash)."""
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
        source_sha256=source_sha256,
    )


def write_marker(
    out_dir: Path,
    method: str,
    *,
    library: str,
    scheme: str,
    layout: dict[str, Any] | None = None,
    source_sha256: str | None = None,
    device: str | None = None,
    weights_file: str | None = None,
) -> None:
    """The marker that says how a folder was quantized, from which model (`source_sha256`: the content
    hash of the full-precision folder), which loader reads it (`load_quantized`), and the dtype and device
    class it was scored in and serves in (`device`, default `variant_device(method)`); `weights_file` names
    a GGUF variant's file (an int8 one's is named with its layout)."""
    weights_dtype, compute_dtype = METHOD_DTYPES[method]
    marker = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "library": library,
        "scheme": scheme,
        "dtype": weights_dtype,
        "compute_dtype": compute_dtype,
        "device": device or variant_device(method),
        "loader": "tasks.core.variants.load_quantized",
        "versions": _versions(method),
        "source_sha256": source_sha256,
    }
    if layout is not None:
        marker["weights_file"] = WEIGHTS_FILE
        marker["layout"] = layout
    if weights_file is not None:
        marker["weights_file"] = weights_file
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
    if marker.get("method") not in METHODS:
        raise StageError(f"{marker_path}: unknown quantization method {marker.get('method')!r}")
    return marker


def variant_placement(marker: dict[str, Any]) -> tuple[str, str]:
    """(compute dtype, device class) a variant was scored in, from its marker (markers written before these
    were recorded: the method's own)."""
    return marker.get("compute_dtype") or METHOD_DTYPES[marker["method"]][1], marker.get("device") or variant_device(marker["method"])


def load_quantized(path: str | Path, device_map: Any = "auto") -> tuple[Any, Any]:
    """Load a folder written by the quantize stage, in any process, in the dtype and on the device class it
    was scored in (its marker).

    Args:
        path: `artifacts/quantize/<method>` (or its copy in the MLflow registry).
        device_map: for the bitsandbytes methods (`auto` spreads a large model over the GPUs); the
            int8 method always loads on the CPU; bf16 loads where it was scored (on a GPU placed by
            `tasks.core.modeling.inference_placement`); a GGUF method loads into llama.cpp on the CPU.

    Returns:
        (model, tokenizer) ready for `tasks.core.generation.generate`, in eval mode (a GGUF variant's
        model is a `tasks.core.gguf.GgufModel`).

    Raises:
        StageError: no marker, an unknown method, weights that do not fit, a GPU method without CUDA, or
            a GGUF method without llama-cpp-python.
    """
    import torch

    path = Path(path)
    marker = read_marker(path)
    method = marker["method"]
    if method in GGUF_METHODS:
        from tasks.core.gguf import load_gguf

        return load_gguf(path)
    if method == "int8":
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model = apply_int8(model, load_file(str(path / marker["weights_file"])), marker["layout"])
        tokenizer = load_tokenizer(str(path), trust_remote_code=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        if (path / "generation_config.json").exists():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(path)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    if method == "bf16":
        _, device = variant_placement(marker)
        if device == "cuda" and not torch.cuda.is_available():
            raise StageError(f"{path}: this bf16 variant was scored on a CUDA GPU and serves only there; this machine has none")
        return load_for_inference(path, "bfloat16", device)
    require_cuda(method)
    model, tokenizer = load_model_and_tokenizer(path, dtype=torch.bfloat16, device_map=device_map)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- bitsandbytes (CUDA)


def require_cuda(method: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise StageError(
            f"quantization method {method!r} needs a CUDA GPU and bitsandbytes; on this machine keep "
            "quantize.methods=[int8] (e.g. -S 'quantize.methods=[int8]')"
        )


def weights_bytes(folder: Path) -> int:
    """Bytes of the weight files (`*.safetensors`, `*.bin`, a GGUF variant's `*.gguf`) in a model folder."""
    files = [p for p in Path(folder).iterdir() if p.suffix in {".safetensors", ".bin", ".gguf"}]
    if not files:
        raise StageError(f"{folder} holds no weight files (*.safetensors, *.gguf)")
    return sum(p.stat().st_size for p in files)
