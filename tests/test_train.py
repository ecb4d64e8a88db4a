import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, sample_rows, write_tiny_splits
from safetensors.torch import load_file

from tasks.cli import main as cli
from tasks.core.checkpoints import checkpoint_step, last_complete_checkpoint
from tasks.core.config import ParamsError, load_params
from tasks.core.io import read_json
from tasks.core.modeling import load_model_and_tokenizer
from tasks.core.prompt import collate_features, encode_example, summary_loss
from tasks.train import run

TEMPLATE = "为下面的论文摘要拟一个标题。\n摘要：{text}\n标题："
# Steps fast enough for tests, with a learning rate that moves a 32-wide model in a few steps.
FAST = ["train.learning_rate=0.01", "train.warmup_ratio=0", "train.torch_threads=1"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny scratch base, pretrained for a few steps by the pretrain stage, shared by this module."""
    from tasks.pretrain import run as pretrain

    root = tmp_path_factory.mktemp("base")
    write_tiny_splits(root / "artifacts")
    overrides = [
        f"paths.artifacts={root / 'artifacts'}",
        f"paths.metrics={root / 'metrics'}",
        f"paths.plots={root / 'plots'}",
        "model.hidden_size=32",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.num_kv_heads=1",
        "model.intermediate_size=64",
        "pretrain.max_steps=10",
        "pretrain.batch_size=8",
        "pretrain.block_size=64",
        "pretrain.learning_rate=0.02",
        # the train tests' losses were sized on a plain-LM base; pretrain's own tests cover the objectives
        "pretrain.objective=lm",
    ]
    pretrain(load_params(ROOT / "params.yaml", overrides))
    return root / "artifacts"


@pytest.fixture
def project(tmp_path, tiny_overrides, base_dir):
    """A project folder holding the shared base and splits; returns (overrides, artifacts dir)."""
    artifacts = tmp_path / "artifacts"
    shutil.copytree(base_dir / "split", artifacts / "split")
    shutil.copytree(base_dir / "pretrain" / "model", artifacts / "pretrain" / "model")
    return [*tiny_overrides, *FAST], artifacts


def params_of(overrides, *extra):
    return load_params(ROOT / "params.yaml", [*overrides, *extra])


def loss_csv(tmp_path):
    with (tmp_path / "plots" / "train" / "loss.csv").open() as f:
        return list(csv.DictReader(f))


def changed_and_unchanged(before_dir, after_dir):
    before = load_file(before_dir / "model.safetensors")
    after = load_file(after_dir / "model.safetensors")
    assert before.keys() == after.keys()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    return changed, sorted(set(before) - set(changed))


# --- features -----------------------------------------------------------------------------------


def test_label_mask_covers_only_summary_and_eos(tiny_model_dir):
    _, tok = load_model_and_tokenizer(tiny_model_dir)
    row = sample_rows(1)[0]
    f = encode_example(tok, row["text"], row["summary"], TEMPLATE, True, 512, 64)
    n_target = len(tok(row["summary"], add_special_tokens=False)["input_ids"]) + 1
    assert f["labels"][:-n_target] == [-100] * (len(f["input_ids"]) - n_target)
    assert f["labels"][-n_target:] == f["input_ids"][-n_target:]
    assert f["labels"][-1] == tok.eos_token_id
    assert tok.decode(f["labels"][-n_target:-1]) == row["summary"]
    assert not f["truncated_source"] and not f["truncated_target"]

    # A long text is cut to fit; the summary is kept whole.
    cut = encode_example(tok, row["text"], row["summary"], TEMPLATE, True, 60, 64)
    assert cut["truncated_source"] and not cut["truncated_target"]
    assert len(cut["input_ids"]) - n_target <= 60
    assert cut["labels"][-n_target:] == f["labels"][-n_target:]
    assert tok.decode(cut["input_ids"][: len(cut["input_ids"]) - n_target]).endswith("标题：")

    # A summary longer than max_target_length is cut too, flagged, and then has no eos to learn.
    long = encode_example(tok, row["text"], row["summary"], TEMPLATE, True, 512, 5)
    assert long["truncated_target"] and sum(x != -100 for x in long["labels"]) == 5
    assert long["labels"][-1] != tok.eos_token_id


def test_summary_loss_is_the_mean_over_summary_tokens(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    rows = sample_rows(5)
    kwargs = {"template": TEMPLATE, "use_chat_template": True, "max_source_length": 128, "max_target_length": 48}
    # by hand: sum of per-token losses over every summary token, divided by their count
    total, count = 0.0, 0
    for r in rows:
        f = encode_example(tok, r["text"], r["summary"], TEMPLATE, True, 128, 48)
        batch = collate_features([f], tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
        labels = batch["labels"][0, 1:]
        keep = labels != -100
        total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        count += int(keep.sum())
    expected = total / count
    assert summary_loss(model, tok, rows, batch_size=1, **kwargs) == pytest.approx(expected, rel=1e-5)
    assert summary_loss(model, tok, rows, batch_size=4, **kwargs) == pytest.approx(expected, rel=1e-5)


# --- training -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base_dir):
    """One full fine-tuning run (no DeepSpeed): 16 steps, checkpoints every 4; its metrics and loss rows."""
    root = tmp_path_factory.mktemp("reference")
    overrides = _overrides_for(root, base_dir)
    metrics = run(params_of(overrides))
    return metrics, loss_csv(root), root


def _overrides_for(root, base_dir):
    artifacts = root / "artifacts"
    if not (artifacts / "split").exists():
        shutil.copytree(base_dir / "split", artifacts / "split")
        shutil.copytree(base_dir / "pretrain" / "model", artifacts / "pretrain" / "model")
    return [
        f"paths.artifacts={artifacts}",
        f"paths.metrics={root / 'metrics'}",
        f"paths.plots={root / 'plots'}",
        "train.max_steps=16",
        "train.batch_size=8",
        "train.learning_rate=0.002",
        "train.save_steps=4",
        "train.eval_steps=4",
        "train.logging_steps=1",
        "train.deepspeed_config=null",
        *FAST,
    ]


def test_full_finetuning_changes_every_weight_and_beats_the_base(reference, base_dir):
    metrics, rows, root = reference
    _changed, unchanged = changed_and_unchanged(base_dir / "pretrain" / "model", root / "artifacts" / "train" / "model")
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert metrics["val_loss"] < metrics["base_val_loss"] - 0.1
    assert metrics["steps"] == 16 and metrics["steps_run"] == 16 and metrics["resumed_from_step"] == 0
    assert metrics["trainable_params"] == metrics["total_params"] > 0
    assert [int(r["step"]) for r in rows] == list(range(1, 17))
    assert all(r["val_loss"] for r in rows if int(r["step"]) % 4 == 0)
    assert (root / "plots" / "train" / "loss.png").stat().st_size > 0
    model, _ = load_model_and_tokenizer(root / "artifacts" / "train" / "model")
    assert model.config.model_type == "qwen2"


def test_seeded_runs_give_the_same_loss(tmp_path, reference, base_dir):
    metrics, rows, _ = reference
    again = run(params_of(_overrides_for(tmp_path, base_dir)))
    assert again["val_loss"] == metrics["val_loss"] and again["train_loss"] == metrics["train_loss"]
    assert loss_csv(tmp_path) == rows


def test_killed_run_resumes_from_the_last_complete_checkpoint(tmp_path, reference, base_dir):
    metrics, rows, _ = reference
    overrides = _overrides_for(tmp_path, base_dir)
    ckpts = tmp_path / "artifacts" / "train" / "checkpoints"
    cmd = [sys.executable, "-m", "tasks.cli", "train", "-p", str(ROOT / "params.yaml")]
    for o in overrides:
        cmd += ["-S", o]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while last_complete_checkpoint(ckpts) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = checkpoint_step(last_complete_checkpoint(ckpts))
    assert killed_at is not None and killed_at < 16, "the run was not killed mid-way"
    assert not (tmp_path / "metrics" / "train.json").exists()

    resumed = run(params_of(overrides))
    assert resumed["resumed_from_step"] == killed_at
    assert resumed["steps"] == 16 and resumed["steps_run"] == 16 - killed_at
    again = loss_csv(tmp_path)
    assert [int(r["step"]) for r in again] == list(range(1, 17))  # no step twice, none missing
    # the resume restores weights, optimizer, scheduler, RNG and data order: the same run as never killed
    assert again == rows and resumed["val_loss"] == metrics["val_loss"]

    # a rerun of a finished run trains nothing and rebuilds the same model
    done = run(params_of(overrides))
    assert done["steps"] == 16 and done["steps_run"] == 0 and done["val_loss"] == metrics["val_loss"]


def test_lora_changes_only_adapted_layers_and_merges(tmp_path, project, monkeypatch):
    from tasks.core import training

    overrides, artifacts = project
    marked = []  # the stage's collator marks the supervised positions of every batch through the PEFT wrapper
    mark = training.with_supervised_positions
    monkeypatch.setattr(training, "with_supervised_positions", lambda batch: marked.append(1) or mark(batch))
    metrics = run(
        params_of(
            overrides,
            "train.method=lora",
            "train.lora.target_modules=[q_proj, v_proj]",
            "train.lora.dropout=0",
            "train.learning_rate=0.02",
            "train.max_steps=6",
        )
    )
    changed, unchanged = changed_and_unchanged(artifacts / "pretrain" / "model", artifacts / "train" / "model")
    adapted = sorted(k for k in changed + unchanged if k.endswith(("q_proj.weight", "v_proj.weight")))
    assert changed == adapted, "LoRA must change exactly the targeted weights once merged"
    assert metrics["trainable_params"] < metrics["total_params"]
    assert (artifacts / "train" / "adapter" / "adapter_config.json").exists()
    # the merged folder is a plain model: no LoRA tensors left
    assert not any("lora" in k for k in load_file(artifacts / "train" / "model" / "model.safetensors"))
    assert len(marked) >= 6


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_zero2_on_cpu_ranks_finishes_with_falling_loss(tmp_path, project, ranks):
    overrides, _ = project
    cmd = [sys.executable, "-m", "tasks.cli", "train", "-p", str(ROOT / "params.yaml")]
    for o in [
        *overrides,
        "train.deepspeed_config=configs/deepspeed/zero2.json",
        f"train.num_processes={ranks}",
        "train.max_steps=8",
        "train.save_steps=100",
        "train.eval_steps=100",
    ]:
        cmd += ["-S", o]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_json(tmp_path / "metrics" / "train.json")
    assert metrics["num_processes"] == ranks and metrics["deepspeed_config"].endswith("zero2.json")
    losses = [float(r["train_loss"]) for r in loss_csv(tmp_path) if r["train_loss"]]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    assert metrics["val_loss"] < metrics["base_val_loss"]


# --- bad params ---------------------------------------------------------------------------------


def test_unknown_lora_target_fails_before_training(tmp_path, project):
    overrides, artifacts = project
    with pytest.raises(ParamsError, match=r"train\.lora\.target_modules.*c_attn.*q_proj"):
        run(params_of(overrides, "train.method=lora", "train.lora.target_modules=[c_attn]"))
    assert not list((artifacts / "train" / "checkpoints").glob("checkpoint-*"))


def test_bad_params_are_named_before_training(tmp_path, project, capsys):
    overrides, _ = project
    with pytest.raises(ParamsError, match=r"train\.deepspeed_config: .*nope\.json does not exist"):
        run(params_of(overrides, f"train.deepspeed_config={tmp_path / 'nope.json'}"))
    cores = os.cpu_count()
    with pytest.raises(ParamsError, match=rf"train\.num_processes={cores + 1} .* {cores} CPU core"):
        run(params_of(overrides, f"train.num_processes={cores + 1}"))
    # batch size 0 is refused when params load; the CLI exits 2 naming the key
    args = ["train", "-p", str(ROOT / "params.yaml")] + [a for o in overrides for a in ("-S", o)]
    assert cli([*args, "-S", "train.batch_size=0"]) == 2
    assert "train.batch_size" in capsys.readouterr().err
    assert not (tmp_path / "artifacts" / "train" / "model").exists()


def test_precision_is_decided_in_one_place_and_a_wrong_one_names_the_key(tmp_path, project, capsys, monkeypatch):
    from tasks.core import training
    from tasks.core.training import precision_arguments, resolve_precision

    overrides, _ = project
    if not torch.cuda.is_available():
        with pytest.raises(ParamsError, match=r"train\.precision=fp16 needs a CUDA GPU.*auto, bf16 .*or fp32"):
            run(params_of(overrides, "train.precision=fp16"))
        with monkeypatch.context() as m:
            m.setattr(training, "cpu_bf16_units", lambda: [])
            with pytest.raises(ParamsError, match=r"train\.precision=bf16 needs .*bf16 matrix units.*names none"):
                run(params_of(overrides, "train.precision=bf16"))
        assert not list((tmp_path / "artifacts" / "train").glob("checkpoints/checkpoint-*"))
    args = ["train", "-p", str(ROOT / "params.yaml")] + [a for o in overrides for a in ("-S", o)]
    assert cli([*args, "-S", "train.precision=fp8"]) == 2
    err = capsys.readouterr().err
    assert "train.precision" in err and "'fp16'" in err
    # auto on the CPU: bf16 autocast where the CPU has bf16 units, fp32 where it has none
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for units, picked in ((["avx512_bf16"], "bf16"), (["amx_bf16"], "bf16"), ([], "fp32")):
        monkeypatch.setattr(training, "cpu_bf16_units", lambda u=units: u)
        assert resolve_precision("auto") == picked and resolve_precision("fp32") == "fp32"
        # DeepSpeed's bf16 casts the model itself: a DeepSpeed run on the CPU stays fp32
        assert resolve_precision("auto", deepspeed=True) == "fp32"
    with pytest.raises(ParamsError, match=r"train\.precision=bf16 with DeepSpeed on the CPU .*auto or fp32"):
        resolve_precision("bf16", deepspeed=True)
    # on a GPU: bf16 where it has it, fp16 (loss scaling) on one that has not
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    for has_bf16, picked in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, b=has_bf16: b)
        assert resolve_precision("auto") == picked
    with pytest.raises(ParamsError, match=r"train\.precision=bf16 but Tesla V100 has no bf16"):
        resolve_precision("bf16")
    assert precision_arguments("fp16") == {"bf16": False, "fp16": True}
    assert precision_arguments("fp32") == {"bf16": False, "fp16": False}


def test_cpu_bf16_units_read_the_cpu_flags(tmp_path, monkeypatch):
    from tasks.core import training

    real_read = Path.read_text
    for text, units in (
        ("processor: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n", ["amx_bf16", "avx512_bf16"]),
        ("processor: 0\nflags\t\t: fpu avx2 avx512f avx512bw\n", []),
        ("processor: 0\nFeatures\t: fp asimd bf16 i8mm\n", ["bf16"]),
    ):
        monkeypatch.setattr(Path, "read_text", lambda self, *a, t=text, **k: t if str(self) == "/proc/cpuinfo" else real_read(self, *a, **k))
        assert training.cpu_bf16_units() == units


def test_one_rank_trains_without_deepspeed_unless_it_offloads(tmp_path):
    from tasks.core.launch import deepspeed_plan

    zero2 = ROOT / "configs" / "deepspeed" / "zero2.json"
    assert deepspeed_plan(None, 1) == (False, "train.deepspeed_config is null")
    used, why = deepspeed_plan(zero2, 1)
    assert not used and "nothing to split" in why
    used, why = deepspeed_plan(zero2, 2)
    assert used and "2 ranks" in why
    offload = json.loads(zero2.read_text(encoding="utf-8"))
    offload["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    (tmp_path / "offload.json").write_text(json.dumps(offload), encoding="utf-8")
    used, why = deepspeed_plan(tmp_path / "offload.json", 1)
    assert used and "offload_optimizer" in why


def test_the_kept_checkpoint_is_the_best_by_val_rouge_not_the_lowest_loss(tmp_path, base_dir, monkeypatch):
    """Scripted val ROUGE-L (best at step 8) while the loss keeps falling: step 8's weights are the model."""
    from tasks.core import val_rouge

    scripted = iter([10.0, 30.0, 20.0, 5.0])  # evaluations at steps 4, 8, 12, 16
    current = {}

    def score_row(prediction, reference, language):
        return {"rouge-l": current["value"]}

    real_on_evaluate = val_rouge.ValRougeCallback.on_evaluate

    def on_evaluate(self, *args, **kwargs):
        current["value"] = next(scripted)
        return real_on_evaluate(self, *args, **kwargs)

    monkeypatch.setattr(val_rouge, "score_row", score_row)
    monkeypatch.setattr(val_rouge.ValRougeCallback, "on_evaluate", on_evaluate)
    metrics = run(params_of(_overrides_for(tmp_path, base_dir), "train.eval_generate_rows=4", "train.select_by=rouge-l"))
    rows = loss_csv(tmp_path)
    val_losses = {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]}
    assert min(val_losses, key=val_losses.get) == 16  # the lowest loss is the last step...
    assert {int(r["step"]): float(r["val_rouge_l"]) for r in rows if r["val_rouge_l"]} == {4: 10.0, 8: 30.0, 12: 20.0, 16: 5.0}
    assert metrics["selected_by"] == "rouge-l" and metrics["selected_step"] == 8 and metrics["val_rouge_l"] == 30.0
    assert metrics["best_val_rouge_l"] == 30.0 and metrics["val_generation_seconds"] >= 0
    ckpt = tmp_path / "artifacts" / "train" / "checkpoints" / "checkpoint-8"
    kept, final = load_file(ckpt / "model.safetensors"), load_file(tmp_path / "artifacts" / "train" / "model" / "model.safetensors")
    assert all(torch.equal(kept[k], final[k]) for k in kept)  # ...but step 8's weights were kept


