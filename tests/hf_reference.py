"""Hugging Face transformers' GptOssForCausalLM on a checkpoint folder: the reference the logits
tests compare against."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import transformers


def hf_model(path: str | Path):
    """The folder's model in fp32 and eval mode; MXFP4 experts dequantized (exact in bf16)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # Dequantize MXFP4 explicitly: with the `kernels` package installed, transformers >= 5.25 would
    # otherwise fetch Hub kernels (and refuse them as untrusted) even on CPU.
    mxfp4 = "quantization_config" in json.loads((Path(path) / "config.json").read_text())
    extra = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if mxfp4 else {}
    model = transformers.GptOssForCausalLM.from_pretrained(path, attn_implementation="eager", **extra)
    return model.float().eval()
