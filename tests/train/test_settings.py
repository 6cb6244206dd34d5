"""Every setting is checked when the configuration is read, before torch is imported: one line
``KEY: expected ..., got ...`` and exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefkit.cli import main
from prefkit.train.settings import (
    TRL_ALIASES,
    ConfigError,
    flat_values,
    known_keys,
    loss_catalog,
    read_config_file,
    read_settings,
)

REPO = Path(__file__).resolve().parents[2]
DPO_TINY = REPO / "examples" / "dpo_tiny.yaml"


BAD = [
    ("learning_rate=-1", "learning_rate: expected a finite number > 0, got -1"),
    ("learning_rate=.nan", "learning_rate: expected a finite number > 0, got nan"),
    ("learning_rate=fast", "learning_rate: expected a number, got 'fast'"),
    ("per_device_train_batch_size=0", "per_device_train_batch_size: expected an integer >= 1, got 0"),
    ("per_device_eval_batch_size=-2", "per_device_eval_batch_size: expected an integer >= 1, got -2"),
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps: expected an integer >= 1, got 0"),
    ("gradient_accumulation_steps=1.5", "gradient_accumulation_steps: expected an integer >= 1, got 1.5"),
    ("max_length=0", "max_length: expected an integer >= 1, got 0"),
    ("max_length=32", "max_length: expected more than max_prompt_length (64)"),
    ("save_steps=0", "save_steps: expected an integer >= 1 (steps) or a fraction of the run in (0, 1), got 0"),
    ("logging_steps=-5", "logging_steps: expected an integer >= 1"),
    ("weight_decay=-0.1", "weight_decay: expected a finite number >= 0, got -0.1"),
    ("max_steps=0", "max_steps: expected at least one training step"),
    ("num_train_epochs=0", "num_train_epochs: expected a finite number > 0, got 0"),
    ("warmup_steps=-1", "warmup_steps: expected a number >= 0, got -1"),
    ("loss_params.beta=-1", "loss_params.beta: expected a finite number > 0, got -1.0 (loss 'dpo')"),
    ("loss_params.betta=0.1", "Did you mean 'beta'"),
    ("loss=cdpo loss_params.label_smoothing=0.7", "loss_params.label_smoothing: expected a finite number in [0, 0.5)"),
    ("loss=dpoo", "loss: unknown loss 'dpoo'. Did you mean 'dpo'?"),
    ("loss_weights=[1,2]", "loss_weights: expected a list of 1 number(s), one per loss"),
    ("tiny_hidden_size=0", "tiny_hidden_size: expected an integer >= 1, got 0"),
    ("tiny_num_heads=3", "tiny_num_heads: expected a divisor of tiny_hidden_size (64), got 3"),
    ("lora_r=-1", "lora_r: expected an integer >= 0, got -1"),
    ("lora_dropout=1.5", "lora_dropout: expected a finite number in [0, 1), got 1.5"),
    ("gpm_embed_dim=3", "gpm_embed_dim: expected an even integer >= 2, got 3"),
    ("step_separator=3", "step_separator: expected a non-empty string (the text that ends every step), got 3"),
    ("dtype=float8", "dtype: expected one of float32, bfloat16, float16, auto, got 'float8'"),
    ("prompt_truncation=middle", "prompt_truncation: expected one of keep_end, keep_start"),
    ("share_prompt=maybe", "share_prompt: expected true or false, got 'maybe'"),
    ("eval_fraction=1", "eval_fraction: expected a finite number in [0, 1), got 1"),
    ("output_dir=examples/dpo_tiny.yaml", "output_dir: expected a folder, got 'examples/dpo_tiny.yaml' (a file)"),
    ("output_dir=examples/dpo_tiny.yaml/run", "output_dir: expected a folder"),
    (
        "model=examples/no_such_model",
        "model: expected an existing folder or a Hub model id, got 'examples/no_such_model'",
    ),
    ("ref_model=./nowhere", "ref_model: expected an existing folder or a Hub model id, got './nowhere'"),
    ("train_file=examples/data/pairs_tny.jsonl", "train_file: expected an existing data file"),
    ("learning_rat=1e-3", "unknown config key 'learning_rat' in override. Did you mean 'learning_rate'?"),
    ("loss_type=sigmoid", "loss_type: not a prefkit key (TRL's name)"),
    ("rpo_alpha=1.0", "loss: [dpo, sft] with loss_weights"),
    ("lr_scheduler_type=cosine_wobble", "lr_scheduler_type: expected one of linear, cosine"),
    ("optim=sgdd", "optim: expected one of adamw_torch"),
    ("eval_strategy=sometimes", "eval_strategy: expected one of no, steps, epoch, got 'sometimes'"),
    ("data_kind=weird", "data_kind: expected one of pairwise, unpaired, rated, ranked, stepwise, got 'weird'"),
    ("column_map=5", "column_map: expected a mapping prefkit field -> file column"),
    ("lora_target_modules=5", "lora_target_modules: expected all-linear or a list of module names"),
    ("model=", "model: expected tiny, a local folder or a Hub model id, got None"),
    ("train_file=", "train_file: expected the feedback file to train on"),
    ("groups=nofile.yaml", "groups: expected lab or a YAML/JSON file mapping user_id -> group, got 'nofile.yaml'"),
    ("user_prefix_tokens=2", "user_prefix_tokens: set, but user_conditioning is false"),
    ("seed=-1", "seed: expected an integer >= 0, got -1"),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_setting_is_one_line_and_exit_2(override, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["train", str(DPO_TINY), *override.split()]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("prefkit train: error: ") and out.err.count("\n") == 1, out.err
    assert message in out.err, out.err


def test_settings_are_checked_without_importing_torch():
    code = (
        "import sys; from prefkit.cli import main; "
        f"rc = main(['train', {str(DPO_TINY)!r}, 'learning_rate=-1']); "
        "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["2", "False", "False"], out.stdout + out.stderr


def test_a_key_given_twice_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: dpo\nlearning_rate: 1.0e-4\nloss: ipo\n")
    with pytest.raises(ConfigError, match=r"loss: the key is given twice \(lines 1 and 3 of .*c.yaml\)"):
        read_config_file(path)


def test_scientific_notation_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-4\nloss_params:\n  beta: 2E-1\n")
    assert read_config_file(path) == {"learning_rate": 1e-4, "loss_params": {"beta": 0.2}}
    values = flat_values({}, ["loss_params.beta=1e-1", "learning_rate=5e-4", "seed=1"])
    assert values["loss_params"] == {"beta": 0.1} and values["learning_rate"] == 5e-4 and values["seed"] == 1
    assert yaml.safe_load("x: 1e-1")["x"] == "1e-1"  # what plain YAML 1.1 does


def test_trl_names_are_accepted_where_they_mean_a_prefkit_key(monkeypatch):
    monkeypatch.chdir(REPO)
    values = read_settings(DPO_TINY, ["beta=0.2", "model_name_or_path=tiny"])
    assert values["loss_params"] == {"beta": 0.2} and values["model"] == "tiny"
    with pytest.raises(ConfigError, match="TRL's name for model, which is also set"):
        flat_values({"model": "tiny", "model_name_or_path": "tiny"})
    from prefkit.train.config import parse_config

    config = parse_config({"beta": 0.3, "dataset_name": "x.jsonl", "per_device_train_batch_size": 2})
    assert config.train.loss_params == {"beta": 0.3} and config.data.train_file == "x.jsonl"
    for trl, ours in TRL_ALIASES.items():
        assert ours.split(".")[0] in known_keys(), trl


def test_the_key_table_read_from_source_is_the_dataclasses():
    from prefkit.train.config import config_fields

    assert known_keys().keys() == config_fields().keys()


def test_the_loss_catalog_read_from_source_is_the_registry():
    from prefkit.losses import list_losses

    live = {
        s.name: (s.kind, s.hyperparameters, s.ranges, s.batch_coupled, s.needs_kl, s.token_masks) for s in list_losses()
    }
    read = {
        e.name: (e.kind, e.hyperparameters, e.ranges, e.batch_coupled, e.needs_kl, e.token_masks)
        for e in loss_catalog().values()
    }
    assert read == live


def test_save_strategy_no_is_the_word_not_false(monkeypatch):
    monkeypatch.chdir(REPO)
    values = read_settings(DPO_TINY, ["save_strategy=no", "eval_strategy=no"])
    assert values["save_strategy"] is False  # YAML 1.1; the dataclass gets "no" back (prefkit.train.config)


@pytest.mark.parametrize("override", ["report_to=foo", "attn_implementation=foo"])
def test_values_only_transformers_can_check_are_one_line_too(override, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    assert main(["train", str(DPO_TINY), override, "max_steps=1", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("prefkit train: error: building the trainer failed (ValueError)") and "Traceback" not in err