def test_selecting_by_loss_keeps_the_lowest_val_loss_checkpoint(tmp_path, base_dir):
    metrics = run(params_of(_overrides_for(tmp_path, base_dir), "train.select_by=loss", "train.eval_generate_rows=0"))
    val_losses = {int(r["step"]): float(r["val_loss"]) for r in loss_csv(tmp_path) if r["val_loss"]}
    assert metrics["selected_step"] == min(val_losses, key=val_losses.get)
    assert "val_rouge_l" not in loss_csv(tmp_path)[0] and metrics["val_rouge_l"] is None


def test_impossible_selection_settings_fail_with_the_key():
    with pytest.raises(ParamsError, match="select_by=rouge-l needs train.eval_generate_rows > 0"):
        load_params(ROOT / "params.yaml", ["train.select_by=rouge-l", "train.eval_generate_rows=0"])
    with pytest.raises(ParamsError, match=r"save_steps \(30\) must be a multiple of train.eval_steps \(20\)"):
        load_params(ROOT / "params.yaml", ["train.save_steps=30", "train.eval_steps=20"])


def test_bf16_on_the_cpu_rounds_batch_widths_so_attention_shapes_stay_few(monkeypatch):
    """A bf16 CPU process grows with every new batch shape (oneDNN's cache, glibc's heap): the collator rounds widths to 16."""
    from types import SimpleNamespace

    from tasks.core.training import CPU_BF16_WIDTH_MULTIPLE, batch_width_multiple

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert batch_width_multiple(SimpleNamespace(bf16=True)) == CPU_BF16_WIDTH_MULTIPLE == 16
    assert batch_width_multiple(SimpleNamespace(bf16=False)) == 1
    features = [{"input_ids": [5] * n, "attention_mask": [1] * n, "labels": [5] * n} for n in (3, 17)]
    batch = collate_features(features, 0, 16)
    assert batch["input_ids"].shape == (2, 32)
    assert batch["attention_mask"].sum().item() == 20 and (batch["labels"] == -100).sum().item() == 64 - 20
    assert collate_features(features, 0)["input_ids"].shape == (2, 17)


