"""gptoss logits against Hugging Face transformers' GptOssForCausalLM on random checkpoints."""

import dataclasses

import pytest
import torch

from gptoss import Model, ModelConfig
from gptoss.synth import write_random_checkpoint

pytest.importorskip("transformers")  # a test dependency: installed by .ci/run
from hf_reference import hf_model  # noqa: E402

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, head_dim=16, initial_context_length=4096)
CONFIGS = {
    # GQA ratio 1, 4 experts, top-1
    "gqa1-e4-top1": dict(num_hidden_layers=3, num_experts=4, experts_per_token=1, num_attention_heads=4,
                         num_key_value_heads=4, sliding_window=8),
    # GQA ratio 2, 4 experts, top-2
    "gqa2-e4-top2": dict(num_hidden_layers=2, num_experts=4, experts_per_token=2, num_attention_heads=4,
                         num_key_value_heads=2, sliding_window=16),
    # GQA ratio 8 as in gpt-oss, 32 experts, top-4, the real window of 128
    "gqa8-e32-top4": dict(num_hidden_layers=4, num_experts=32, experts_per_token=4, num_attention_heads=8,
                          num_key_value_heads=1, sliding_window=128),
}
TOL = 1e-4


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    config = ModelConfig(**BASE, **CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    write_random_checkpoint(folder / "hf", config, seed=7)
    write_random_checkpoint(folder / "original", config, seed=7, layout="original")
    ours = Model.from_pretrained(folder / "hf", dtype=torch.float32)
    return config, folder, ours, hf_model(folder / "hf")


@pytest.mark.parametrize("start", [0, 4000])  # 4000 + 200 crosses the original context of 4096 (YaRN)
def test_logits_match_transformers(case, start):
    config, _, ours, hf = case
    torch.manual_seed(0)
    length = 2 * config.sliding_window + 37  # longer than the window
    ids = torch.randint(0, config.vocab_size, (2, length))
    positions = torch.arange(start, start + length)[None].expand(2, -1)
    with torch.no_grad():
        expected = hf(ids, position_ids=positions).logits
        got = ours(ids, positions=positions)
    err = (got - expected).abs().max().item()
    print(f"max |gptoss - transformers| = {err:.2e} (start {start})")
    assert err <= TOL


def test_incremental_decoding_matches_full_forward(case):
    config, _, ours, _ = case
    torch.manual_seed(1)
    length = config.sliding_window + 21
    ids = torch.randint(0, config.vocab_size, (2, length))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(batch_size=2)
        prompt = 5
        steps = [ours(ids[:, :prompt], cache)]
        for t in range(prompt, length):
            steps.append(ours(ids[:, t:t + 1], cache))
    err = (torch.cat(steps, dim=1) - full).abs().max().item()
    print(f"max |incremental - full| = {err:.2e}")
    assert err <= TOL
    # Sliding layers hold a ring of `sliding_window` slots, whatever the context length.
    for i, layer in enumerate(cache.layers):
        if config.window_of(i):
            assert layer.capacity == config.sliding_window


def test_chunked_prefill_matches_full_forward(case):
    config, _, ours, _ = case
    ids = torch.randint(0, config.vocab_size, (1, 3 * config.sliding_window))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache()
        cut = config.sliding_window + 3
        chunks = torch.cat([ours(ids[:, :cut], cache), ours(ids[:, cut:], cache)], dim=1)
    assert (chunks - full).abs().max().item() <= TOL


def test_both_layouts_give_identical_logits(case):
    config, folder, ours, _ = case
    original = Model.from_pretrained(folder / "original", dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (1, 50))
    with torch.no_grad():
        assert torch.equal(original(ids), ours(ids))


def test_bfloat16_within_bf16_tolerance_of_float32(case):
    config, folder, ours, _ = case
    bf16 = Model.from_pretrained(folder / "hf", dtype=torch.bfloat16)
    assert bf16.blocks[0].mlp.experts.gate_up_blocks.dtype == torch.uint8  # experts stay MXFP4
    ids = torch.randint(0, config.vocab_size, (1, 60))
    with torch.no_grad():
        ref = ours(ids)
        got = bf16(ids).float()
    # A near tie in the router can pick another expert under bf16 rounding (transformers' bf16
    # path does the same), so judge the typical position, not the worst one.
    per_position = (got - ref).abs().amax(-1).flatten()
    scale = ref.abs().max().item()
    print(f"|bf16 - fp32|: median {per_position.median():.3f}, max {per_position.max():.3f} "
          f"of max |logit| {scale:.2f}")
    assert per_position.median().item() <= 0.03 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_past_4096_uses_yarn_frequencies(case):
    """Sanity check of the peer test itself: positions past the original context change the logits."""
    config, _, ours, _ = case
    ids = torch.randint(0, config.vocab_size, (1, 20))
    with torch.no_grad():
        near = ours(ids, positions=torch.arange(0, 20)[None])
        far = ours(ids, positions=torch.arange(5000, 5020)[None])
    assert not torch.allclose(near, far)


def test_real_shapes_layer_matches_transformers(tmp_path):
    """One layer of the real gpt-oss-20b widths (2880 hidden, 64/8 heads, 32 experts), small vocab."""
    config = dataclasses.replace(ModelConfig.preset("20b"), num_hidden_layers=1, layer_types=(), vocab_size=256)
    write_random_checkpoint(tmp_path / "m", config, seed=3)
    ours = Model.from_pretrained(tmp_path / "m", dtype=torch.float32)
    hf = hf_model(tmp_path / "m")
    ids = torch.randint(0, config.vocab_size, (1, 12))
    with torch.no_grad():
        err = (ours(ids) - hf(ids).logits).abs().max().item()
    print(f"20b-shaped layer: max error {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("window", [0, 4])
def test_layer_cache_never_stores_padding(window):
    """Padding tokens (position -1) take no slot; a chunk longer than the ring keeps its last window."""
    from gptoss.model import LayerCache

    cache = LayerCache(2, window, 1, 2, torch.float32, "cpu")
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, -1, -1, -1]])
    k = torch.arange(12, dtype=torch.float32).reshape(2, 6, 1, 1).expand(2, 6, 1, 2).contiguous()
    keys, _, key_pos, rows = cache.update(k, k.clone(), positions)
    assert rows is None
    stored = sorted(p for p in cache.pos[1].tolist() if p >= 0)
    assert stored == [0, 1, 2]  # row 1's padding wrote nothing
    expected_row0 = [2, 3, 4, 5] if window else [0, 1, 2, 3, 4, 5]
    assert sorted(p for p in cache.pos[0].tolist() if p >= 0) == expected_row0
    for r in range(2):
        for slot, p in enumerate(cache.pos[r].tolist()):
            if p >= 0:
                assert cache.k[r, slot, 0, 0].item() == k[r, p, 0, 0].item()
