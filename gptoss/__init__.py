"""gptoss: run OpenAI's gpt-oss models, MXFP4 from disk to kernel."""

from gptoss.config import ConfigError, ModelConfig
from gptoss.checkpoint import CheckpointError
from gptoss.model import Model
from gptoss.sampling import SamplingParams


def __getattr__(name):
    # LLM pulls in the tokenizer, harmony and the engine: import it only when asked for.
    if name == "LLM":
        from gptoss.llm import LLM
        return LLM
    raise AttributeError(f"module 'gptoss' has no attribute {name!r}")


__all__ = ["LLM", "Model", "ModelConfig", "SamplingParams", "ConfigError", "CheckpointError"]
__version__ = "0.1.0"