def test_a_model_with_its_own_forward_gets_the_full_logits(tiny_model_dir):
    """Only transformers' own causal LMs take a position mask and `shift_labels`; any other forward gets plain batches."""
    from tasks.core.modeling import load_model_and_tokenizer
    from tasks.core.training import supervised_logits, training_collator, with_supervised_positions

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    assert supervised_logits(model)

    class OwnForward(torch.nn.Module):  # remote code, say: its forward knows nothing of logits_to_keep
        loss_type = "ForCausalLM"

        def forward(self, input_ids, attention_mask=None, labels=None):
            raise NotImplementedError

    assert not supervised_logits(OwnForward())
    features = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 4, "labels": [-100, -100, 7, 8]},
                {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [-100, 6]}]
    plain = training_collator(OwnForward(), 0)(features)
    assert set(plain) == {"input_ids", "attention_mask", "labels"}
    exact = with_supervised_positions(plain, multiple=1)
    # position t is kept when the label at t + 1 is one: row 0 predicts 7 and 8 from positions 1 and 2, row 1 predicts 6
    assert exact["logits_to_keep"].tolist() == [[False, True, True, False], [True, False, False, False]]
    assert exact["shift_labels"].tolist() == [7, 8, 6]
    # The count is rounded up (to 4 here; 64 as shipped, capped at the batch) with positions whose label the loss ignores.
    rounded = with_supervised_positions(plain, multiple=4)
    assert rounded["logits_to_keep"].tolist() == [[True, True, True, False], [True, False, False, False]]
    assert rounded["shift_labels"].tolist() == [-100, 7, 8, 6]
    marked = training_collator(model, 0)(features)
    assert marked["logits_to_keep"].all() and marked["shift_labels"].tolist() == [-100, 7, 8, -100, 6, -100, -100, -100]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_released_heap_pages_leave_the_process(monkeypatch):
    """Blocks freed between live ones stay in glibc's heap until trimmed; `release_freed_memory` returns them."""
    from types import SimpleNamespace

    from tasks.core import training

    blocks = [bytearray(100 * 1024) for _ in range(2000)]  # ~200 MiB of heap blocks (under mmap's threshold)
    for i in range(len(blocks)):
        blocks[i][::4096] = b"x" * len(blocks[i][::4096])  # touched: resident
    kept = blocks[::20]  # one block in 20 stays alive, so the freed ones are holes, not the heap's top
    del blocks
    before = _rss_mib()
    assert training.release_freed_memory() is True
    assert _rss_mib() < before - 100, (before, _rss_mib())
    del kept

    calls = []
    monkeypatch.setattr(training, "release_freed_memory", lambda: calls.append(1) or True)
    assert training.memory_release_callbacks(torch.device("cuda")) == []
    (callback,) = training.memory_release_callbacks(torch.device("cpu"))
    for step in range(1, 25):
        callback.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert len(calls) == 24 // training.RELEASE_EVERY_STEPS
