"""The trainer-facing contract (SamplingParams, RolloutRequest) and the rollout config section."""

import pytest

from megatron_rl.config.base import field_docs, from_dict
from megatron_rl.config.rollout import RolloutConfig
from megatron_rl.errors import ConfigError
from megatron_rl.rollout.types import RolloutRequest, Sample, SamplingParams


def test_sampling_params_to_sglang_payload():
    p = SamplingParams(temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=7, stop=("</s>",),
                       stop_token_ids=(2, 3), ignore_eos=True, n=4, seed=11)
    assert p.to_sglang() == {
        "temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 7, "ignore_eos": True, "n": 4,
        "stop": ["</s>"], "stop_token_ids": [2, 3], "sampling_seed": 11,
    }
    assert "sampling_seed" not in SamplingParams().to_sglang()


@pytest.mark.parametrize("kwargs, needle", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"), ({"max_new_tokens": -1}, "max_new_tokens"), ({"n": 0}, "n must"),
    ({"stop_token_ids": (-3,)}, "stop_token_ids"), ({"temperature": float("nan")}, "temperature"),
])
def test_sampling_params_refuse_impossible_values(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        SamplingParams(**kwargs)


def test_sampling_params_from_config_and_overrides():
    cfg = RolloutConfig(temperature=0.3, top_p=0.8, top_k=5, max_new_tokens=99, n_samples=3)
    p = SamplingParams.from_config(cfg, n=1)
    assert (p.temperature, p.top_p, p.top_k, p.max_new_tokens, p.n) == (0.3, 0.8, 5, 99, 1)


def test_request_needs_a_prompt_and_sample_reports_truncation():
    with pytest.raises(ConfigError, match="empty prompt"):
        RolloutRequest("r0", [])
    s = Sample("r0", 0, [1], [2, 3], [-0.1, -0.2], "length")
    assert s.truncated and not Sample("r0", 1, [1], [2], [-0.1], "stop", matched_stop=2).truncated


def test_rollout_config_documents_and_validates_every_field():
    docs = field_docs(RolloutConfig)
    assert set(docs) == {f for f in RolloutConfig.__dataclass_fields__}
    assert from_dict(RolloutConfig, {"engine": "sglang", "tp_size": 2}).tp_size == 2
    for bad, needle in [({"engine": "vllm"}, "engine"), ({"tp_size": 2}, "embedded"),
                        ({"top_p": 0}, "top_p"), ({"server_urls": ["localhost:1"]}, "server_urls"),
                        ({"engine": "sglang", "num_servers": 2, "tp_size": 2, "gpu_ids": [0, 1]}, "gpu_ids"),
                        ({"base_port": 80}, "base_port"), ({"sync_transport": "ipc"}, "sync_transport")]:
        with pytest.raises(ConfigError, match=needle):
            from_dict(RolloutConfig, bad)
