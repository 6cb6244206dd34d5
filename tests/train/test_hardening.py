"""What `prefkit train` guarantees when something goes wrong: resume continues the saved run, a run that
stops learning stops, a checkpoint that cannot resume exactly is refused with the file named, and the
run's summary and metrics.jsonl read as one run across resumes."""

import json
import shutil
from pathlib import Path

import pytest
import transformers
import yaml

from prefkit.cli import main

transformers.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "examples" / "data" / "pairs_tiny.jsonl"


def _config(tmp_path, **extra) -> Path:
    config = {
        "model": "tiny",
        "tiny_hidden_size": 32,
        "tiny_num_heads": 2,
        "tiny_intermediate_size": 64,
        "train_file": str(PAIRS),
        "loss": "dpo",
        "max_length": 128,
        "max_prompt_length": 48,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_steps": 2,
        "seed": 0,
        "use_cpu": True,
        "dataloader_pin_memory": False,
        "disable_tqdm": True,
    }
    config.update(extra)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- resume continues the saved run ------------------------------------------------------------
def test_resume_refuses_settings_that_differ_from_the_saved_run(tmp_path, capsys):
    cfg = _config(tmp_path, max_steps=2)
    assert main(["train", str(cfg), "loss=ipo", "learning_rate=1e-4"]) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume", "max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "2 setting(s) differ" in err and 'loss: ["ipo"] -> ["dpo"]' in err
    assert "learning_rate: 0.0001 -> 0.001" in err and err.count("\n") == 1
    assert (tmp_path / "run" / "config.yaml").read_text() == saved  # nothing rewritten
    assert not (tmp_path / "run" / "checkpoint-4").exists()


def test_resume_may_change_the_length_and_records_it(tmp_path):
    cfg = _config(tmp_path, max_steps=2)
    assert main(["train", str(cfg)]) == 0
    assert main(["train", str(cfg), "max_steps=4", "logging_steps=2", "--resume"]) == 0
    out = tmp_path / "run"
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert history[-1]["changed"] == {"max_steps": {"from": 2, "to": 4}, "logging_steps": {"from": 1, "to": 2}}
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 4
    assert "max_steps: 2 -> 4" in (out / "README.md").read_text()
    # the run's own config resumes it as it is
    assert main(["train", str(out / "config.yaml"), "--resume"]) == 0


# ---- the run's summary and metrics.jsonl across resumes -------------------------------------------
def test_summary_train_loss_averages_the_whole_run_and_a_finished_resume_adds_no_lines(tmp_path):
    straight = _config(tmp_path / "a")
    assert main(["train", str(straight)]) == 0
    rows_a = _rows(tmp_path / "a" / "run")
    summary_a = [r for r in rows_a if r["split"] == "summary"][-1]

    resumed = _config(tmp_path / "b", max_steps=2)
    assert main(["train", str(resumed)]) == 0
    assert main(["train", str(resumed), "--resume", "max_steps=4"]) == 0
    rows_b = _rows(tmp_path / "b" / "run")
    summary_b = [r for r in rows_b if r["split"] == "summary"][-1]
    assert summary_b["train_loss"] == pytest.approx(summary_a["train_loss"], rel=1e-6)
    steps = [r["step"] for r in rows_b if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]

    before = (tmp_path / "b" / "run" / "metrics.jsonl").read_text()
    assert main(["train", str(resumed), "--resume", "max_steps=4"]) == 0  # finished: nothing to train
    after = (tmp_path / "b" / "run" / "metrics.jsonl").read_text()
    assert len(after.splitlines()) == len(before.splitlines())
    assert [r["split"] for r in _rows(tmp_path / "b" / "run")].count("summary") == 1
    again = [r for r in _rows(tmp_path / "b" / "run") if r["split"] == "summary"][-1]
    assert again["train_loss"] == pytest.approx(summary_a["train_loss"], rel=1e-6)


# ---- checkpoints that cannot resume exactly ---------------------------------------------------------
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing_optimizer", "optimizer.pt: missing, so the run cannot resume exactly"),
        ("corrupt_optimizer", "optimizer.pt: not a torch checkpoint"),
        ("corrupt_state", "trainer_state.json: does not read"),
        ("truncated_weights", "model.safetensors: truncated"),
    ],
)
def test_a_damaged_checkpoint_is_refused_with_the_file_named(tmp_path, capsys, damage, message):
    cfg = _config(tmp_path, max_steps=2)
    assert main(["train", str(cfg)]) == 0
    ckpt = tmp_path / "run" / "checkpoint-2"
    if damage == "missing_optimizer":
        (ckpt / "optimizer.pt").unlink()
    elif damage == "corrupt_optimizer":
        (ckpt / "optimizer.pt").write_bytes(b"\x00" * 100)
    elif damage == "corrupt_state":
        (ckpt / "trainer_state.json").write_text('{"global_step": 2,')
    else:
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume", "max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(ckpt) in err
    assert err.count("\n") == 1 and "Traceback" not in err


# ---- a run that stops learning stops ------------------------------------------------------------------
def test_a_learning_rate_that_kills_the_gradient_stops_the_run(tmp_path, capsys):
    cfg = _config(tmp_path, max_steps=12, save_steps=100, learning_rate=1e6)
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "training stopped learning at step" in err and "bad_step_limit" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_an_infinite_gradient_stops_the_run(tmp_path, capsys):
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    for row in rows:
        row["weight"] = 1e30  # finite in float32; the weighted loss's gradient overflows
    data = tmp_path / "heavy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(tmp_path, train_file=str(data), max_steps=6, save_steps=100, bad_step_limit=2)
    code = main(["train", str(cfg)])
    err = capsys.readouterr().err
    assert code == 1 and "stopped" in err
    assert "step 2" in err or "non-finite" in err


def test_bad_step_limit_zero_trains_on(tmp_path):
    cfg = _config(tmp_path, max_steps=4, save_steps=100, learning_rate=1e6, bad_step_limit=0)
    assert main(["train", str(cfg)]) == 0
    grad = [r["grad_norm"] for r in _rows(tmp_path / "run") if r["split"] == "train"]
    assert grad[-1] == 0.0  # what the stop guards against: no update, yet exit 0


def test_damaged_checkpoint_copy_is_not_needed_for_a_fresh_run(tmp_path):
    """overwrite_output_dir removes the run's history with its checkpoints."""
    cfg = _config(tmp_path, max_steps=2)
    assert main(["train", str(cfg)]) == 0
    assert main(["train", str(cfg), "--resume", "max_steps=3"]) == 0
    assert (tmp_path / "run" / "history.jsonl").is_file()
    shutil.rmtree(tmp_path / "run" / "checkpoint-2")
    assert main(["train", str(cfg), "overwrite_output_dir=true"]) == 0
    assert not (tmp_path / "run" / "history.jsonl").exists()


# ---- the ecosystem reads what prefkit writes --------------------------------------------------------
def test_a_lora_adapter_folder_loads_with_peft_auto_class(tmp_path):
    from peft import AutoPeftModelForCausalLM

    cfg = _config(tmp_path, max_steps=1, save_steps=100, lora_r=4)
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "run"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((out / "base_model").resolve())
    model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "PeftModelForCausalLM"
