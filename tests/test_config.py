"""Typed params: every shipped config loads, and every mistake fails naming its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from conftest import ROOT

from tasks.core.config import Params, ParamsError, load_params, params_from_dict
from tasks.core.params_doc import DOC_FILE, REGENERATE, key_docs, markdown

CONFIG_FILES = sorted(p for p in (ROOT / "configs").rglob("*") if p.is_file())


def test_shipped_params_yaml_loads_and_lists_every_section_and_key():
    params = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert set(raw) == set(Params.model_fields), "params.yaml must have one section per Params field"
    for section, model in Params.model_fields.items():
        fields = set(model.annotation.model_fields)
        assert set(raw[section]) == fields, f"params.yaml `{section}:` keys differ from tasks/core/config.py: {set(raw[section]) ^ fields}"
    # Paths that point at shipped files exist.
    assert (ROOT / params.data.path).is_file()
    assert params.train.deepspeed_config is None or (ROOT / params.train.deepspeed_config).is_file()



def _fields(model, prefix=""):
    """(`section.key`, FieldInfo) of every field under `model`, nested sections (train.lora) walked."""
    for name, field in model.model_fields.items():
        yield prefix + name, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _fields(field.annotation, f"{prefix}{name}.")


def test_every_params_field_has_a_description():
    fields = dict(_fields(Params))
    assert "train.lora.target_modules" in fields and "train.lora" in fields and "data" in fields
    missing = sorted(key for key, field in fields.items() if not (field.description or "").strip())
    assert not missing, f"give these fields a Field(description=...) in tasks/core/config.py: {missing}"


def test_params_doc_lists_every_key_of_params_yaml():
    raw = load_params(ROOT / "params.yaml").flat()
    assert [d.key for d in key_docs()] == list(raw)


def test_docs_params_md_is_current():
    path = ROOT / DOC_FILE
    assert path.is_file(), f"{DOC_FILE} is missing: generate it with `{REGENERATE}`"
    assert path.read_text(encoding="utf-8") == markdown(), (
        f"{DOC_FILE} is not current with tasks/core/config.py and tasks/core/stages.py: regenerate it with `{REGENERATE}`"
    )


def test_config_files_are_found():
    assert {p.name for p in CONFIG_FILES} >= {"zero0.json", "zero2.json", "zero3.json"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_file_validates(path: Path):
    if path.suffix == ".json" and "deepspeed" in path.parts:
        # DeepSpeed's own pydantic model for the ZeRO section forbids unknown keys; the top-level
        # keys must be ones DeepSpeed knows. "auto" values are filled in by the HF Trainer.
        import deepspeed.runtime.constants as ds_constants
        from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION, DeepSpeedZeroConfig

        config = json.loads(path.read_text(encoding="utf-8"))
        known = {v for k, v in vars(ds_constants).items() if k.isupper() and isinstance(v, str)} | {ZERO_OPTIMIZATION}
        assert set(config) <= known, f"{path}: keys DeepSpeed does not know: {set(config) - known}"
        zero = DeepSpeedZeroConfig(**config[ZERO_OPTIMIZATION])
        assert f"zero{int(zero.stage)}" == path.stem, "the file name says the ZeRO stage"
    elif path.suffix in (".yaml", ".yml"):
        load_params(path)  # any params-like YAML under configs/ is a full, valid params file
    elif path.suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
    else:
        pytest.fail(f"{path}: no validator for this kind of config file; add one to tests/test_config.py")


# (override, words the error must contain)
BAD_OVERRIDES = [
    ("validate.no_such_key=1", ["unknown key `validate.no_such_key`", "section `validate`"]),
    ("nosuch.key=1", ["unknown key `nosuch`"]),
    ("train.lora.rr=4", ["unknown key `train.lora.rr`", "section `train`"]),
    ("split.train=abc", ["`split.train`", "valid number"]),
    ("validate.min_text_chars=-5", ["`validate.min_text_chars`", "greater than or equal to 1"]),
    ("validate.max_duplicate_share=1.5", ["`validate.max_duplicate_share`", "less than or equal to 1"]),
    ("split.train=0.5", ["split.train + split.val + split.test must sum to 1, got 0.7"]),
    ("data.language=fr", ["`data.language`", "'zh' or 'en'"]),
    ("data.prompt_template=no placeholder", ["`data.prompt_template`", "{text}"]),
    ("model.hidden_size=190", ["model.hidden_size (190) must be divisible by model.num_heads (4)"]),
]


@pytest.mark.parametrize("override,words", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_override_names_the_key(override, words):
    with pytest.raises(ParamsError) as err:
        load_params(ROOT / "params.yaml", [override])
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_min_above_max_names_both_keys():
    with pytest.raises(ParamsError, match="validate.min_text_chars must not exceed validate.max_text_chars"):
        load_params(ROOT / "params.yaml", ["validate.min_text_chars=500", "validate.max_text_chars=100"])


def test_every_problem_is_reported_at_once():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["split"]["trian"] = 0.8
    raw["validate"]["min_text_chars"] = "many"
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw, "my.yaml")
    message = str(err.value)
    assert "my.yaml" in message and "`split.trian`" in message and "`validate.min_text_chars`" in message


def test_misspelt_key_in_a_params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("split:\n  trian: 0.8\n", encoding="utf-8")
    with pytest.raises(ParamsError, match=r"unknown key `split.trian` in section `split`"):
        load_params(path)


def test_overrides_are_typed_like_yaml():
    params = load_params(ROOT / "params.yaml", ["split.train=0.7", "split.val=0.2", "data.id_column=null", "validate.unicode_form=NFKC"])
    assert params.split.train == 0.7 and params.split.val == 0.2
    assert params.data.id_column is None and params.validate.unicode_form == "NFKC"
    with pytest.raises(ParamsError, match="must look like section.key=value"):
        load_params(ROOT / "params.yaml", ["split.train"])


def test_params_digest_covers_only_what_changes_the_model_or_its_scores():
    from tasks.core.config import MODEL_SECTIONS, Params

    base = Params()
    for key, value in (("serve.port", 7999), ("promote.min_delta", 2.0), ("register.model_name", "other"), ("paths.plots", "p2")):
        section, field = key.split(".")
        changed = base.model_copy(deep=True)
        setattr(getattr(changed, section), field, value)
        assert changed.digest() == base.digest(), key
    for key, value in (("train.learning_rate", 0.01), ("evaluate.max_new_tokens", 9), ("data.language", "en")):
        section, field = key.split(".")
        changed = base.model_copy(deep=True)
        setattr(getattr(changed, section), field, value)
        assert changed.digest() != base.digest(), key
    assert "serve" not in MODEL_SECTIONS and "quantize" in MODEL_SECTIONS
