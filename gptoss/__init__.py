"""gptoss: run OpenAI's gpt-oss models, MXFP4 from disk to kernel."""

from gptoss.config import ConfigError, ModelConfig
from gptoss.checkpoint import CheckpointError
from gptoss.model import Model

__all__ = ["Model", "ModelConfig", "ConfigError", "CheckpointError"]
__version__ = "0.1.0"
