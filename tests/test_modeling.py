import pytest

from tasks.errors import StageError
from tasks.modeling import load_model_and_tokenizer


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

    from tasks.io import atomic_write_text

    target = tmp_path / "sub" / "x.txt"
    atomic_write_text(target, "数据")
    assert target.read_text(encoding="utf-8") == "数据"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["x.txt"]
