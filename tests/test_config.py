import json

import pytest

from gptoss.config import ConfigError, ModelConfig

HF_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}
ORIGINAL_120B = {
    "num_hidden_layers": 36, "num_experts": 128, "experts_per_token": 4, "vocab_size": 201088, "hidden_size": 2880,
    "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64, "num_attention_heads": 64,
    "num_key_value_heads": 8, "sliding_window": 128, "initial_context_length": 4096, "rope_theta": 150000,
    "rope_scaling_factor": 32.0, "rope_ntk_alpha": 1, "rope_ntk_beta": 32,
}


def test_hf_config_matches_20b_preset():
    assert ModelConfig.from_dict(HF_20B) == ModelConfig.preset("20b")


def test_original_config_matches_120b_preset():
    assert ModelConfig.from_dict(ORIGINAL_120B) == ModelConfig.preset("120b")


def test_newer_rope_parameters_key():
    data = dict(HF_20B)
    data["rope_parameters"] = dict(data.pop("rope_scaling"), rope_theta=150000)
    assert ModelConfig.from_dict(data) == ModelConfig.preset("20b")


def test_presets_and_counts():
    c20, c120 = ModelConfig.preset("20b"), ModelConfig.preset("120b")
    assert round(c20.param_counts()["total"] / 1e9, 1) == 20.9
    assert round(c20.param_counts()["active"] / 1e9, 2) == 3.61
    assert round(c120.param_counts()["total"] / 1e9, 1) == 116.8
    assert round(c120.param_counts()["active"] / 1e9, 2) == 5.13
    assert c20.context_length == 131072
    assert [c20.window_of(i) for i in range(4)] == [128, 0, 128, 0]
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("7b")


def test_round_trip_through_both_layouts():
    c = ModelConfig.preset("tiny")
    assert ModelConfig.from_dict(c.to_hf_dict()) == c
    assert ModelConfig.from_dict(c.to_original_dict()) == c


@pytest.mark.parametrize("change, message", [
    ({"some_new_field": 1}, "unknown field"),
    ({"model_type": "llama"}, "model_type"),
    ({"num_experts_per_tok": 40}, "experts_per_token"),
    ({"num_attention_heads": 60}, "multiple of num_key_value_heads"),
    ({"hidden_size": 2881}, "multiple of 32"),
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types has 3 entries"),
    ({"layer_types": ["local"] * 24}, "layer_types holds"),
    ({"num_hidden_layers": "24"}, "num_hidden_layers must be an integer"),
    ({"rope_theta": -1}, "rope_theta"),
    ({"max_position_embeddings": 8192}, "max_position_embeddings"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope type"),
    ({"rope_scaling": dict(HF_20B["rope_scaling"], truncate=True)}, "truncate"),
])
def test_bad_hf_config_gives_clear_error(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**HF_20B, **change})


def test_bad_original_config_gives_clear_error():
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({**ORIGINAL_120B, "mystery": 3})
    with pytest.raises(ConfigError, match="experts_per_token"):
        ModelConfig.from_dict({**ORIGINAL_120B, "experts_per_token": 200})


def test_from_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**HF_20B, "vocab_size": 0}))
    with pytest.raises(ConfigError, match="config.json: config field vocab_size"):
        ModelConfig.from_file(tmp_path)
