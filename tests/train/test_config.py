"""YAML config -> ModelConfig / DataConfig / PreferenceConfig, overrides and errors."""

import dataclasses

import pytest
import yaml

from prefkit.train.config import (
    SECTIONS,
    ConfigError,
    DataConfig,
    ModelConfig,
    PreferenceConfig,
    config_fields,
    load_config,
    parse_config,
    write_config,
)


def test_keys_go_to_the_dataclass_that_owns_them():
    cfg = parse_config(
        {
            "model": "tiny",
            "lora_r": 4,
            "tiny_hidden_size": 32,
            "train_file": "pairs.jsonl",
            "eval_fraction": 0.1,
            "column_map": {"prompt": "question"},
            "loss": ["dpo", "sft"],
            "loss_weights": [1, 0.5],
            "loss_params": {"dpo": {"beta": 0.2}},
            "max_length": 128,
            "learning_rate": 1e-4,
            "max_steps": 7,
            "output_dir": "runs/x",
        }
    )
    assert (cfg.model.model, cfg.model.lora_r, cfg.model.tiny_hidden_size) == ("tiny", 4, 32)
    assert cfg.model.tiny_spec.hidden_size == 32 and cfg.model.use_lora
    assert (cfg.data.train_file, cfg.data.eval_fraction, cfg.data.column_map) == (
        "pairs.jsonl",
        0.1,
        {"prompt": "question"},
    )
    assert cfg.train.loss == ["dpo", "sft"] and cfg.train.loss_weights == [1.0, 0.5]
    assert cfg.train.resolved_loss_params["dpo"]["beta"] == 0.2
    assert (cfg.train.max_length, cfg.train.learning_rate, cfg.train.max_steps) == (128, 1e-4, 7)


def test_defaults_suit_preference_training():
    args = parse_config({}).train
    assert args.remove_unused_columns is False
    assert args.report_to in ([], "none", ["none"])
    assert args.logging_steps <= 10 and args.learning_rate == 1e-6
    assert args.loss == ["dpo"] and not args.reference_free and args.loss_kind == "pairwise"
    assert parse_config({"loss": "simpo"}).train.reference_free
    assert parse_config({"loss": ["orpo", "sft"]}).train.reference_free
    assert not parse_config({"loss": ["dpo", "sft"]}).train.reference_free


def test_every_key_has_a_default_and_help_and_one_owner():
    owners = config_fields()  # raises on a key owned twice
    for section, cls in SECTIONS:
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            assert owners[f.name][0] == section
            if cls is not PreferenceConfig or f.name in PreferenceConfig.__dataclass_fields__:
                assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
    for cls in (ModelConfig, DataConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    for name in (
        "loss",
        "loss_weights",
        "loss_params",
        "max_length",
        "max_prompt_length",
        "prompt_truncation",
        "logps_chunk_size",
        "remove_unused_columns",
        "report_to",
        "logging_steps",
    ):
        assert PreferenceConfig.__dataclass_fields__[name].metadata.get("help"), name


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("learning_rat", "learning_rate"),
        ("los", "loss"),
        ("train_fle", "train_file"),
        ("lora_alfa", "lora_alpha"),
    ],
)
def test_unknown_key_names_the_closest_valid_key(key, suggestion, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({key: 1}))
    with pytest.raises(ConfigError, match=f"unknown config key '{key}' in {path}.*Did you mean '{suggestion}'"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"Did you mean '{suggestion}'"):
        parse_config({}, [f"{key}=1"])


def test_unknown_key_without_a_close_match():
    with pytest.raises(ConfigError, match="unknown config key 'zzzzqqq'") as info:
        parse_config({"zzzzqqq": 1})
    assert "Did you mean" not in str(info.value)


def test_overrides_are_yaml_scalars_and_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: dpo\nloss_params:\n  beta: 0.1\nmax_steps: 5\nlearning_rate: 1e-5\n")
    cfg = load_config(
        path,
        [
            "max_steps=9",
            "loss_params.beta=0.25",
            "bf16=false",
            "lora_target_modules=[q_proj, v_proj]",
            "eval_fraction=0.2",
            "ref_model=null",
        ],
    )
    assert cfg.train.max_steps == 9 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.loss_params == {"beta": 0.25}
    assert cfg.train.learning_rate == 1e-5  # "1e-5" is a string to PyYAML; the float field converts it
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"] and cfg.model.ref_model is None
    assert cfg.data.eval_fraction == 0.2
    cfg = load_config(path, ["loss=ipo"])
    assert cfg.train.loss == ["ipo"]
    cfg = load_config(path, ["loss_params.dpo.beta=0.3"])
    assert cfg.train.loss_params == {"beta": 0.1, "dpo": {"beta": 0.3}}


def test_bad_values_are_clear_errors():
    with pytest.raises(ConfigError, match="max_steps: expected an integer >= -1, got 'many'"):
        parse_config({"max_steps": "many"})
    with pytest.raises(ConfigError, match="not key=value"):
        parse_config({}, ["max_steps"])
    with pytest.raises(ConfigError, match="unknown loss 'dpoo'.*Did you mean 'dpo'"):
        parse_config({"loss": "dpoo"})
    with pytest.raises(ConfigError, match="Did you mean 'beta'"):
        parse_config({"loss_params": {"betta": 0.1}})
    with pytest.raises(ConfigError, match="loss_weights: expected a list of 1 number"):
        parse_config({"loss_weights": [1, 2]})
    with pytest.raises(ConfigError, match="eval_file or eval_fraction"):
        parse_config({"eval_file": "a.jsonl", "eval_fraction": 0.1})
    with pytest.raises(ConfigError, match="different kinds"):
        parse_config({"loss": ["dpo", "kto"]})


def test_not_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="one flat YAML mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_written_config_reads_back_the_same(tmp_path):
    cfg = parse_config(
        {
            "model": "tiny",
            "lora_r": 2,
            "loss": ["dpo", "sft"],
            "loss_weights": [1.0, 0.2],
            "loss_params": {"beta": 0.3},
            "train_file": "x.jsonl",
            "max_steps": 3,
            "output_dir": str(tmp_path / "o"),
            "learning_rate": 2e-4,
            "lr_scheduler_type": "cosine",
        }
    )
    path = write_config(cfg, tmp_path / "config.yaml")
    flat = yaml.safe_load(path.read_text())
    assert flat["loss_params"] == {"beta": 0.3} and flat["lr_scheduler_type"] == "cosine"
    again = load_config(path)
    assert again.model == cfg.model and again.data == cfg.data
    assert again.train.to_dict() == cfg.train.to_dict()


def test_yaml_no_for_a_text_key_stays_the_word(tmp_path):
    # YAML 1.1 reads `no` as False; save_strategy is a text key whose valid value is "no".
    path = tmp_path / "c.yaml"
    path.write_text("loss: dpo\nsave_strategy: no\n")
    assert load_config(path).train.save_strategy == "no"
    cfg = load_config(path, ["eval_strategy=no", "bf16=no"])
    assert cfg.train.eval_strategy == "no" and cfg.train.bf16 is False
