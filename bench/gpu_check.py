"""GPU check, sized for a short borrowed GPU machine (one GPU, ~10 minutes, no package registry).

On the demo data, with a 0.5B-class Qwen2 built from a config (no download: hidden 896, 24 layers, 14
heads, 2 KV heads, intermediate 4864, its vocabulary padded to Qwen2.5's 151,936 rows around a
character tokenizer trained on the data, ~494M parameters, saved in bf16 as the base):

1. train: LoRA in bf16 (`train.precision=bf16`) under DeepSpeed ZeRO-2, then ZeRO-3 (the model built
   partitioned by `zero.Init`, the adapter and the merged model gathered module by module), with
   validation ROUGE generated at the evaluation; with two or more GPUs, ZeRO-3 over two ranks too;
2. evaluate: the fine-tuned model (float32 on the GPU) on the test rows;
3. quantize: `bf16` (scored in bf16 on the GPU, what `serve.variant_gpu: bf16` serves) and, where
   bitsandbytes imports, `bnb-int8` and `bnb-nf4`.

It prints one line per step and a summary, and writes `gpu_check.json` and `gpu_check.log` to `$OUT`
(or the work folder). No serving, no registry, no validate/split stages (their dependencies are not
needed on the GPU machine: the splits are cut here from the demo data).

    python -m bench.gpu_check              # on a GPU machine
    python -m bench.gpu_check --tiny       # the same steps with a tiny model on the CPU (checks the script)
    python -m bench.gpu_check --dry-run    # print the plan and the packages this Python lacks, run nothing

Exit code: 0 when every step passed, 1 on a failed step, 2 when a required package is missing.

On a GPU machine without a package registry (the borrowed H200: torch 2.11+cu130, transformers 5.17, peft,
accelerate; no deepspeed, pydantic, jieba, rouge-chinese, nltk, bitsandbytes), carry the rest as wheels
(`--dry-run` there lists what is missing), about 25 MiB without bitsandbytes. Here, in the repo root:

    echo /.whl/ >> .git/info/exclude
    P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
    python -m pip download $P -d .whl transformers==5.24.0 tokenizers==0.23.3 peft==0.21.2 pydantic==2.14.4 \
        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 nltk==3.10.4
    python -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 jieba==0.42.1 rouge-chinese==1.0.3
    # bitsandbytes (manylinux x86_64 wheel) only if it fits in the 64 MiB carried in all

and there (carry `.whl`):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python3 -m bench.gpu_check --out $OUT          # timeout_s 600
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "sample" / "zh_summ.jsonl"
# Imported by the train / evaluate / quantize stages (beside torch, transformers, peft, accelerate,
# safetensors, tokenizers, numpy, yaml, tqdm, matplotlib, which a GPU image usually has).
REQUIRED = ("torch", "transformers", "peft", "accelerate", "deepspeed", "hjson", "pydantic", "safetensors",
            "tokenizers", "yaml", "jieba", "rouge_chinese", "nltk", "matplotlib", "tqdm", "numpy")
OPTIONAL = ("bitsandbytes",)
QWEN2_05B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "intermediate_size": 4864, "vocab_size": 151936, "max_position_embeddings": 2048, "rope_theta": 1e6}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 64, "vocab_size": None, "max_position_embeddings": 512, "rope_theta": 1e6}


def missing(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


class Check:
    """Runs the steps, logs each line to stdout and the log file, and keeps the summary."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work or tempfile.mkdtemp(prefix="sftflow-gpu-check-"))
        self.out = Path(args.out or os.environ.get("OUT") or self.work)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = (self.out / "gpu_check.log").open("w", encoding="utf-8")
        self.summary: dict[str, Any] = {"tiny": args.tiny, "steps": {}, "failed": []}
        self.start = time.perf_counter()

    def say(self, line: str) -> None:
        stamp = f"[{time.perf_counter() - self.start:6.1f}s] "
        print(stamp + line, flush=True)
        self.log_file.write(stamp + line + "\n")
        self.log_file.flush()

    def overrides(self) -> list[str]:
        a = self.work / "artifacts"
        common = [
            f"paths.artifacts={a}", f"paths.metrics={self.work / 'metrics'}", f"paths.plots={self.work / 'plots'}",
            f"evaluate.cache_dir={self.work / 'cache'}", "evaluate.tune_decoding=false", "evaluate.score_base=false",
            f"evaluate.max_new_tokens={8 if self.args.tiny else 32}", f"evaluate.batch_size={8 if self.args.tiny else 32}",
            "evaluate.bootstrap_samples=200", "data.language=zh",
        ]
        return common

    def stage(self, name: str, extra: list[str], timeout: int) -> dict[str, Any] | None:
        """Run `sftflow <name>` in a fresh process (DeepSpeed and accelerate keep state per process)."""
        cmd = [sys.executable, "-m", "tasks.cli", name, "-p", str(ROOT / "params.yaml")]
        for o in [*self.overrides(), *extra]:
            cmd += ["-S", o]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
        log_path = self.work / f"{name}-{len(self.summary['steps'])}.log"
        t = time.perf_counter()
        with log_path.open("w", encoding="utf-8") as f:
            try:
                done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
                rc = done.returncode
            except subprocess.TimeoutExpired:
                rc = 124
        seconds = time.perf_counter() - t
        if rc != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
            self.say(f"{name} FAILED (exit {rc}, {seconds:.0f} s); last lines of {log_path}:")
            for line in tail:
                self.say("    " + line)
            shutil.copy(log_path, self.out / f"failed-{name}.log")
            return None
        metrics_file = self.work / "metrics" / f"{name}.json"
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else {}
        metrics["wall_seconds"] = round(seconds, 1)
        return metrics

    # ------------------------------------------------------------------------- steps

    def environment(self) -> None:
        import torch

        info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
        for name in ("transformers", "deepspeed", "peft", "bitsandbytes"):
            try:
                info[name] = __import__(name).__version__
            except Exception as e:  # noqa: BLE001 - report, do not fail: bitsandbytes is optional
                info[name] = f"not importable ({type(e).__name__})"
        gpus = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, bf16={torch.cuda.is_bf16_supported()}")
        info["gpus"] = gpus
        self.summary["environment"] = info
        self.say(" | ".join(f"{k} {v}" for k, v in info.items() if k != "gpus"))
        for n, g in enumerate(gpus):
            self.say(f"gpu{n}: {g}")

    def data(self) -> None:
        from tasks.core.io import write_jsonl

        rows = [json.loads(line) for line in DATA.open(encoding="utf-8")]
        rows = [{"id": r["id"], "text": r["text"], "summary": r["summary"]} for r in rows]
        n_train = 96 if self.args.tiny else 1024
        n_eval = 8 if self.args.tiny else 64
        parts = {"train": rows[:n_train], "val": rows[n_train:n_train + n_eval],
                 "test": rows[n_train + n_eval:n_train + 2 * n_eval]}
        for name, part in parts.items():
            write_jsonl(self.work / "artifacts" / "split" / f"{name}.jsonl", part)
        self.say("splits: " + ", ".join(f"{k} {len(v)} rows" for k, v in parts.items()))
        self.rows = rows[:n_train]

    def base(self) -> None:
        """A Qwen2 decoder of the 0.5B shape (or tiny) from a config, saved as the pretrained base."""
        import torch
        from transformers import AutoModelForCausalLM, Qwen2Config

        from tasks.core.modeling import save_model, train_tokenizer

        t = time.perf_counter()
        corpus = [r["text"] for r in self.rows] + [r["summary"] for r in self.rows] + ["为下面的论文摘要拟一个标题。\n摘要：标题："]
        tok = train_tokenizer(corpus, "char", 6000)
        shape = dict(TINY if self.args.tiny else QWEN2_05B)
        shape["vocab_size"] = max(shape["vocab_size"] or 0, len(tok))
        config = Qwen2Config(**shape, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        dtype = torch.float32 if self.args.tiny else torch.bfloat16
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        n = sum(p.numel() for p in model.parameters())
        save_model(model, tok, self.work / "artifacts" / "pretrain" / "model")
        del model
        self.summary["base"] = {"parameters": n, "dtype": str(dtype), "vocab_rows": shape["vocab_size"], "tokens": len(tok)}
        self.say(f"base: Qwen2 {n / 1e6:.1f}M parameters ({shape['num_hidden_layers']} layers x {shape['hidden_size']}, "
                 f"vocab {shape['vocab_size']:,} rows, {len(tok)} tokens) in {dtype}, built and saved in {time.perf_counter() - t:.0f} s")

    def train(self, zero: int, ranks: int) -> None:
        import torch

        name = f"train-zero{zero}-{ranks}rank"
        shutil.rmtree(self.work / "artifacts" / "train", ignore_errors=True)
        steps = self.args.steps
        extra = [
            "train.method=lora", f"train.deepspeed_config=configs/deepspeed/zero{zero}.json", f"train.num_processes={ranks}",
            f"train.precision={'bf16' if torch.cuda.is_available() else 'auto'}",
            f"train.max_steps={steps}", f"train.batch_size={8 if self.args.tiny else 16}", "train.learning_rate=0.002",
            "train.warmup_ratio=0", f"train.logging_steps={max(1, steps // 8)}", f"train.eval_steps={steps}",
            f"train.save_steps={steps}", "train.select_by=loss", f"train.eval_generate_rows={4 if self.args.tiny else 16}",
            "train.max_source_length=256", "train.max_target_length=48",
        ]
        if self.args.tiny:
            extra.append("train.torch_threads=1")
        m = self.stage("train", extra, timeout=self.args.step_timeout)
        if m is None:
            self.summary["failed"].append(name)
            return
        keep = ("precision", "zero_stage", "num_processes", "steps", "train_loss", "val_loss", "base_val_loss", "val_rouge_l",
                "tokens_per_second", "samples_per_second", "gpu_peak_memory_mb", "peak_rss_mb", "seconds", "wall_seconds",
                "trainable_params", "total_params", "partition_share_per_rank")
        self.summary["steps"][name] = {k: m.get(k) for k in keep}
        ok = m.get("val_loss") is not None and m["val_loss"] < m["base_val_loss"]
        if not ok:
            self.summary["failed"].append(f"{name} (val loss did not fall)")
        self.say(
            f"{name}: {m.get('precision')} ZeRO-{m.get('zero_stage')}, {m['steps']} steps, train loss {m['train_loss']}, val loss "
            f"{m['val_loss']} (base {m['base_val_loss']}), val ROUGE-L {m.get('val_rouge_l')}, {m['tokens_per_second']} tokens/s, "
            f"GPU peak {m.get('gpu_peak_memory_mb')} MiB, rank-0 RSS {m.get('peak_rss_mb')} MiB"
            f"{', share per rank ' + str(m['partition_share_per_rank']) if m.get('partition_share_per_rank') else ''}, "
            f"{m['seconds']} s training / {m['wall_seconds']} s in all{'' if ok else '  <-- FAILED'}"
        )

    def final_model(self) -> None:
        """The stages after train read the final model; a later stage (align) is not part of this check."""
        from tasks.core.config import load_params

        layout = load_params(ROOT / "params.yaml", self.overrides()).layout
        src = layout.model_dir("train")
        if layout.final_model != src:
            shutil.rmtree(layout.final_model, ignore_errors=True)
            shutil.copytree(src, layout.final_model)

    def evaluate(self) -> None:
        m = self.stage("evaluate", [], timeout=self.args.step_timeout)
        if m is None:
            self.summary["failed"].append("evaluate")
            return
        self.summary["steps"]["evaluate"] = {k: m.get(k) for k in ("rouge-1", "rouge-2", "rouge-l", "test_rows", "wall_seconds")}
        self.say(f"evaluate (float32, {'GPU' if self.on_gpu else 'CPU'}): ROUGE-L {m['rouge-l']:.2f} "
                 f"[{m['rouge-l_low']:.2f}, {m['rouge-l_high']:.2f}] on {m['test_rows']} test rows, {m['wall_seconds']} s")

    def quantize(self) -> None:
        methods = ["bf16"]
        if self.on_gpu and not missing(OPTIONAL):
            methods += ["bnb-int8", "bnb-nf4"]
        elif self.on_gpu:
            self.say("bitsandbytes is not importable: bnb-int8 / bnb-nf4 skipped")
        if not self.on_gpu:
            methods.append("int8")
        m = self.stage("quantize", [f"quantize.methods=[{', '.join(methods)}]", "quantize.max_drop=100"],
                       timeout=self.args.step_timeout)
        if m is None:
            self.summary["failed"].append("quantize")
            return
        self.summary["steps"]["quantize"] = m
        full = "full-cuda" if self.on_gpu else "full"
        for method in methods:
            self.say(
                f"quantize {method}: scored in {m['variants'][method]['dtype']} on {m['variants'][method]['device']}, ROUGE-L "
                f"{m[f'{method}.rouge-l']:.2f} vs {m[f'{full}.rouge-l']:.2f} (drop {m[f'{method}.rouge-l_drop']:.2f}), size "
                f"x{m[f'{method}.size_ratio']:.2f}, latency x{m[f'{method}.latency_ratio']:.2f}"
            )
        if self.on_gpu and m["variants"]["bf16"]["device"] != "cuda":
            self.summary["failed"].append("quantize (bf16 not scored on the GPU)")

    def run(self) -> int:
        import torch

        self.on_gpu = torch.cuda.is_available()
        self.environment()
        if not self.on_gpu and not self.args.tiny:
            self.say("no CUDA GPU visible: run with --tiny to check the script on the CPU")
            return 2
        self.data()
        self.base()
        for zero in (2, 3):
            self.train(zero, 1)
        if torch.cuda.device_count() >= 2:
            self.train(3, 2)
        self.final_model()
        self.evaluate()
        self.quantize()
        total = time.perf_counter() - self.start
        self.summary["seconds"] = round(total, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.summary, indent=2, default=str), encoding="utf-8")
        if self.summary["failed"]:
            self.say(f"gpu check FAILED in {total:.0f} s: {self.summary['failed']} (work folder {self.work})")
            return 1
        self.say(f"gpu check passed in {total:.0f} s (work folder {self.work}; summary {self.out / 'gpu_check.json'})")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (fp32): checks the script, not the GPU")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and missing packages; run nothing")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 40; --tiny 4)")
    parser.add_argument("--step-timeout", type=int, default=420, help="seconds each stage may take")
    parser.add_argument("--work", help="work folder (default: a new temporary folder)")
    parser.add_argument("--out", help="where gpu_check.json / .log go (default $OUT, else the work folder)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.tiny else 40)
    lacking = missing(REQUIRED)
    if args.dry_run:
        shape = TINY if args.tiny else QWEN2_05B
        print(f"plan: splits from {DATA.name}; Qwen2 base {shape}; train LoRA {args.steps} steps under ZeRO-2 and ZeRO-3 "
              f"(bf16 on a GPU); evaluate; quantize bf16 (+ bnb-int8, bnb-nf4 where bitsandbytes imports)")
        print(f"missing required packages: {lacking or 'none'}; optional: {missing(OPTIONAL) or 'none'}")
        return 2 if lacking else 0
    if lacking:
        print(f"missing packages {lacking}: carry them as wheels (see the module docstring of bench/gpu_check.py)", file=sys.stderr)
        return 2
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
