"""Process-reward metrics against hand-computed values and the benchmarks' own definitions, and the step loss.

ProcessBench (Zheng et al. 2024): accuracy of the first rejected step on erroneous and on correct solutions,
harmonic mean. PRMBench (mr_eval/tasks/prmtest_classified/task.py and its table notebook): per-class
positive / negative F1 with its -1 conventions, PRMScore = mean of the two (F1 alone for multi_solutions),
clamped at 0, overall from summed counts. TRL has no PRM loss function to compare with (its experimental
PRMTrainer uses the model's own token-classification loss), so prm_bce is checked by hand and against
torch's BCE.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from prefkit.eval.process_metrics import (
    choose_threshold,
    first_error,
    first_rejected,
    prmbench_scores,
    processbench_scores,
    step_auroc,
)
from prefkit.losses import StepScores, get_loss


def test_first_error_and_first_rejected():
    assert first_error([True, 1, 0.0]) == 2
    assert first_error([True, 0.7]) == -1
    assert first_error([0.5]) == 0  # a soft label of 0.5 or less is wrong
    assert first_error([False, True]) == 0  # the first step
    assert first_rejected([0.9, 0.4, 0.2], 0.5) == 1
    assert first_rejected([0.5, 0.6], 0.5) == -1  # at the threshold: accepted
    assert first_rejected([0.1], 0.5) == 0


def test_processbench_by_hand():
    truth = [1, -1, 0, 2, -1]
    predicted = [1, -1, 1, -1, 0]
    out = processbench_scores(truth, predicted)
    assert out["error_accuracy"] == pytest.approx(1 / 3)  # solutions 0 (right), 2 and 3 (wrong)
    assert out["correct_accuracy"] == pytest.approx(1 / 2)
    assert out["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))  # = 0.4
    assert (out["n_error"], out["n_correct"]) == (3, 2)


def test_processbench_all_correct_and_errors_at_first_and_last_step():
    # every solution correct: no erroneous accuracy, no F1
    out = processbench_scores([-1, -1], [-1, 0])
    assert out["correct_accuracy"] == 0.5 and out["error_accuracy"] is None and out["f1"] is None
    # errors at the first and at the last of 3 steps, both found
    out = processbench_scores([0, 2, -1], [0, 2, -1])
    assert out["f1"] == 1.0
    # rejecting too early and too late are both wrong; accepting everything is right only on correct ones
    out = processbench_scores([2, 0, -1], [1, -1, -1])
    assert out["error_accuracy"] == 0.0 and out["correct_accuracy"] == 1.0 and out["f1"] == 0.0


def _prmbench_reference(labels, predicted, classes):
    """PRMBench's counting as its scorer does it: a step in error_steps predicted positive is FP, predicted
    negative TN; any other step positive TP, negative FN."""
    counts = {}
    for truth, guess, cls in zip(labels, predicted, classes):
        c = counts.setdefault(cls, dict(TP=0, FP=0, TN=0, FN=0))
        errors = [k for k, y in enumerate(truth) if not y]
        for idx in range(len(guess)):
            if idx in errors:
                c["FP" if guess[idx] else "TN"] += 1
            else:
                c["TP" if guess[idx] else "FN"] += 1
    return counts


def test_prmbench_by_hand():
    labels = [[True, False, False], [True, True], [True, True, True]]
    predicted = [[True, True, False], [False, True], [True, False, True]]
    classes = ["counterfactual", "counterfactual", "multi_solutions"]
    out = prmbench_scores(labels, predicted, classes)
    a, b = out["classes"]["counterfactual"], out["classes"]["multi_solutions"]
    reference = _prmbench_reference(labels, predicted, classes)
    assert a["confusion"] == reference["counterfactual"] == {"TP": 2, "FP": 1, "TN": 1, "FN": 1}
    assert b["confusion"] == reference["multi_solutions"] == {"TP": 2, "FP": 0, "TN": 0, "FN": 1}
    assert a["f1"] == pytest.approx(2 / 3) and a["negative_f1"] == pytest.approx(1 / 2)
    assert a["prmscore"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # 7/12
    # multi_solutions has no error step: PRMScore is its positive F1 (P = 1, R = 2/3); its negative F1 is
    # PRMBench's 2 * 0 * (-1) / (0 - 1) = 0
    assert b["f1"] == pytest.approx(0.8) and b["negative_f1"] == 0.0 and b["prmscore"] == pytest.approx(0.8)
    # overall from the summed counts TP 4, FP 1, TN 1, FN 2
    assert out["confusion"] == {"TP": 4, "FP": 1, "TN": 1, "FN": 2}
    assert out["f1"] == pytest.approx(8 / 11) and out["negative_f1"] == pytest.approx(0.4)
    assert out["prmscore"] == pytest.approx((8 / 11 + 0.4) / 2)
    assert out["groups"] == {"soundness": pytest.approx(7 / 12), "sensitivity": pytest.approx(0.8)}


def test_prmbench_minus_one_conventions_and_clamp():
    # one error step, rejected: no positive step and no positive prediction -> F1 = 2*(-1)(-1)/(-2) = -1;
    # negative F1 = 1; PRMScore = 0.5 * -1 + 0.5 * 1 = 0 (and a negative one would be clamped to 0)
    out = prmbench_scores([[False]], [[False]], ["circular"])
    c = out["classes"]["circular"]
    assert c["f1"] == -1.0 and c["negative_f1"] == 1.0 and c["prmscore"] == 0.0
    # every step accepted on a solution with an error at the last step
    out = prmbench_scores([[True, True, False]], [[True, True, True]], ["confidence"])
    c = out["classes"]["confidence"]
    assert c["confusion"] == {"TP": 2, "FP": 1, "TN": 0, "FN": 0}
    assert c["f1"] == pytest.approx(0.8) and c["negative_f1"] == 0.0 and c["prmscore"] == pytest.approx(0.4)
    # steps beyond the predictions (cut by a length limit) do not count
    out = prmbench_scores([[True, False, False]], [[True]], ["confidence"])
    assert out["confusion"] == {"TP": 1, "FP": 0, "TN": 0, "FN": 0}


def test_step_auroc_by_hand():
    # correct steps 0.9, 0.8 against wrong 0.8, 0.3: 1 + 1 + 0.5 (tie) + 1 of 4 pairs
    assert step_auroc([0.9, 0.8, 0.3, 0.8], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert step_auroc([0.1, 0.2], [True, True]) is None


def test_choose_threshold_maximises_processbench_f1():
    scores = [[0.9, 0.3], [0.8, 0.7]]
    truth = [1, -1]
    assert choose_threshold(scores, truth, [0.2, 0.6, 0.75]) == 0.6
    assert choose_threshold(scores, truth) == 0.5  # every t in (0.3, 0.7] gives F1 1; the tie goes to 0.5


def test_prm_bce_by_hand_and_against_torch():
    logits = torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    batch = StepScores(logits, labels, torch.tensor([0, 0, 1]), 2)
    out = get_loss("prm_bce")(batch)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  -log sigma(-x)
    assert out.loss[0].item() == pytest.approx((math.log(2) + softplus(2.0)) / 2)
    assert out.loss[1].item() == pytest.approx(0.5 * softplus(1.0) + 0.5 * softplus(-1.0))
    per_step = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    assert torch.allclose(out.loss, torch.stack([per_step[:2].mean(), per_step[2:].mean()]))
    out.loss.sum().backward()
    # d/dz of a mean over n steps: (sigma(z) - y) / n
    expected = torch.tensor(
        [
            (0.5 - 1) / 2,
            (torch.sigmoid(torch.tensor(2.0)).item() - 0) / 2,
            torch.sigmoid(torch.tensor(-1.0)).item() - 0.5,
        ]
    )
    assert torch.allclose(logits.grad, expected.double())
    assert out.metrics["steps/accuracy"].tolist() == [0.0, 1.0]
    weighted = get_loss("prm_bce")(batch, pos_weight=2.0)
    assert weighted.loss[0].item() == pytest.approx((2 * math.log(2) + softplus(2.0)) / 2)
    with pytest.raises(ValueError, match="pos_weight"):
        get_loss("prm_bce")(batch, pos_weight=0.0)
