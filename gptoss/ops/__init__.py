"""The hot operations behind one signature each; fast kernels replace the reference twins.

`moe_experts` and `attention` are what the model calls. Each name is bound to the fastest
implementation that loaded on this machine; `reference` keeps the plain-torch twins.
"""

from gptoss.ops.reference import ExpertWeights, attention, linear, moe_experts, route, swiglu  # noqa: F401
