"""ZeRO-3 that shards: two CPU ranks (torchrun, gloo, one thread each) train a tiny model whose every
parameter is partitioned from the moment it loads (`deepspeed.zero.Init` through transformers'
DeepSpeed config), then gather it module by module to save it.

DeepSpeed's first use on a CPU compiles its shared-memory comm op (about a minute, cached after).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, sample_rows, write_tiny_splits
from safetensors.torch import load_file

from tasks.core.io import read_json

pytestmark = pytest.mark.system

TEXTS = [r["text"] for r in sample_rows(120)[-4:]]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir):
    """Splits and a tiny random Qwen2 base (char tokenizer, conftest's `tiny_model_dir`) as the pretrain stage leaves them."""
    import shutil

    root = tmp_path_factory.mktemp("zero3-base")
    write_tiny_splits(root / "artifacts")
    shutil.copytree(tiny_model_dir, root / "artifacts" / "pretrain" / "model")
    return root / "artifacts"


def _train(tmp_path, base, *extra):
    import shutil

    artifacts = tmp_path / "artifacts"
    shutil.copytree(base, artifacts)
    overrides = [
        f"paths.artifacts={artifacts}", f"paths.metrics={tmp_path / 'metrics'}", f"paths.plots={tmp_path / 'plots'}",
        "train.deepspeed_config=configs/deepspeed/zero3.json", "train.num_processes=2", "train.torch_threads=1",
        "train.max_steps=8", "train.batch_size=8", "train.learning_rate=0.01", "train.warmup_ratio=0",
        "train.logging_steps=1", "train.eval_steps=8", "train.save_steps=8", "train.select_by=loss",
        # validation ROUGE generates on every rank (ZeRO-3 needs all of them for each forward)
        "train.eval_generate_rows=2", "evaluate.max_new_tokens=8",
        *extra,
    ]
    cmd = [sys.executable, "-m", "tasks.cli", "train", "-p", str(ROOT / "params.yaml")]
    for o in overrides:
        cmd += ["-S", o]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-12000:]
    return read_json(tmp_path / "metrics" / "train.json"), artifacts


def _greedy(model_dir_or_model, tokenizer=None):
    from tasks.core.generation import GenerationSettings, generate
    from tasks.core.modeling import load_model_and_tokenizer

    model = model_dir_or_model
    if tokenizer is None:
        model, tokenizer = load_model_and_tokenizer(model_dir_or_model)
    settings = GenerationSettings("为下面的论文摘要拟一个标题。\n摘要：{text}\n标题：", use_chat_template=False, max_new_tokens=8, batch_size=4)
    return generate(model, tokenizer, TEXTS, settings)


def _check_sharding(metrics):
    shares = metrics["partition_share_per_rank"]
    print(f"\nZeRO-3 parameter share per rank {shares} ({metrics['partition_params_per_rank']} of "
          f"{metrics['total_params']:,}); rank 0 peak RSS {metrics['peak_rss_mb']} MiB")
    assert metrics["zero_stage"] == 3 and metrics["num_processes"] == 2
    assert len(shares) == 2 and all(0.45 <= s <= 0.55 for s in shares), shares
    assert 1.0 <= sum(shares) <= 1.02  # each parameter split in two (padded to even)


def _loss_falls(tmp_path, metrics, margin):
    import csv

    with (tmp_path / "plots" / "train" / "loss.csv").open() as f:
        losses = [float(r["train_loss"]) for r in csv.DictReader(f) if r["train_loss"]]
    print(f"train loss {losses}; val loss {metrics['val_loss']} (base {metrics['base_val_loss']})")
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - margin, losses
    assert metrics["val_loss"] < metrics["base_val_loss"]


def test_zero3_lora_shards_learns_and_merges_like_peft(tmp_path, base):
    from peft import PeftModel

    from tasks.core.modeling import load_model_and_tokenizer

    metrics, artifacts = _train(tmp_path, base, "train.method=lora", "train.lora.dropout=0", "train.learning_rate=0.1")
    _check_sharding(metrics)
    # A random base learns slowly through a rank-8 adapter (the same run without DeepSpeed falls as little).
    _loss_falls(tmp_path, metrics, margin=0.01)
    assert metrics["val_rouge_l"] is not None  # generation ran (on both ranks) at the evaluation
    # The merged folder, gathered module by module, is what PEFT's merge of base + the gathered adapter gives.
    merged = load_file(artifacts / "train" / "model" / "model.safetensors")
    base_model, tok = load_model_and_tokenizer(artifacts / "pretrain" / "model")
    peft_merged = PeftModel.from_pretrained(base_model, str(artifacts / "train" / "adapter")).merge_and_unload()
    reference = {k: v for k, v in peft_merged.state_dict().items() if k != "lm_head.weight"}
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in merged)
    changed = [k for k in merged if not torch.equal(merged[k], load_file(artifacts / "pretrain" / "model" / "model.safetensors")[k])]
    assert changed and all("proj" in k for k in changed)
    assert _greedy(artifacts / "train" / "model") == _greedy(peft_merged, tok)


def test_zero3_full_shards_learns_and_saves_the_last_checkpoint(tmp_path, base):
    from tasks.core.modeling import load_model_and_tokenizer

    metrics, artifacts = _train(tmp_path, base, "train.method=full", "train.select_by=last", "train.eval_generate_rows=0")
    _check_sharding(metrics)
    _loss_falls(tmp_path, metrics, margin=0.1)
    final = load_file(artifacts / "train" / "model" / "model.safetensors")
    # The Trainer's own gathered save of the last checkpoint (stage3_gather_16bit_weights_on_model_save).
    ckpt = artifacts / "train" / "checkpoints" / "checkpoint-8"
    saved = load_file(ckpt / "model.safetensors")
    assert {k for k in saved if k != "lm_head.weight"} == final.keys()
    assert all(torch.equal(final[k], saved[k]) for k in final)
    model, tok = load_model_and_tokenizer(ckpt)
    assert _greedy(artifacts / "train" / "model") == _greedy(model, tok)


FROM_CONFIG_SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from conftest import sample_rows
from tasks.core.config import ModelConfig, load_params
from tasks.core.launch import init_deepspeed_comm
from tasks.core.modeling import build_scratch_model, partition_share, train_tokenizer
from tasks.core.training import training_arguments
params = load_params(sys.argv[3], ["train.deepspeed_config=configs/deepspeed/zero3.json", "train.batch_size=2"])
args = training_arguments(sys.argv[1], params.train, deepspeed=str(params.train.deepspeed_config), ddp_backend="gloo")
args.device
init_deepspeed_comm()
rows = sample_rows(50)
tok = train_tokenizer([r["text"] for r in rows], kind="char", vocab_size=3000)
model = build_scratch_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64), tok)
from pathlib import Path
Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
Path(sys.argv[1], f"share-{os.environ['RANK']}.json").write_text(json.dumps({"rank": int(os.environ["RANK"]), **partition_share(model)}))
"""


def test_a_scratch_base_built_from_a_config_is_partitioned_as_it_is_built(tmp_path):
    """`build_scratch_model` (from_config) under an active ZeRO-3 config: transformers wraps it in zero.Init too."""
    import json

    script = tmp_path / "from_config.py"
    script.write_text(FROM_CONFIG_SCRIPT, encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path / "out"), str(ROOT / "tests"), str(ROOT / "params.yaml")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-6000:]
    # each rank writes its own share (their stdout lines interleave)
    shares = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("share-*.json"))]
    assert sorted(s["rank"] for s in shares) == [0, 1]
    for s in shares:
        assert 0.45 <= s["local_params"] / s["total_params"] <= 0.55, s
