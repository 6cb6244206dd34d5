"""benchmarks/personalized_end_to_end.py: the data split, the configs of both modes and the scoring (no training)."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

from prefkit.data.loaders import load_records
from prefkit.train.personalized import parse_personalized_config

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "personalized_end_to_end.py"


def _bench():
    """The script as a module (registered in sys.modules: its dataclass needs that)."""
    name = "benchmark_personalized_end_to_end"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _feedback(bench, tmp_path, *extra):
    # 8 users at 80/20: majority round(6.4) = 6 (round(1.5) = 2 unseen -> 4 seen), minority max(2, round(1.6)) = 2
    # (1 unseen -> 1 seen); 6 training + 4 held-out pairs each.
    args = bench.parse_args(["--users", "8", "--train-pairs", "6", "--test-pairs", "4", *extra])
    return args, bench.build_feedback(args, 0, tmp_path / "data")


def test_feedback_split_as_the_pluralism_study(tmp_path):
    bench = _bench()
    _, fb = _feedback(bench, tmp_path)
    assert fb.seen_users == ["majority/0", "majority/1", "majority/2", "majority/3", "minority/0"]
    assert fb.unseen_users == ["majority/4", "majority/5", "minority/1"]
    train = load_records(str(fb.train_file), kind="pairwise")
    held = load_records(str(fb.eval_file), kind="pairwise")
    # 5 seen users x 6 training pairs; 5 x 4 held-out pairs + 3 unseen users x 10 pairs = 50.
    assert len(train) == fb.train_pairs == 30 and len(held) == len(fb.eval_records) == 50
    assert [r.id for r in train if r.user_id == "minority/0"] == [f"minority/0/{i}" for i in range(6)]
    assert [r.id for r in held if r.user_id == "minority/0"] == [f"minority/0/{i}" for i in range(6, 10)]
    assert json.loads(fb.groups_file.read_text())["minority/1"] == "minority"
    assert fb.eval_group.tolist().count(1) == 4 + 10 and fb.eval_truth.shape == (50, 2)


def test_both_modes_parse_and_share_the_backbone(tmp_path):
    bench = _bench()
    args, fb = _feedback(bench, tmp_path, "--epochs", "2", "--batch-size", "8")
    for name, section in bench.METHODS.items():
        configs = {mode: bench.run_mapping(name, mode, args, fb, tmp_path / "work") for mode in bench.MODES}
        frozen, e2e = (parse_personalized_config(configs[m]) for m in bench.MODES)
        shared = ("model", "pooling", "backbone_layers", "train_file", "eval_file", "seed")
        assert all(getattr(frozen, k) == getattr(e2e, k) for k in shared)
        assert frozen.model == "lab:groups:0" and frozen.backbone_layers is None and frozen.pooling == "mean"
        assert not frozen.end_to_end.end_to_end and e2e.end_to_end.end_to_end
        assert e2e.end_to_end.backbone_lr == 3e-4 and e2e.end_to_end.lr == 1e-2
        if section["method"] in ("vpl", "micro"):  # steps: round(2 epochs * 30 pairs / 8) = round(7.5) = 8
            assert e2e.end_to_end.max_steps == 8
        else:
            assert e2e.end_to_end.epochs == 2.0 and e2e.end_to_end.batch_size == 8


def test_true_preference_scores_and_mean_over_seeds():
    bench = _bench()
    # Rows 0-1 of group a, rows 2-3 of group b; true logits per group (a, b): rows 0 and 2 are contested.
    truth = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [2.0, 1.0]], dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1])
    correct = torch.tensor([True, False, False, True])  # right against the label (chosen truly preferred here)
    s = bench.true_preference_scores(correct, group, truth, ["a", "b"])
    # a: row 0 right, row 1 wrong -> 0.5, contested (row 0) 1.0; b: row 2 wrong, row 3 right -> 0.5, contested 0.0.
    assert s["per_group"]["a"]["true"] == 0.5 and s["per_group"]["a"]["contested"] == 1.0
    assert s["per_group"]["b"]["true"] == 0.5 and s["per_group"]["b"]["contested"] == 0.0
    assert s["worst"] == 0.5
    mean = bench.mean_over_seeds([{"x": 0.5, "g": "a", "n": None}, {"x": 0.7, "g": "b", "n": None}])
    assert abs(mean["x"] - 0.6) < 1e-12 and mean["g"] == "a/b" and mean["n"] is None
