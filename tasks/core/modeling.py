"""Build, load and save causal LMs: the scratch base (tokenizer + small decoder) and any HF model.

A scratch model is saved as an ordinary Hugging Face directory (safetensors + tokenizer), so every
later stage loads it exactly like a hub model, through `load_model_and_tokenizer`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tasks.core.config import ModelConfig
from tasks.core.errors import StageError
from tasks.core.io import set_seed

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]


def train_tokenizer(texts: Iterable[str], kind: str = "char", vocab_size: int = 6000) -> Any:
    """Train a tokenizer on the corpus with the `tokenizers` library.

    Args:
        texts: training texts (sources and summaries).
        kind: `char` (one token per character: Chinese needs no merges to be compact) or `bpe`
            (byte-level BPE, for English or mixed corpora).
        vocab_size: upper bound on the vocabulary, special tokens included.

    Returns:
        A `PreTrainedTokenizerFast` with pad/unk/bos/eos set and left padding (for generation).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if kind == "char":
        # Every character is a token: WordLevel over single characters, fused back without spaces.
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        raise StageError(f"model.tokenizer must be char or bpe, got {kind!r}")
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    log.info("trained a %s tokenizer: %d tokens from %d texts", kind, len(fast), len(texts))
    return fast


def build_scratch_model(cfg: ModelConfig, tokenizer: Any) -> Any:
    """A randomly initialised decoder (Qwen2 or Llama architecture) sized by `model:` params."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[cfg.architecture]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
    log.info("built a scratch %s decoder: %.2fM parameters", cfg.architecture, n / 1e6)
    return model


def scratch_base(cfg: ModelConfig, train_rows: list[dict[str, Any]], prompt_template: str, seed: int) -> tuple[Any, Any]:
    """The scratch base: a tokenizer trained on the train split and a seeded random decoder of `cfg`'s shape.

    `pretrain` builds it to pretrain, `select` to score it as a candidate: both call this, so a
    candidate `scratch` is exactly what pretrain would start from.

    Args:
        cfg: params `model:` (tokenizer kind, vocabulary and decoder sizes).
        train_rows: the train split (texts and summaries form the tokenizer's corpus).
        prompt_template: params `data.prompt_template`; its characters (the instruction, "标题：") join
            the vocabulary, so the prompt is never `<unk>`.
        seed: seeds the initialisation.

    Returns:
        (model, tokenizer).
    """
    set_seed(seed)
    corpus = [r["text"] for r in train_rows] + [r["summary"] for r in train_rows]
    tokenizer = train_tokenizer(corpus + [prompt_template], cfg.tokenizer, cfg.vocab_size)
    return build_scratch_model(cfg, tokenizer), tokenizer


def is_local_model_dir(name_or_path: str | Path) -> bool:
    """True for a folder that holds a Hugging Face config."""
    p = Path(name_or_path)
    return p.is_dir() and (p / "config.json").exists()


def load_model_and_tokenizer(
    name_or_path: str | Path,
    trust_remote_code: bool = False,
    dtype: Any = None,
    device_map: Any = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local directory or a hub id.

    The tokenizer gets a pad token (eos when it has none) and left padding, for batched generation.

    Raises:
        StageError: the directory does not exist / has no config, or the hub id cannot be fetched
            (no network and no HF cache), or the architecture is not a causal LM transformers knows.
    """
    name = str(name_or_path)
    path = Path(name)
    looks_local = path.is_absolute() or name.startswith((".", "/")) or path.exists()
    if looks_local and not is_local_model_dir(path):
        raise StageError(
            f"model directory {path} does not exist or has no config.json; "
            "point model.base at a Hugging Face model folder (or use `scratch`)"
        )
    try:
        tokenizer = load_tokenizer(name, trust_remote_code)
        model = load_model(name, trust_remote_code, dtype, device_map)
    except (OSError, ValueError, KeyError) as e:
        hint = (
            "it is not a local folder, so it is a hub id: that needs network access or a filled HF cache"
            if not looks_local
            else "check that the folder holds a causal LM saved with save_pretrained"
        )
        raise StageError(f"cannot load model {name!r}: {e}. {hint}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model(name: str | Path, trust_remote_code: bool = False, dtype: Any = None, device_map: Any = None) -> Any:
    """The causal LM alone (float32 unless `dtype`), for a caller that has its tokenizer already: a large
    vocabulary's tokenizer takes seconds to load."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(name), trust_remote_code=trust_remote_code, dtype=dtype if dtype is not None else torch.float32,
        device_map=device_map,
    )


def load_tokenizer(name: str, trust_remote_code: bool) -> Any:
    """AutoTokenizer, except for a plain `tokenizers` tokenizer (ours): load that as it was saved.

    transformers 5 picks the tokenizer class from the model's `model_type` (qwen2 -> Qwen2Tokenizer)
    even when tokenizer_config.json names the generic backend, which rebuilds a byte-level BPE
    pipeline around our character vocabulary and silently mangles every Chinese text.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = Path(name) / "tokenizer_config.json"
    if config_file.exists() and (Path(name) / "tokenizer.json").exists():
        declared = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
        if declared in {"TokenizersBackend", "PreTrainedTokenizerFast"}:
            return PreTrainedTokenizerFast.from_pretrained(name)
    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)


def place_on_device(model: Any) -> Any:
    """The model on the GPU when there is one (generation is what costs)."""
    import torch

    return model.to("cuda") if torch.cuda.is_available() and model.device.type == "cpu" else model


# ----------------------------------------------------------------------------- placement for inference

# What generation needs beyond the weights (activations, KV cache of a batch), as a share of them.
INFERENCE_HEADROOM = 1.2
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def weights_numel(model_dir: str | Path) -> int | None:
    """Parameters stored in a model folder's safetensors files (read from their headers), None without any."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def _available_ram() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def inference_placement(model_dir: str | Path, dtype: str = "float32", device: str | None = None) -> dict[str, Any]:
    """Where a model folder is loaded to generate: `from_pretrained` keywords (`device_map`), decided before
    any weight is read.

    On a GPU: the one GPU with the most free memory when the weights (in `dtype`, plus
    `INFERENCE_HEADROOM`) fit it, `device_map="auto"` (accelerate spreads the layers over the GPUs, then
    the CPU) when they fit the GPUs together; on the CPU: the CPU.

    Raises:
        StageError: the model does not fit the device's free memory, with the figures, instead of
            running out of memory half-way through loading.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    numel = weights_numel(model_dir)
    if numel is None:
        return {}
    need = int(numel * _DTYPE_BYTES.get(dtype, 4) * INFERENCE_HEADROOM)
    if device == "cuda":
        free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
        best = max(range(len(free)), key=lambda i: free[i])
        if need <= free[best]:
            return {"device_map": {"": best}}
        if need <= sum(free):
            log.info("%s needs %s in %s: more than one GPU has free, spread with device_map=auto", model_dir, _size(need), dtype)
            return {"device_map": "auto"}
        where = ", ".join(f"cuda:{i} {_size(f)}" for i, f in enumerate(free))
        raise StageError(
            f"{model_dir} does not fit: {_count(numel)} parameters in {dtype} need {_size(need)} with "
            f"generation headroom, the GPUs have {_size(sum(free))} free ({where}). Quantize it "
            "(quantize.methods bnb-nf4), free the GPUs or use more of them"
        )
    ram = _available_ram()
    if ram is not None and need > ram:
        raise StageError(
            f"{model_dir} does not fit: {_count(numel)} parameters in {dtype} need {_size(need)} with "
            f"generation headroom, this machine has {_size(ram)} of memory available. Run it on a GPU "
            "machine or quantize it (quantize.methods int8)"
        )
    return {}


def load_for_inference(
    name_or_path: str | Path, dtype: str = "float32", device: str | None = None, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """A model and tokenizer to generate with, in `dtype` on `device` (default: the GPU when there is one),
    placed by `inference_placement` (checked to fit before loading), in eval mode."""
    import torch

    placement = inference_placement(name_or_path, dtype, device) if Path(str(name_or_path)).is_dir() else {}
    model, tokenizer = load_model_and_tokenizer(
        name_or_path, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype), device_map=placement.get("device_map")
    )
    if not placement and (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


def save_model(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Save as safetensors + tokenizer, the layout every stage and the registry read."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts (of the whole model, also when ZeRO-3 holds only a partition here)."""
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total


# ----------------------------------------------------------------------------- ZeRO-3 partitioned models
#
# A model loaded while a ZeRO-3 DeepSpeed config is active (`TrainingArguments(deepspeed=...)` alive,
# transformers' `HfDeepSpeedConfig`) is built inside `deepspeed.zero.Init`: from_pretrained and
# from_config alike, each rank holds only its slice of every parameter (`p.ds_tensor`) and `p.data` is
# empty until gathered. What reads whole weights outside the DeepSpeed engine gathers them here, one
# module at a time, so no rank ever holds a second full copy (rank 0 builds the one copy it writes).


def _numel(p: Any) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def is_partitioned(model: Any) -> bool:
    """True for a model whose parameters ZeRO-3 partitioned over the ranks."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def partition_share(model: Any) -> dict[str, int]:
    """Parameters this rank holds (`local_params`: its ZeRO-3 partitions, padding included) and the model's (`total_params`)."""
    params = list(model.parameters())
    local = sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return {"local_params": local, "total_params": sum(_numel(p) for p in params)}


def gathered(params: Iterable[Any]) -> Any:
    """Context in which these ZeRO-3 parameters are whole on every rank (read-only); a no-op for ordinary ones.
    Under ZeRO-3 every rank must enter it, in the same order."""
    import contextlib

    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class gathered_forward:  # noqa: N801 - a context manager, named for what happens inside it
    """Forward passes of a ZeRO-3 partitioned model outside a DeepSpeed engine (before training): each
    module's own parameters are gathered just before it runs and partitioned again right after, so a rank
    holds one layer whole at a time. A no-op for an ordinary model; every rank runs the same passes."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.handles: list[Any] = []
        self.open: dict[int, list[Any]] = {}

    def __enter__(self) -> Any:
        if not is_partitioned(self.model):
            return self.model
        for module in self.model.modules():
            if any(hasattr(p, "ds_id") for p in module.parameters(recurse=False)):
                self.handles.append(module.register_forward_pre_hook(self._pre))
                self.handles.append(module.register_forward_hook(self._post))
        return self.model

    def _pre(self, module: Any, args: Any) -> None:
        ctx = gathered(module.parameters(recurse=False))
        ctx.__enter__()
        self.open.setdefault(id(module), []).append(ctx)

    def _post(self, module: Any, args: Any, output: Any) -> None:
        stack = self.open.get(id(module))
        if stack:
            stack.pop().__exit__(None, None, None)

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        for stack in self.open.values():
            while stack:
                stack.pop().__exit__(None, None, None)
        self.handles, self.open = [], {}


def gathered_state_dict(model: Any, *, merge_lora: bool = True, trainable_only: bool = False) -> dict[str, Any]:
    """The model's weights as one CPU state dict on rank 0 (empty elsewhere), gathered module by module.

    Args:
        model: a causal LM or a PEFT LoRA model, ZeRO-3 partitioned or not. Under ZeRO-3 every rank calls this.
        merge_lora: for a LoRA model, the keys and weights of the merged plain model (`W + scale * B @ A`,
            what PEFT's `merge_and_unload` computes), so the base is never loaded again to merge.
        trainable_only: only the trainable parameters, under the model's own names (a LoRA adapter).

    Returns:
        name -> tensor (a weight shared by two modules, tied embeddings, appears once, under its first name).
    """
    import os

    rank_zero = os.environ.get("RANK", "0") == "0"
    out: dict[str, Any] = {}
    if trainable_only:
        for name, p in model.named_parameters():
            if p.requires_grad:
                with gathered([p]):
                    if rank_zero:
                        out[name] = p.detach().to("cpu", copy=True).contiguous()
        return out
    lora_types: tuple[type, ...] = ()
    if merge_lora and hasattr(model, "get_base_model"):
        from peft.tuners.lora import LoraLayer

        lora_types = (LoraLayer,)
        model = model.get_base_model()
    seen: set[int] = set()
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        prefix = f"{name}." if name else ""
        if lora_types and isinstance(module, lora_types):
            skip.append(name)
            base = module.get_base_layer()
            with gathered(module.parameters()):
                if rank_zero:
                    weight = base.weight.detach().clone()
                    for adapter in module.active_adapters:
                        if adapter in module.lora_A:
                            weight += module.get_delta_weight(adapter).to(weight.dtype)
                    out[f"{prefix}weight"] = weight.to("cpu").contiguous()
                    if getattr(base, "bias", None) is not None:
                        out[f"{prefix}bias"] = base.bias.detach().to("cpu", copy=True).contiguous()
            seen.update(id(p) for p in module.parameters())
            continue
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if own:
            with gathered([p for _, p in own]):
                if rank_zero:
                    for n, p in own:
                        out[prefix + n] = p.detach().to("cpu", copy=True).contiguous()
        if rank_zero:
            for n, b in module.named_buffers(recurse=False):
                if b is not None and n not in module._non_persistent_buffers_set:
                    out[prefix + n] = b.detach().to("cpu", copy=True).contiguous()
    return out


def save_state_dict(state_dict: dict[str, Any], model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Write a plain Hugging Face model folder from a state dict (`gathered_state_dict`) and the model's
    config: safetensors + config (dtype of the weights) + generation config + tokenizer."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    floats = [t.dtype for t in state_dict.values() if t.is_floating_point()]
    if floats:
        config.dtype = floats[0]
    save_file(state_dict, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# PEFT's shorthand for every Linear and Conv1D layer but the output head.
ALL_LINEAR = "all-linear"
# The layer types PEFT's LoRA adapts (transformers' Conv1D: GPT-2's attention and MLP).
LORA_LAYER_TYPES = ("Linear", "Conv1D", "Embedding", "Conv1d", "Conv2d", "Conv3d")


def _linear_types() -> tuple[type, ...]:
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def linear_module_names(model: Any) -> list[str]:
    """Sorted short names (`q_proj`, `c_attn`, ...) of the Linear and Conv1D layers LoRA can target."""
    linear = _linear_types()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, linear)})


def _lora_targets(target_modules: list[str] | str) -> list[str] | str:
    """`train.lora.target_modules` as PEFT takes it (`[all-linear]` written as a list is the shorthand too)."""
    if isinstance(target_modules, str):
        return target_modules
    return ALL_LINEAR if list(target_modules) == [ALL_LINEAR] else list(target_modules)


def resolve_lora_targets(model: Any, target_modules: list[str] | str, key: str = "train.lora.target_modules") -> list[str]:
    """The full names of the modules LoRA will adapt, matched exactly as PEFT matches them.

    `all-linear` is every Linear and Conv1D layer but the output head; a list names modules by name or
    name suffix (`q_proj`, `attn.c_attn`); a single string is a regular expression over full module
    names (`.*\\.(q|v)_proj`).

    Args:
        model: the causal LM (not yet wrapped).
        target_modules: params `train.lora.target_modules`.
        key: the params key named in errors.

    Returns:
        The matched module names, in model order.

    Raises:
        ParamsError: a listed target (or the expression) matches no module, or a match is not a layer
            LoRA adapts; the message lists the model's Linear and Conv1D layers.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from tasks.core.config import ParamsError

    targets = _lora_targets(target_modules)
    linear = _linear_types()
    modules = dict(model.named_modules())
    if targets == ALL_LINEAR:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        matched = [n for n, m in modules.items() if isinstance(m, linear) and m is not output]
    else:
        config = LoraConfig(target_modules=targets)
        matched = [n for n in modules if n and check_target_module_exists(config, n)]
    has = ", ".join(f"{n} ({k})" for n, k in _layer_kinds(model).items())
    problems = []
    if isinstance(targets, list):
        missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in matched)]
        if missing or not targets:
            problems.append(f"{missing or '[] (empty)'} not found in the model")
    elif not matched:
        problems.append(f"{targets!r} matches no module of the model")
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in matched if type(modules[n]).__name__ not in LORA_LAYER_TYPES]
    if wrong:
        problems.append(f"matches modules LoRA cannot adapt: {', '.join(wrong[:6])}")
    if problems:
        raise ParamsError(
            f"{key}: {'; '.join(problems)} ({getattr(model.config, 'model_type', type(model).__name__)}); its Linear "
            f"and Conv1D layers are {has or 'none'}. Name them (or a suffix such as `attn.c_attn`), give one regular "
            f"expression over full names, or use {ALL_LINEAR}"
        )
    return matched


def _layer_kinds(model: Any) -> dict[str, str]:
    """Short name -> layer type of the Linear and Conv1D layers, sorted (what an error lists)."""
    linear = _linear_types()
    kinds = {name.rsplit(".", 1)[-1]: type(m).__name__ for name, m in model.named_modules() if isinstance(m, linear)}
    return dict(sorted(kinds.items()))


def lora_config(model: Any, lora: Any, key: str = "train.lora.target_modules") -> Any:
    """The PEFT `LoraConfig` of params `train.lora` for `model` (a causal LM), its targets checked first.

    Raises:
        ParamsError: a target the model lacks (`resolve_lora_targets`).
    """
    from peft import LoraConfig

    resolve_lora_targets(model, lora.target_modules, key)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=_lora_targets(lora.target_modules),
        task_type="CAUSAL_LM",
    )


def with_lora(model: Any, lora: Any, key: str = "train.lora.target_modules") -> Any:
    """The model wrapped with a PEFT LoRA adapter of params `train.lora` (`lora_config`).

    Raises:
        ParamsError: a target the model lacks (`resolve_lora_targets`).
    """
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, lora, key))
