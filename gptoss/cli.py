"""The `gptoss` command: synth | inspect (more subcommands register themselves below)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class UsageError(Exception):
    """A bad argument or input: printed as one line, exit status 2."""


def cmd_synth(args) -> None:
    from gptoss.config import ModelConfig
    from gptoss.synth import write_random_checkpoint

    config = ModelConfig.preset(args.preset)
    if args.layers is not None:
        if args.layers < 1:
            raise UsageError("--layers must be at least 1")
        import dataclasses
        config = dataclasses.replace(config, num_hidden_layers=args.layers, layer_types=())
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty; choose a new folder")
    write_random_checkpoint(out, config, seed=args.seed, layout=args.layout, progress=True)
    print(f"wrote a random {args.preset} checkpoint ({config.num_hidden_layers} layers, {args.layout} layout) to {out}")


def cmd_inspect(args) -> None:
    from gptoss.footprint import footprint

    fp = footprint(args.path)
    cfg = fp.config
    counts = cfg.param_counts()
    print(f"model       {fp.folder} ({fp.layout} layout)")
    print(f"layers      {cfg.num_hidden_layers}  experts {cfg.num_experts} (top-{cfg.experts_per_token})  "
          f"hidden {cfg.hidden_size}  intermediate {cfg.intermediate_size}")
    print(f"attention   {cfg.num_attention_heads} query / {cfg.num_key_value_heads} kv heads of {cfg.head_dim}, "
          f"window {cfg.sliding_window} on {cfg.layer_types.count('sliding_attention')} layers, "
          f"context {cfg.context_length}")
    print(f"rope        theta {cfg.rope_theta:g}, YaRN factor {cfg.rope_scaling_factor:g} "
          f"from {cfg.initial_context_length}")
    print(f"vocab       {cfg.vocab_size}")
    print(f"parameters  {counts['total'] / 1e9:.3f} B total, {counts['active'] / 1e9:.3f} B active per token")
    for dtype, nbytes in sorted(fp.bytes_by_dtype.items()):
        print(f"bytes       {dtype:5s} {nbytes / 1e9:8.3f} GB")
    print(f"bytes       total {fp.total_bytes / 1e9:8.3f} GB")
    print(f"per token   {fp.bytes_per_token / 1e9:.3f} GB read per decoded token (batch 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss", description="Run OpenAI's gpt-oss models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a random-weight checkpoint with the real names and shapes")
    p.add_argument("out", help="folder to create")
    p.add_argument("--preset", choices=["tiny", "20b", "120b"], default="tiny")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["hf", "original"], default="hf")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("inspect", help="print a checkpoint's config, sizes and bytes read per token")
    p.add_argument("path", help="model folder")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gptoss.checkpoint import CheckpointError
    from gptoss.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, ConfigError, CheckpointError) as exc:
        print(f"gptoss {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
