"""ModelConfig: one dataclass for both config.json layouts (Hugging Face and `original/`)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from gptoss.tokenizer import DEFAULT_EOS_IDS, ENDOFTEXT, RETURN


class ConfigError(ValueError):
    """A config.json that gptoss cannot run; the message says which field and why."""


@dataclass(frozen=True)
class ModelConfig:
    num_hidden_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    # One entry per layer, "sliding_attention" or "full_attention" (the HF spelling).
    layer_types: tuple[str, ...] = ()
    rms_norm_eps: float = 1e-5
    # RoPE with YaRN scaling (DESIGN.md §2).
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    initial_context_length: int = 4096
    rope_ntk_beta: float = 32.0  # beta_fast
    rope_ntk_alpha: float = 1.0  # beta_slow
    eos_token_ids: tuple[int, ...] = DEFAULT_EOS_IDS  # the engine's stop ids (generation_config.json)
    # How the experts are stored: "mxfp4" (the published blocks and scales) or "float" (the
    # dequantized layout of fine-tunes and of gptoss's own training, no quantization_config).
    expert_format: str = "mxfp4"

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_hidden_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        self.validate()

    # -- derived sizes -------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return int(self.initial_context_length * self.rope_scaling_factor)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def window_of(self, layer: int) -> int:
        """Sliding window of a layer, 0 for full causal attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else 0

    # -- checks --------------------------------------------------------------------------
    def validate(self) -> None:
        positive = ["num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                    "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads",
                    "initial_context_length"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.experts_per_token > self.num_experts:
            raise ConfigError(f"experts_per_token ({self.experts_per_token}) is larger than "
                              f"num_experts ({self.num_experts})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be a multiple of 32: "
                                  "MXFP4 blocks hold 32 values")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers "
                              f"is {self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
        if bad:
            raise ConfigError(f"layer_types holds {bad}; expected 'sliding_attention' or 'full_attention'")
        if "sliding_attention" in self.layer_types and self.sliding_window <= 0:
            raise ConfigError("sliding_window must be positive when a layer uses sliding attention")
        if self.expert_format not in EXPERT_FORMATS:
            raise ConfigError(f"expert_format must be one of {EXPERT_FORMATS}, got {self.expert_format!r}")
        for name in ("rope_theta", "rope_scaling_factor", "swiglu_limit", "rms_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive number, got {value!r}")

    # -- counts --------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Total and active (per token) parameters, embedding counted in total only."""
        h, i, e = self.hidden_size, self.intermediate_size, self.num_experts
        attn = h * self.q_dim * 2 + h * self.kv_dim * 2 + self.q_dim + 2 * self.kv_dim + h
        attn += self.num_attention_heads + 2 * h  # sinks, two norms
        router = e * h + e
        expert = (2 * i * h + 2 * i) + (h * i + h)
        embed = self.vocab_size * h
        total = embed * 2 + h + self.num_hidden_layers * (attn + router + e * expert)
        active = embed + h + self.num_hidden_layers * (attn + router + self.experts_per_token * expert)
        return {"total": total, "active": active}

    # -- construction --------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path} not found: a model folder needs a config.json")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Read either layout: Hugging Face (`model_type: gpt_oss`) or the original one."""
        if "model_type" in data or "num_local_experts" in data:
            return cls._from_hf(data)
        return cls._from_original(data)

    @classmethod
    def _from_original(cls, data: dict) -> "ModelConfig":
        unknown = sorted(set(data) - ORIGINAL_FIELDS)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} in an original-layout config.json")
        return cls(**_numbers(dict(data)))

    @classmethod
    def _from_hf(cls, data: dict) -> "ModelConfig":
        if data.get("model_type", "gpt_oss") != "gpt_oss":
            raise ConfigError(f"model_type is {data['model_type']!r}; gptoss runs only 'gpt_oss' models")
        unknown = sorted(set(data) - HF_FIELDS - HF_IGNORED_FIELDS)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} in config.json")
        kwargs = {}
        for hf_name, ours in HF_RENAMES.items():
            if hf_name in data:
                kwargs[ours] = data[hf_name]
        if "num_experts_per_tok" in data and "experts_per_token" in data \
                and data["num_experts_per_tok"] != data["experts_per_token"]:
            raise ConfigError(f"num_experts_per_tok ({data['num_experts_per_tok']}) and experts_per_token "
                              f"({data['experts_per_token']}) disagree")
        rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
        if rope:
            if rope.get("rope_type", "yarn") != "yarn":
                raise ConfigError(f"rope type {rope.get('rope_type')!r} is not supported; gpt-oss uses 'yarn'")
            if rope.get("truncate", False):
                raise ConfigError("rope_scaling.truncate is true; gpt-oss uses truncate: false")
            for key, ours in (("factor", "rope_scaling_factor"), ("beta_fast", "rope_ntk_beta"),
                              ("beta_slow", "rope_ntk_alpha"), ("rope_theta", "rope_theta"),
                              ("original_max_position_embeddings", "initial_context_length")):
                if key in rope:
                    kwargs[ours] = rope[key]
        quant = data.get("quantization_config")
        if quant is not None and quant.get("quant_method") != "mxfp4":
            raise ConfigError(f"quantization_config.quant_method is {quant.get('quant_method')!r}; "
                              "gptoss reads the published MXFP4 checkpoints")
        kwargs["expert_format"] = "mxfp4" if quant is not None else "float"
        eos = data.get("eos_token_id")
        if isinstance(eos, list) and eos:
            kwargs["eos_token_ids"] = tuple(eos)
        config = cls(**_numbers(kwargs))
        max_pos = data.get("max_position_embeddings")
        if max_pos is not None and max_pos != config.context_length:
            raise ConfigError(f"max_position_embeddings ({max_pos}) disagrees with "
                              f"original_max_position_embeddings × factor ({config.context_length})")
        return config

    def to_hf_dict(self) -> dict:
        """config.json of the Hugging Face layout; quantization_config only for MXFP4 experts."""
        out = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "num_hidden_layers": self.num_hidden_layers,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn", "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_ntk_beta, "beta_slow": self.rope_ntk_alpha,
                "original_max_position_embeddings": self.initial_context_length, "truncate": False,
            },
            "initial_context_length": self.initial_context_length,
            "max_position_embeddings": self.context_length,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "eos_token_id": RETURN if self.vocab_size > RETURN else None,
            "pad_token_id": ENDOFTEXT if self.vocab_size > ENDOFTEXT else None,
            "use_cache": True,
        }
        if self.expert_format == "mxfp4":
            out["quantization_config"] = MXFP4_QUANTIZATION_CONFIG
        return out

    def to_original_dict(self) -> dict:
        if self.expert_format != "mxfp4":
            raise ConfigError("the original layout stores MXFP4 experts only; quantize first (gptoss quantize)")
        if self.layer_types != default_layer_types(self.num_hidden_layers):
            raise ConfigError("the original layout can only express alternating sliding/full layers")
        out = {name: getattr(self, name) for name in sorted(ORIGINAL_FIELDS)}
        return out


