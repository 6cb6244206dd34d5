"""combine_losses / resolve_loss_params: weights, parameter routing, errors."""

import pytest
import torch

from prefkit.losses import PairLogps, UnpairedLogps, get_loss, list_losses
from prefkit.losses.combine import combine_losses, resolve_loss_params


def batch():
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    return PairLogps(
        policy_chosen=t([-6.0, -1.5, -4.0]),
        policy_rejected=t([-8.0, -0.9, -4.0]),
        chosen_len=t([3.0, 2.0, 4.0]),
        rejected_len=t([4.0, 1.0, 2.0]),
    )


def registered(name):
    return name in {s.name for s in list_losses()}


def test_single_loss_is_the_loss_itself():
    b = batch()
    out = combine_losses(b, ["simpo"], None, {"beta": 2.5})
    ref = get_loss("simpo")(b, beta=2.5)
    assert torch.equal(out.loss, ref.loss)
    for key, value in ref.metrics.items():
        assert torch.equal(out.metrics[key], value)
    assert torch.equal(out.metrics["loss/simpo"], ref.loss)


def test_weighted_sum_cpo_plus_sft_is_cpo_with_alpha():
    # cpo without its NLL, plus 0.5 * sft, is cpo with cpo_alpha = 0.5
    b = batch()
    out = combine_losses(b, ["cpo", "sft"], [1.0, 0.5], {"cpo": {"cpo_alpha": 0.0}})
    ref = get_loss("cpo")(b, cpo_alpha=0.5)
    assert torch.allclose(out.loss, ref.loss, rtol=1e-12)
    # first loss's metrics under plain names, others prefixed, components unweighted
    assert torch.equal(out.metrics["rewards/chosen"], ref.metrics["rewards/chosen"])
    assert torch.equal(out.metrics["loss/sft"], get_loss("sft")(b).loss)
    assert torch.equal(out.metrics["loss/cpo"], get_loss("cpo")(b, cpo_alpha=0.0).loss)
    assert torch.equal(out.metrics["sft/nll_loss"], get_loss("sft")(b).loss)
    assert out.loss.shape == (3,)


def test_weights_default_to_one():
    b = batch()
    out = combine_losses(b, ["orpo", "sft"])
    assert torch.allclose(out.loss, get_loss("orpo")(b).loss + get_loss("sft")(b).loss)


def test_rpo_is_dpo_plus_sft():
    if not registered("dpo"):
        pytest.skip("dpo not registered")
    b = batch()
    b.ref_chosen = torch.tensor([-5.0, -2.0, -4.5], dtype=torch.float64)
    b.ref_rejected = torch.tensor([-7.0, -1.0, -3.0], dtype=torch.float64)
    out = combine_losses(b, ["dpo", "sft"], [1.0, 1.0], {"dpo": {"beta": 0.2}})
    expected = get_loss("dpo")(b, beta=0.2).loss + get_loss("sft")(b).loss
    assert torch.allclose(out.loss, expected)
    assert "rewards/margins" in out.metrics


def test_shared_and_per_loss_params():
    resolved = resolve_loss_params(["simpo", "cpo"], {"beta": 0.3, "cpo": {"beta": 0.05}, "cpo_alpha": 2})
    assert resolved["simpo"] == {"beta": 0.3, "gamma_beta_ratio": 0.5, "label_smoothing": 0.0}
    assert resolved["cpo"] == {"beta": 0.05, "cpo_alpha": 2.0, "label_smoothing": 0.0}
    assert isinstance(resolved["cpo"]["cpo_alpha"], float)
    # a shared key goes only to the losses that accept it
    assert resolve_loss_params(["simpo", "sft"], {"gamma_beta_ratio": 0.8}) == {
        "simpo": {"beta": 2.0, "gamma_beta_ratio": 0.8, "label_smoothing": 0.0},
        "sft": {},
    }


def test_defaults_when_no_params():
    assert resolve_loss_params(["orpo"]) == {"orpo": {"beta": 0.1}}
    assert resolve_loss_params("orpo", {}) == {"orpo": {"beta": 0.1}}


def test_unknown_shared_key_names_closest():
    with pytest.raises(ValueError, match=r"'gama_beta_ratio'.*Did you mean 'gamma_beta_ratio'"):
        resolve_loss_params(["simpo", "sft"], {"gama_beta_ratio": 0.5})


def test_key_accepted_by_no_selected_loss():
    # cpo_alpha exists, but not in the selected losses
    with pytest.raises(ValueError, match="accepted by none"):
        resolve_loss_params(["orpo", "sft"], {"cpo_alpha": 1.0})


def test_unknown_per_loss_key_names_closest():
    with pytest.raises(ValueError, match=r"loss 'cpo' has no hyper-parameter 'alpha'.*'cpo_alpha'"):
        resolve_loss_params(["cpo"], {"cpo": {"alpha": 1.0}})


def test_params_for_unselected_loss():
    with pytest.raises(ValueError, match="not selected"):
        resolve_loss_params(["simpo"], {"orpo": {"beta": 0.2}})


def test_per_loss_params_must_be_a_mapping():
    with pytest.raises(TypeError, match="mapping"):
        resolve_loss_params(["simpo"], {"simpo": 2.0})


def test_wrong_value_type():
    with pytest.raises(TypeError, match="beta: expected a number"):
        resolve_loss_params(["simpo"], {"beta": "high"})
    with pytest.raises(TypeError, match="number"):
        resolve_loss_params(["simpo"], {"beta": True})


def test_mixing_kinds_is_an_error():
    with pytest.raises(ValueError, match="different kinds"):
        resolve_loss_params(["simpo", "kto"])


def test_unknown_and_duplicate_names():
    with pytest.raises(KeyError, match="Did you mean 'simpo'"):
        resolve_loss_params(["simppo"])
    with pytest.raises(ValueError, match="twice"):
        resolve_loss_params(["sft", "sft"])
    with pytest.raises(ValueError, match="at least one"):
        resolve_loss_params([])


def test_weights_length_mismatch():
    with pytest.raises(ValueError, match="2 weights for 1 losses"):
        combine_losses(batch(), ["simpo"], [1.0, 0.5])


def test_unpaired_losses_combine_too():
    b = UnpairedLogps(
        policy=torch.tensor([-5.0, -7.0], dtype=torch.float64),
        ref=torch.tensor([-6.0, -6.5], dtype=torch.float64),
        label=torch.tensor([True, False]),
        length=torch.tensor([2.0, 3.0]),
        ref_point=torch.tensor(0.1, dtype=torch.float64),
    )
    out = combine_losses(b, ["kto", "bco"], [1.0, 0.25], {"beta": 0.2, "kto": {"desirable_weight": 1.3}})
    expected = get_loss("kto")(b, beta=0.2, desirable_weight=1.3).loss + 0.25 * get_loss("bco")(b, beta=0.2).loss
    assert torch.allclose(out.loss, expected)
    assert torch.equal(out.metrics["rewards"], get_loss("kto")(b, beta=0.2).metrics["rewards"])
    assert "bco/rewards" in out.metrics and "loss/bco" in out.metrics
