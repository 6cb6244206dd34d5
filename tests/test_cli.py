"""`prefkit train` through prefkit.cli.main (the demo: tests/lab/test_demo.py)."""

import json
from pathlib import Path

import transformers
import yaml

from prefkit.cli import main

transformers.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "data" / "pairs_tiny.jsonl"


def _config(tmp_path, **extra):
    config = {
        "model": "tiny",
        "tiny_hidden_size": 32,
        "tiny_num_heads": 2,
        "tiny_intermediate_size": 64,
        "train_file": str(PAIRS),
        "eval_fraction": 0.25,
        "loss": "dpo",
        "loss_params": {"beta": 0.1},
        "max_length": 128,
        "max_prompt_length": 48,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 16,
        "learning_rate": 1e-3,
        "logging_steps": 2,
        "save_steps": 2,
        "seed": 0,
        "use_cpu": True,
        "dataloader_pin_memory": False,
        "disable_tqdm": True,
    }
    config.update(extra)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_writes_config_metrics_card_and_model(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert main(["train", str(cfg), "loss_params.beta=0.2", "max_steps=4"]) == 0
    out = tmp_path / "run"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (
        resolved["loss_params"] == {"beta": 0.2} and resolved["max_steps"] == 4 and resolved["train_file"] == str(PAIRS)
    )

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [2, 4]
    evals = [r for r in rows if r["split"] == "eval"]
    assert evals and 0.0 <= evals[-1]["eval_rewards/accuracies"] <= 1.0
    assert any(r["split"] == "summary" for r in rows)

    card = (out / "README.md").read_text()
    from prefkit.losses import get_loss

    spec = get_loss("dpo")
    assert spec.formula in card and spec.citation in card
    assert "beta=0.2" in card and "eval_rewards/accuracies" in card and "pairs_tiny.jsonl" in card
    assert "train rows: 36" in card and "eval rows: 12" in card  # 48 pairs, a quarter held out
    assert "held-out implicit-reward accuracy" in capsys.readouterr().out


def test_existing_checkpoints_need_resume(tmp_path, capsys):
    cfg = _config(tmp_path, max_steps=2, eval_fraction=0.0)
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    assert "--resume" in capsys.readouterr().err
    # `--resume` with overrides after it: the override is not taken for a checkpoint path
    assert main(["train", str(cfg), "--resume", "max_steps=4"]) == 0
    out = tmp_path / "run"
    assert (out / "checkpoint-4").is_dir()
    steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    ]
    assert steps == [2, 4]
    assert main(["train", str(cfg), "overwrite_output_dir=true", "max_steps=2"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_config_errors_exit_2_with_a_suggestion(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert main(["train", str(cfg), "learning_rat=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'learning_rat'" in err and "Did you mean 'learning_rate'" in err
    assert not (tmp_path / "run").exists()  # nothing was started
    assert main(["train", str(cfg), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", str(cfg), "train_file=" + str(tmp_path / "missing.jsonl")]) == 2
    capsys.readouterr()
    assert main(["train", str(cfg), "loss=kto"]) == 2  # pairwise data, unpaired loss
    assert "holds pairwise records" in capsys.readouterr().err


def test_kto_config_trains_on_unpaired_feedback(tmp_path):
    cfg = _config(
        tmp_path,
        loss="kto",
        train_file=str(REPO / "examples" / "data" / "feedback_tiny.jsonl"),
        max_steps=2,
        save_strategy="no",
    )
    assert main(["train", str(cfg)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in r for r in rows if r["split"] == "train")
    assert any("eval_kl" in r for r in rows if r["split"] == "eval")


def test_example_configs_parse():
    from prefkit.train.config import load_config
    from prefkit.train.online_settings import is_online_config, read_online_settings
    from prefkit.train.personalized import is_personalized_config, load_personalized_config

    readme = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("prefkit train ")]
    for path in sorted((REPO / "examples").glob("*.yaml")):
        overrides = []
        model = yaml.safe_load(path.read_text()).get("model")
        if isinstance(model, str) and model.startswith("runs/"):
            # a model another example trains: the README trains it first (its output_dir), then uses this config
            makers = [
                p
                for p in (REPO / "examples").glob("*.yaml")
                if yaml.safe_load(p.read_text()).get("output_dir") == model
            ]
            order = [next(i for i, line in enumerate(readme) if f"examples/{p.name}" in line) for p in [*makers, path]]
            assert makers and order[:-1] and max(order[:-1]) < order[-1], (
                f"{path}: nothing in the README trains {model} first"
            )
            overrides = ["model=tiny"]
        if is_online_config(path):  # online training (prefkit.online): top-level keys and an online: section
            values, online = read_online_settings(path, overrides)
            assert Path(REPO, online["prompts_file"]).is_file() and values["output_dir"].startswith("runs/"), path
            continue
        if is_personalized_config(path):  # personalized heads have their own config (prefkit.train.personalized)
            cfg = load_personalized_config(path)
            assert Path(REPO, cfg.train_file).is_file() and cfg.output_dir.startswith("runs/"), path
            continue
        cfg = load_config(path, overrides)
        assert Path(REPO, cfg.data.train_file).is_file(), path
        assert cfg.train.output_dir.startswith("runs/")


def test_top_level_help_and_data_commands_do_not_import_torch():
    """Only the command named on the command line is configured, so `prefkit --help` starts at once."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from prefkit.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'train' in out.getvalue() and 'lab' in out.getvalue()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
