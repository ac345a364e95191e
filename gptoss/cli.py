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
    if args.experts != config.expert_format:
        if args.layout == "original":
            raise UsageError("the original layout stores MXFP4 experts only; use --layout hf with --experts float")
        import dataclasses
        config = dataclasses.replace(config, expert_format=args.experts)
    if args.layers is not None:
        if args.layers < 1:
            raise UsageError("--layers must be at least 1")
        import dataclasses
        config = dataclasses.replace(config, num_hidden_layers=args.layers, layer_types=())
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty; choose a new folder")
    write_random_checkpoint(out, config, seed=args.seed, layout=args.layout, progress=True)
    if config.vocab_size == ModelConfig.preset("20b").vocab_size:
        _write_tokenizer(out)
    print(f"wrote a random {args.preset} checkpoint ({config.num_hidden_layers} layers, {args.layout} layout, "
          f"{config.expert_format} experts) to {out}")


def cmd_quantize(args) -> None:
    from gptoss.quantize import checkpoint_bytes, quantize_checkpoint

    out = quantize_checkpoint(args.in_dir, args.out_dir, rule=args.rule, progress=True)
    before, after = checkpoint_bytes(args.in_dir), checkpoint_bytes(out)
    print(f"quantized the experts of {args.in_dir} to MXFP4 ({args.rule} rule) in {out}: "
          f"{before / 1e9:.3f} GB -> {after / 1e9:.3f} GB ({before:,} -> {after:,} bytes)")


def _write_tokenizer(folder: Path) -> None:
    """Ship tokenizer.json like the published checkpoints, so the folder works offline on its own."""
    from gptoss.tokenizer import TokenizerError, write_tokenizer_json

    try:
        write_tokenizer_json(folder)
    except TokenizerError as exc:
        print(f"note: no tokenizer.json written ({exc})", file=sys.stderr)


def resolve_model(args) -> None:
    """args.path <- the positional folder or Hub id, --model, or the built-in demo model when neither
    is given. A Hub id is downloaded here (or found in the Hub cache); `inspect` reads its metadata."""
    if args.path and args.model and Path(args.path) != Path(args.model):
        raise UsageError(f"two models given ({args.path} and --model {args.model}); pass one")
    args.hub_id = None
    if args.path or args.model:
        args.path = args.path or args.model
        from gptoss import hub

        if hub.is_hub_id(args.path):
            args.hub_id = args.path
            if args.command != "inspect":
                args.path = str(hub.resolve(args.hub_id, args.revision))
        elif args.revision is not None:
            raise UsageError(f"--revision applies to a Hub id (owner/name), and {args.path} is a local path")
        return
    if args.revision is not None:
        raise UsageError("--revision applies to a Hub id (owner/name); give one")
    from gptoss.demo import DemoModelError, demo_model_path

    try:
        args.path = str(demo_model_path())
    except DemoModelError as exc:
        raise UsageError(str(exc)) from None


def cmd_download(args) -> None:
    from gptoss import hub

    if not hub.is_hub_id(args.name):
        raise UsageError(f"{args.name} is not a Hub model id (owner/name, e.g. openai/gpt-oss-20b)")
    print(hub.download(args.name, args.revision))


def cmd_inspect(args) -> None:
    from gptoss.footprint import footprint

    if args.hub_id:
        from gptoss.hub import remote_footprint

        fp = remote_footprint(args.hub_id, args.revision)
    else:
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


def cmd_bench(args) -> None:
    import json

    from gptoss.bench import format_result, run_bench

    for name in ("prompt_tokens", "gen_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be at least 1")
    from gptoss.checkpoint import detect_layout

    context = detect_layout(Path(args.path))[2].context_length
    if args.prompt_tokens + args.gen_tokens > context:
        raise UsageError(f"--prompt-tokens {args.prompt_tokens} + --gen-tokens {args.gen_tokens} is more than the "
                         f"model's context of {context} tokens")
    check_parallel(args)
    result = run_bench(args.path, args.prompt_tokens, args.gen_tokens, args.threads, progress=not args.json,
                       dense_int8=args.dense_int8, tensor_parallel_size=args.tensor_parallel_size,
                       expert_parallel=args.expert_parallel, device=args.device,
                       cuda_graphs=False if args.enforce_eager else None, mmap=args.mmap)
    print(json.dumps(result.as_dict()) if args.json else format_result(result))


def _check_sampling(args) -> None:
    """Bad sampling values fail before the model loads."""
    from gptoss.sampling import SamplingParams

    try:
        SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_chat(args) -> int:
    from gptoss.chat_cli import run_chat

    _check_sampling(args)
    check_parallel(args)
    return run_chat(args)


def cmd_generate(args) -> int:
    from gptoss.chat_cli import run_generate
    from gptoss.engine.engine import RequestError

    _check_sampling(args)
    if not args.prompt:
        raise UsageError("--prompt is empty; give the text to continue")
    check_parallel(args)
    try:
        return run_generate(args)
    except RequestError as exc:  # e.g. a prompt longer than the context
        raise UsageError(str(exc)) from None


def check_parallel(args) -> None:
    check_device(args.device)
    if args.tensor_parallel_size < 1:
        raise UsageError(f"--tensor-parallel-size {args.tensor_parallel_size}: give at least 1 (the number of ranks)")
    if args.expert_parallel and args.tensor_parallel_size == 1:
        raise UsageError("--expert-parallel splits the experts over ranks: give --tensor-parallel-size 2 or more")


