import os
from pathlib import Path

import pytest

# The o200k vocabulary for tests and CI lies in ../shared/vocab beside the repository.
_SHARED_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "vocab"
if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and (_SHARED_VOCAB / "o200k_base.tiktoken").exists():
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_SHARED_VOCAB)

SHARED_VOCAB = _SHARED_VOCAB

# In CI a kernel build failure must fail the run, not turn the kernel tests into skips.
if os.environ.get("CI"):
    os.environ.setdefault("GPTOSS_REQUIRE_KERNELS", "1")


def pytest_terminal_summary(terminalreporter):
    """Say which CPU kernel paths this machine ran (the others' tests are skipped)."""
    from gptoss.ops import cpu

    if cpu._lib is not None:
        terminalreporter.write_line(f"gptoss CPU kernels ({cpu.library_path()}): paths run here "
                                    f"{cpu.supported_isas()}, default {cpu.isa()}")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-weight HF-layout checkpoint of the `tiny` preset (real vocabulary size)."""
    from gptoss.config import ModelConfig
    from gptoss.synth import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "model", ModelConfig.preset("tiny"), seed=0)
