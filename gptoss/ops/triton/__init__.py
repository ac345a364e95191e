"""GPU kernels in Triton: MXFP4 experts (moe.py), sink attention over the paged cache
(attention.py), RMSNorm and rotary (norm_rope.py). The dense products stay cuBLAS.

Chosen once per device by `gptoss.ops.select`: Triton importable and an NVIDIA GPU of compute
capability 7.5 (Turing) or newer. The compute dtype follows the card: bf16 from sm80 (Ampere),
fp16 on sm75, which has no bf16 arithmetic. The kernels also run under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported) on CPU tensors: that is how they are tested.
"""

from __future__ import annotations

import torch

MIN_CAPABILITY = (7, 5)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None when they can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (it comes with the CUDA builds of torch)"
    if device.type != "cuda":
        return f"the Triton kernels are for CUDA devices, not {device.type}"
    if not torch.cuda.is_available():
        return "this torch sees no CUDA device"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} is sm{capability[0]}{capability[1]}; the Triton kernels need "
                f"sm75 (Turing) or newer")
    return None


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def backend(device: torch.device):
    """The Backend of gptoss.ops for `device` (call after unavailable_reason(device) is None)."""
    major, minor = torch.cuda.get_device_capability(device)
    card = compute_dtype(device)
    return make_backend(card, f"triton (sm{major}{minor}, {str(card).removeprefix('torch.')})")


def make_backend(card: torch.dtype, name: str):
    """The kernels computing half-precision models in `card` (fp32 models stay fp32)."""
    from gptoss.ops import Backend, reference
    from gptoss.ops.triton import attention, moe, norm_rope

    def dtype_for(x: torch.Tensor) -> torch.dtype:
        return torch.float32 if x.dtype == torch.float32 else card

    def moe_experts(x, expert_indices, expert_weights, experts):
        return moe.moe_experts(x, expert_indices, expert_weights, experts, compute_dtype=dtype_for(x))

    def attend(q, k, v, sinks, q_pos, k_pos, window, key_rows=None, seq_starts=None):
        return attention.attention(q, k, v, sinks, q_pos, k_pos, window, key_rows, seq_starts,
                                   compute_dtype=dtype_for(q))

    def decode(q, k_pool, v_pool, sinks, q_pos, block_table, first_page, context_lens, window):
        return attention.decode_attention(q, k_pool, v_pool, sinks, q_pos, block_table, first_page, context_lens,
                                          window, compute_dtype=dtype_for(q))

    return Backend(name, reference.linear, norm_rope.rms_norm, norm_rope.rotary, reference.linear_int8,
                   reference.quantize_rows_int8, moe_experts, attend, decode)