EXPERT_FORMATS = ("mxfp4", "float")
# As in the published gpt-oss config.json files.
MXFP4_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                               "model.embed_tokens", "lm_head"],
}


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    """Even layers slide over 128 tokens, odd layers see the full context."""
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers))


def _numbers(kwargs: dict) -> dict:
    """Coerce integral floats (JSON writes 32.0) and reject wrongly typed values early."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out = {}
    for key, value in kwargs.items():
        default = fields[key].default
        if isinstance(default, bool) or key in ("layer_types", "eos_token_ids", "expert_format"):
            out[key] = value
        elif isinstance(default, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"config field {key} must be an integer, got {value!r}")
            out[key] = value
        elif isinstance(default, float):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"config field {key} must be a number, got {value!r}")
            out[key] = float(value)
        else:
            out[key] = value
    return out


ORIGINAL_FIELDS = {
    "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
    "intermediate_size", "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads",
    "sliding_window", "initial_context_length", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha",
    "rope_ntk_beta",
}

# Hugging Face name -> ModelConfig field.
HF_RENAMES = {
    "num_hidden_layers": "num_hidden_layers",
    "num_local_experts": "num_experts",
    "num_experts_per_tok": "experts_per_token",
    "experts_per_token": "experts_per_token",
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "swiglu_limit": "swiglu_limit",
    "head_dim": "head_dim",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "sliding_window": "sliding_window",
    "layer_types": "layer_types",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "initial_context_length": "initial_context_length",
}
HF_FIELDS = set(HF_RENAMES) | {"rope_scaling", "rope_parameters", "quantization_config", "eos_token_id",
                               "max_position_embeddings", "model_type"}
# Generic transformers fields that do not change the computation.
HF_IGNORED_FIELDS = {
    "architectures", "attention_bias", "attention_dropout", "hidden_act", "initializer_range",
    "output_router_logits", "pad_token_id", "bos_token_id", "router_aux_loss_coef", "tie_word_embeddings",
    "torch_dtype", "dtype", "transformers_version", "use_cache", "_name_or_path", "name_or_path",
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class", "_attn_implementation",
    "_attn_implementation_autoset", "layer_idx", "use_sliding_window", "max_window_layers",
}

PRESETS = {
    "20b": dict(num_hidden_layers=24, num_experts=32),
    "120b": dict(num_hidden_layers=36, num_experts=128),
    # Real widths of heads and vocabulary, but small: for tests and demos.
    "tiny": dict(num_hidden_layers=2, num_experts=4, experts_per_token=2, hidden_size=64,
                 intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                 sliding_window=8, initial_context_length=64, rope_scaling_factor=32.0),
}
