"""Bytes read per decoded token: DESIGN.md §1 gives 3.708 GB (20b) and 5.003 GB (120b)."""

import dataclasses

from gptoss import ModelConfig
from gptoss.checkpoint import CheckpointReader
from gptoss.footprint import bytes_read_per_token, footprint
from gptoss.synth import write_random_checkpoint


class _MetaReader:
    """Header facts only, computed from the shapes: no 13.8 GB file needed."""

    def __init__(self, entries):
        self.entries = entries


def _entries_for(config, layout="hf"):
    import torch
    from gptoss.checkpoint import TensorEntry, checkpoint_key
    from gptoss.footprint import parameter_names
    from gptoss.model import Model

    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in Model(config).state_dict().items()}
    entries = {}
    for name in parameter_names(config):
        ref = checkpoint_key(name, layout, config)
        shape, dtype = shapes[name]
        dtype = torch.uint8 if dtype == torch.uint8 else torch.bfloat16
        rows = config.q_dim + 2 * config.kv_dim if ref.rows else shape[0]
        full = (rows, *shape[1:]) if len(shape) else shape
        n = 1
        for s in full:
            n *= s
        entries[ref.key] = TensorEntry(None, dtype, tuple(full), 0, n * (1 if dtype == torch.uint8 else 2))
    return entries


def test_bytes_per_token_of_the_published_models():
    for preset, expected in (("20b", 3.708), ("120b", 5.003)):
        config = ModelConfig.preset(preset)
        for layout in ("hf", "original"):
            got = bytes_read_per_token(config, _MetaReader(_entries_for(config, layout)), layout)
            assert round(got / 1e9, 3) == expected, (preset, layout, got)


def test_footprint_of_a_written_checkpoint(tmp_path):
    config = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=1024)
    write_random_checkpoint(tmp_path / "m", config)
    fp = footprint(tmp_path / "m")
    reader = CheckpointReader(tmp_path / "m")
    assert fp.total_bytes == sum(e.nbytes for e in reader.entries.values())
    assert set(fp.bytes_by_dtype) == {"BF16", "U8"}
    assert 0 < fp.bytes_per_token < fp.total_bytes
