"""`gptoss chat` and `gptoss generate`: the terminal front end of gptoss.LLM."""

from __future__ import annotations

import sys

from rich.console import Console

from gptoss.chat import ChatFormatError

EFFORTS = ("low", "medium", "high")
HELP = "commands: /reset (new conversation), /effort low|medium|high, /exit (or Ctrl-D)"


class ChatSession:
    """A conversation with the model; one instance per `gptoss chat`."""

    def __init__(self, llm, console: Console, *, system: str | None, effort: str, hide_reasoning: bool,
                 sampling: dict):
        self.llm, self.console = llm, console
        self.system, self.effort, self.hide_reasoning, self.sampling = system, effort, hide_reasoning, sampling
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def command(self, line: str) -> bool:
        """Handle a /command; False means leave the chat."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.reset()
            self.console.print("[dim](conversation cleared)[/dim]")
        elif name == "/effort" and arg.strip() in EFFORTS:
            self.effort = arg.strip()
            self.console.print(f"[dim](reasoning effort: {self.effort})[/dim]")
        else:
            self.console.print(f"[yellow]unknown command {line!r}[/yellow]; {HELP}")
        return True

    def answer(self, text: str) -> None:
        """Stream the model's answer to `text`; a message the model cannot take (too long, bad
        input) raises and leaves the conversation as it was, so the next message still works."""
        stream = self.llm.chat_stream([*self.messages, {"role": "user", "content": text}],
                                      reasoning_effort=self.effort, **self.sampling)
        self.messages.append({"role": "user", "content": text})
        channel = None
        try:
            for delta in stream:
                if delta.channel == "analysis" and self.hide_reasoning:
                    continue
                if delta.channel != channel and channel is not None:
                    self.console.print()
                channel = delta.channel
                style = "dim italic" if delta.channel == "analysis" else None
                self.console.print(delta.text, end="", style=style, markup=False, highlight=False)
                self.console.file.flush()
        except KeyboardInterrupt:
            stream.close()
            self.console.print("\n[dim](stopped)[/dim]", end="")
        self.console.print()
        result = stream.result
        self.messages.append({"role": "assistant", "content": result.text})
        usage = result.usage
        self.console.print(f"[dim]({usage.completion_tokens} tokens, {usage.reasoning_tokens} reasoning, "
                           f"finish: {result.finish_reason})[/dim]")


def parallel_options(args) -> dict:
    """Where the model runs: --device and the tensor-parallel options."""
    return {"tensor_parallel_size": args.tensor_parallel_size, "expert_parallel": args.expert_parallel,
            "device": args.device, "cuda_graphs": False if args.enforce_eager else None, "mmap": args.mmap}


def run_chat(args) -> int:
    from gptoss.llm import LLM

    console = Console(highlight=False)
    err = Console(stderr=True)
    interactive = sys.stdin.isatty()
    sampling = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    llm = LLM(args.path, progress=True, dense_int8=args.dense_int8, **parallel_options(args))
    session = ChatSession(llm, console, system=args.system, effort=args.reasoning_effort,
                          hide_reasoning=args.hide_reasoning, sampling=sampling)
    if interactive:
        err.print(f"[dim]gptoss chat: {args.path}. {HELP}[/dim]")
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            console.print()
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                break
            continue
        try:
            session.answer(line)
        except (ChatFormatError, ValueError) as exc:
            err.print(f"[red]error:[/red] {exc} [dim](the message was not added to the conversation)[/dim]")
    llm.close()
    return 0


def run_generate(args) -> int:
    from gptoss.llm import LLM

    llm = LLM(args.path, progress=sys.stderr.isatty(), dense_int8=args.dense_int8, **parallel_options(args))
    stream = llm.generate_stream(args.prompt, temperature=args.temperature, max_tokens=args.max_tokens,
                                 seed=args.seed)
    try:
        for delta in stream:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
    sys.stdout.write("\n")
    llm.close()
    return 0