def check_device(name: str) -> None:
    """A device torch knows and this machine has, or a UsageError saying what to use instead."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a torch device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "has no CUDA support" if torch.version.cuda is None else "sees no GPU"
        raise UsageError(f"--device {name}: this torch ({torch.__version__}) {build}; use --device cpu, or install "
                         f"a CUDA build of torch on a machine with an NVIDIA GPU")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: gptoss runs on cpu or cuda")


def cmd_serve(args) -> None:
    from gptoss.engine.engine import parse_size
    from gptoss.server import build_state, run

    for name in ("max_num_seqs", "port"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.port > 65535:
        raise UsageError(f"--port {args.port}: a TCP port is 1 to 65535")
    check_parallel(args)
    if args.max_queue < 0:
        raise UsageError("--max-queue must be at least 0")
    if not args.shutdown_timeout >= 0:
        raise UsageError("--shutdown-timeout must be at least 0 seconds")
    try:
        parse_size(args.kv_cache_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        state = build_state(args.path, served_model_name=args.served_model_name or args.hub_id,
                            api_key=args.api_key,
                            kv_cache_size=args.kv_cache_size, max_num_seqs=args.max_num_seqs,
                            max_queue=args.max_queue, device=args.device, dense_int8=args.dense_int8,
                            strict_params=args.strict_params, ui=not args.no_ui,
                            tensor_parallel_size=args.tensor_parallel_size, expert_parallel=args.expert_parallel,
                            cuda_graphs=False if args.enforce_eager else None, mmap=args.mmap)
    except ValueError as exc:  # e.g. a KV cache too small for --max-num-seqs
        raise UsageError(str(exc)) from None
    run(state, host=args.host, port=args.port, log_level=args.log_level, shutdown_timeout=args.shutdown_timeout)


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda, cuda:1)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on a GPU, run decode steps eagerly instead of replaying CUDA graphs")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model over N processes (torch.distributed; default 1)")
    p.add_argument("--expert-parallel", action="store_true",
                   help="with -tp N, give each rank whole experts instead of a slice of every expert")
    p.add_argument("--no-mmap", dest="mmap", action="store_false",
                   help="copy the weights into memory instead of reading them from the mapped files (as "
                        "llama.cpp's option): slower to load, needs the whole model in RAM, and its 4 KB pages "
                        "decode slower than the maps' 2 MB ones")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default=None, metavar="MODEL",
                   help="model folder or Hugging Face Hub id such as openai/gpt-oss-20b (default: the demo "
                        "model that ships with gptoss)")
    p.add_argument("--model", default=None, help="the same as the positional MODEL")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub model (default: main)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss", description="Run OpenAI's gpt-oss models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a random-weight checkpoint with the real names and shapes")
    p.add_argument("out", help="folder to create")
    p.add_argument("--preset", choices=["tiny", "20b", "120b"], default="tiny")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["hf", "original"], default="hf")
    p.add_argument("--experts", choices=["mxfp4", "float"], default="mxfp4",
                   help="expert weights as published (mxfp4) or as float matrices (hf layout only)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("quantize", help="turn a float-expert checkpoint into the published MXFP4 layout")
    p.add_argument("in_dir", metavar="IN_DIR", help="Hugging Face folder with float experts (a fine-tune)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to create")
    p.add_argument("--rule", choices=["floor", "ceil"], default="floor",
                   help="MXFP4 scale rule: floor (OCP spec, as OpenAI published; default) or ceil (triton_kernels)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="print a checkpoint's config, sizes and bytes read per token")
    add_model_arguments(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("download", help="fetch a model from the Hugging Face Hub into its cache, without running it")
    p.add_argument("name", metavar="NAME", help="Hub id, e.g. openai/gpt-oss-20b")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("chat", help="talk to a model in the terminal")
    add_model_arguments(p)
    p.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default="medium")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=2048, help="most tokens per answer")
    p.add_argument("--system", default=None, help="system instructions for the conversation")
    p.add_argument("--hide-reasoning", action="store_true", help="do not show the model's reasoning")
    p.add_argument("--dense-int8", action="store_true",
                   help="quantize the attention projections and lm_head to int8 at load (CPU, AVX-512 VNNI)")
    add_parallel_arguments(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="one raw completion of a text prompt")
    add_model_arguments(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dense-int8", action="store_true",
                   help="quantize the attention projections and lm_head to int8 at load (CPU, AVX-512 VNNI)")
    add_parallel_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="measure prefill and decode speed at batch 1")
    add_model_arguments(p)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--dense-int8", action="store_true",
                   help="quantize the attention projections and lm_head to int8 at load (CPU, AVX-512 VNNI)")
    add_parallel_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this key as 'Authorization: Bearer KEY' on /v1")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients use (default: the Hub id or folder name)")
    p.add_argument("--kv-cache-size", default=None, help="KV cache size: tokens (65536) or bytes (4GB, 512MiB)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="most sequences in one batch")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting for a slot; more get 429")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let running requests finish before ending them (default 30)")
    p.add_argument("--no-ui", action="store_true", help="do not serve the chat page at /")
    p.add_argument("--strict-params", action="store_true",
                   help="refuse unknown request fields with 400 (default: ignore them with a logged warning)")
    p.add_argument("--dense-int8", action="store_true",
                   help="quantize the attention projections and lm_head to int8 at load (CPU, AVX-512 VNNI)")
    add_parallel_arguments(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gptoss.checkpoint import CheckpointError
    from gptoss.config import ConfigError
    from gptoss.hub import HubError
    from gptoss.parallel import ParallelError
    from gptoss.tokenizer import TokenizerError

    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "model"):
            resolve_model(args)
        return args.func(args) or 0
    except (UsageError, ConfigError, CheckpointError, TokenizerError, HubError) as exc:
        print(f"gptoss {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ParallelError as exc:  # a rank failed to start or died: say which, no traceback
        print(f"gptoss {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
