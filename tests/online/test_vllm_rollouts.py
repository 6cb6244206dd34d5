"""The vLLM rollout backend: refused clearly where it cannot run; on a GPU with vllm (``pytest -m gpu``), the
same interface and distribution as `HFRollouts`, and weights that follow the trained policy."""

import importlib.util

import pytest
import torch

from prefkit.online.rollouts import HFRollouts, SamplingSettings
from prefkit.online.vllm_rollouts import VLLMRollouts, vllm_available

HAS_GPU_VLLM = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
gpu = pytest.mark.skipif(not HAS_GPU_VLLM, reason="needs a CUDA GPU and the vllm package")


def test_without_vllm_or_a_gpu_the_backend_says_what_is_missing(tiny_model, tokenizer):
    if HAS_GPU_VLLM:
        pytest.skip("this machine can run vLLM")
    with pytest.raises((ImportError, RuntimeError), match="rollout_backend vllm needs"):
        VLLMRollouts(tiny_model, tokenizer)


def test_the_online_config_refuses_vllm_when_it_is_not_installed(tmp_path):
    from prefkit.train.online_settings import check_online
    from prefkit.train.settings import ConfigError

    online = {"prompts_file": "x.jsonl", "rewards": [{"reward": "math"}], "rollout_backend": "vllm"}
    if vllm_available():
        assert check_online(online, paths=False)["rollout_backend"] == "vllm"
    else:
        with pytest.raises(ConfigError, match="online.rollout_backend: expected hf, or vllm with the vllm package"):
            check_online(online, paths=False)
    with pytest.raises(ConfigError, match="online.rollout_backend: expected hf or vllm, got 'sglang'"):
        check_online({**online, "rollout_backend": "sglang"}, paths=False)


@pytest.mark.gpu
@gpu
def test_vllm_matches_the_hf_distribution_and_follows_the_policy(tmp_path, tokenizer):
    """First-token frequencies of vLLM and HF samples agree with the policy's softmax; the log-probs vLLM
    reports are the policy's; after the weights change and sync, vLLM samples the new policy."""
    from prefkit.models.tiny import build_tiny_llama

    model = build_tiny_llama(vocab_size=len(tokenizer), seed=0).to("cuda")
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    model.name_or_path = str(tmp_path / "policy")
    engine = VLLMRollouts(model, tokenizer, gpu_memory_utilization=0.2)
    prompt = tokenizer("hello")["input_ids"]
    settings = SamplingSettings(n=2000, max_new_tokens=3, temperature=0.5, seed=1)
    out = engine.generate([prompt], settings)
    assert len(out) == 2000 and all(len(r.logprobs) == len(r.completion_ids) for r in out)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt], device="cuda")).logits[0, -1].float() / 0.5
    logp = torch.log_softmax(logits, -1).cpu()
    first = torch.tensor([r.completion_ids[0] for r in out])
    assert torch.allclose(torch.tensor([r.logprobs[0] for r in out]), logp[first], atol=2e-2)
    hf = HFRollouts(model, tokenizer, batch_size=500).generate([prompt], settings)
    top = logp.topk(3).indices
    for sample in (out, hf):
        freq = torch.bincount(torch.tensor([r.completion_ids[0] for r in sample]), minlength=logp.numel()).float()
        assert torch.allclose(freq[top] / len(sample), logp.exp()[top], atol=0.04)
    with torch.no_grad():  # make one token certain, sync, and vLLM must follow
        model.lm_head.weight.zero_()
        model.lm_head.weight[7] = 50.0 * model.model.norm.weight
    engine.sync_weights(model)
    assert {r.completion_ids[0] for r in engine.generate([prompt], SamplingSettings(n=8, max_new_tokens=1))} <= {7}
