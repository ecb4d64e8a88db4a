import pytest

from tasks.core.errors import StageError
from tasks.core.modeling import load_model_and_tokenizer


def test_char_tokenizer_round_trips_chinese(tiny_model_dir):
    _, tok = load_model_and_tokenizer(tiny_model_dir)
    text = "水运工程施工项目全过程管理"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.padding_side == "left" and tok.pad_token is not None


def test_saved_dir_loads_like_a_hub_model(tiny_model_dir):
    assert (tiny_model_dir / "model.safetensors").exists()
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    out = model.generate(**tok(["摘要"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 3


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "nope")


def test_atomic_write_gives_normal_permissions_and_leaves_no_temp(tmp_path):
    import os
    import stat

    from tasks.core.io import atomic_write_text

    target = tmp_path / "sub" / "x.txt"
    atomic_write_text(target, "数据")
    assert target.read_text(encoding="utf-8") == "数据"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["x.txt"]


def test_linear_module_names_are_what_lora_can_target(tiny_model_dir):
    from tasks.core.modeling import linear_module_names

    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    names = linear_module_names(model)
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(names)
    assert "embed_tokens" not in names


def test_loss_curve_rows_merge_train_and_validation_logs(tmp_path):
    from tasks.core.plots import write_loss_curve
    from tasks.core.training import loss_rows

    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.75}, {"step": 2, "train_runtime": 1}]
    rows = loss_rows(history)
    assert rows == [
        {"step": 1, "train_loss": 3.0, "val_loss": None},
        {"step": 2, "train_loss": 2.5, "val_loss": 2.75},
    ]
    write_loss_curve(rows, tmp_path / "loss.csv", tmp_path / "loss.png", "t")
    assert (tmp_path / "loss.csv").read_text() == "step,train_loss,val_loss\n1,3,\n2,2.5,2.75\n"
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_model_is_placed_where_it_fits_or_refused_with_the_figures_before_loading(tiny_model_dir, monkeypatch):
    import torch

    from tasks.core import modeling
    from tasks.core.errors import StageError

    numel = modeling.weights_numel(tiny_model_dir)
    model, _ = modeling.load_model_and_tokenizer(tiny_model_dir)
    assert numel == sum(p.numel() for p in model.parameters())  # tied head stored once
    need = numel * 4 * modeling.INFERENCE_HEADROOM
    monkeypatch.setattr(modeling, "_available_ram", lambda: int(need * 10))
    assert modeling.inference_placement(tiny_model_dir, "float32", "cpu") == {}
    monkeypatch.setattr(modeling, "_available_ram", lambda: int(need * 0.6))
    with pytest.raises(StageError, match=r"does not fit: 0\.\dM parameters in float32 need 0\.\d MiB with generation headroom, this machine has 0\.\d MiB of memory available"):
        modeling.inference_placement(tiny_model_dir, "float32", "cpu")
    assert modeling.inference_placement(tiny_model_dir, "bfloat16", "cpu") == {}  # half the bytes: fits
    # GPUs: the one with the most room when it fits, spread over them when only together, else refused
    free = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 80 * 2**30))
    free.update({0: int(need / 2), 1: int(need * 2)})
    assert modeling.inference_placement(tiny_model_dir, "float32", "cuda") == {"device_map": {"": 1}}
    free.update({0: int(need * 0.6), 1: int(need * 0.6)})
    assert modeling.inference_placement(tiny_model_dir, "float32", "cuda") == {"device_map": "auto"}
    free.update({0: int(need * 0.3), 1: int(need * 0.3)})
    with pytest.raises(StageError, match=r"GPUs have 0\.\d MiB free \(cuda:0 0\.\d MiB, cuda:1 0\.\d MiB\)"):
        modeling.inference_placement(tiny_model_dir, "float32", "cuda")
