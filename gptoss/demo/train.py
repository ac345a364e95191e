"""Train the demo model: a small gpt-oss on synthetic harmony conversations, on a laptop CPU.

    python -m gptoss.demo.train OUT_DIR [--steps N] [--seed S]

The model is `gptoss.model.Model` itself, with float experts, trained through the reference ops
(autograd). Only the ~6k token ids the data uses get rows: training runs on a compact vocabulary
whose row 0 stands for every other id and stays exactly zero, so the full-vocabulary softmax is
the used rows' logits plus a constant term, log(number of unused ids) (their logits are 0).
Exported, the unused rows are zero, and sampling at temperature 1 puts little mass on them.

It checkpoints every few minutes to OUT_DIR/train_state.pt and resumes from there when run
again; batches are drawn from (seed, step), so a resumed run continues the same data. At the
end it writes OUT_DIR/float (Hugging Face layout, float experts), quantizes the experts into
OUT_DIR/mxfp4 with `gptoss quantize`, and evaluates both (`gptoss.demo.evaluate`).

The shipped model is two runs (README "The demo model"): the defaults, then `--init-from` that
model with lookup drills, which teach a trained model in ~100 steps what the mixture alone never did.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from gptoss import ops

from gptoss.config import ModelConfig
from gptoss.demo.data import ConversationGenerator, Example, copy_example, drill_example

# The exact gpt-oss architecture, small: alternating 128-token window / full attention with sinks,
# YaRN RoPE (theta 150000, factor 32 from 4096), GQA, top-k routing, clamped SwiGLU experts, the
# real o200k_harmony vocabulary.
DEMO_CONFIG = ModelConfig(num_hidden_layers=4, num_experts=4, experts_per_token=2, hidden_size=128,
                          intermediate_size=128, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                          sliding_window=128, expert_format="float")
POOL = 8  # batches drawn together and sorted by length, so padding stays small
# A quarter of the sequences are digit drills (data.drill_example), from the first step: without
# them the model learned everything but spelling number tokens into digits, which two spellings per
# problem teach too slowly (69% of spelled tokens right at step 1,500 of the first run).
DRILL_FROM_STEP = 0
DRILL_SHARE = 0.25
# Options for the tool calls' verb lookup, off by default (the shipped model was trained without
# them; docs/demo-training.md has what each did): lookup drills in the mixture (`lookup_share`,
# data.ConversationGenerator.lookup_drill), and two stages before it. First only copies of random
# runs over a few ids (data.copy_example) until the model copies them, since the induction head
# this grows is what a lookup is made of; how long that takes varies from run to run (700 to 1,400
# steps), so the stage ends on the copy's accuracy. Then `drill_steps` of lookup drills only, two
# task families each: with 4-6 families as well the verb was still at 12% after 330 steps, with
# two it was 94% after 330.
COPY_IDS = 200
COPY_WINDOW = 25  # steps over which the copy's accuracy is averaged


@dataclasses.dataclass
class TrainConfig:
    out: Path
    seed: int = 1234
    steps: int = 4400  # of the mixture, after the copy and drill stages
    max_copy_steps: int = 0  # 0: no copy stage
    copy_until: float = 0.5  # the copy stage ends when this share of the repeats is right
    drill_steps: int = 0
    lookup_share: float = 0.0  # of the mixture's sequences
    reasoning: str = "call"  # before a tool call: "call" (`Call NAME with ...`) or "noun" (`fn_NOUN NAME with ...`)
    init_from: Path | None = None  # a trained model folder to start from, instead of random weights
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 150
    weight_decay: float = 0.05
    threads: int | None = None
    checkpoint_seconds: float = 180.0
    log_every: int = 25
    probe_every: int = 300
    vocab_examples: int = 40_000
    evaluate: bool = True
    compile: bool = True
    export_only: bool = False


def _encodings():
    from gptoss.tokenizer import harmony_encoding, tiktoken_encoding
    return harmony_encoding(), tiktoken_encoding()


# -- the compact vocabulary ------------------------------------------------------------------------

def used_token_ids(generator: ConversationGenerator, seed: int, count: int, drills: bool = False) -> list[int]:
    """Every id the training data can contain: drawn from `count` conversations, plus all numbers."""
    rng = random.Random(f"{seed}-vocab")
    used: set[int] = set()
    for _ in range(count):
        used.update(generator.example(rng).tokens)
    for _ in range(count // 10 if drills else 0):
        used.update(generator.lookup_drill(rng).tokens)
    for n in range(1000):
        for text in (str(n), f" {n}"):
            used.update(generator.text.encode(text))
    return sorted(used)


class CompactVocab:
    """Token id <-> row of the training model; row 0 is every id the data never uses."""

    def __init__(self, ids: list[int], vocab_size: int):
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.row_of = torch.zeros(vocab_size, dtype=torch.long)
        self.row_of[self.ids] = torch.arange(1, len(ids) + 1)
        self.unused = vocab_size - len(ids)

    @property
    def rows(self) -> int:
        return len(self.ids) + 1


# -- batches -------------------------------------------------------------------------------------

def copy_ids(vocab: CompactVocab, seed: int) -> list[int]:
    """The few token ids the copy stage repeats (as vocabulary ids, like every Example)."""
    return random.Random(f"{seed}-copy").sample(vocab.ids.tolist(), min(COPY_IDS, len(vocab.ids)))


def draw_pool(generator: ConversationGenerator, config: TrainConfig, pool_index: int) -> list[list[Example]]:
    """The POOL batches of steps pool_index * POOL ..., of similar lengths each, in shuffled order."""
    rng = random.Random(f"{config.seed}-pool-{pool_index}")
    drills = pool_index * POOL >= DRILL_FROM_STEP

    def draw() -> Example:
        roll = rng.random()
        if drills and roll < DRILL_SHARE:
            return drill_example(generator.text, rng)
        if roll < DRILL_SHARE + config.lookup_share:
            return generator.lookup_drill(rng)
        return generator.example(rng)

    pool = sorted((draw() for _ in range(POOL * config.batch_size)), key=lambda e: len(e.tokens))
    batches = [pool[i * config.batch_size:(i + 1) * config.batch_size] for i in range(POOL)]
    rng.shuffle(batches)
    return batches


class Batches:
    """(inputs [B, T], targets [B, T], loss mask [B, T]) of compact rows for each step, deterministic
    in (seed, step). A pool is rendered once for its POOL steps: rendering is a quarter of a step."""

    def __init__(self, generator: ConversationGenerator, config: TrainConfig, vocab: CompactVocab):
        self.generator, self.config, self.vocab = generator, config, vocab
        self.copy_from = copy_ids(vocab, config.seed)
        self._pool_index, self._pool = -1, []

    def copy(self, step: int):
        rng = random.Random(f"{self.config.seed}-copy-{step}")
        return collate([copy_example(self.copy_from, rng) for _ in range(self.config.batch_size)], self.vocab)

    def drills(self, step: int):
        rng = random.Random(f"{self.config.seed}-drill-{step}")
        return collate([self.generator.lookup_drill(rng, families=2) for _ in range(self.config.batch_size)],
                       self.vocab)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mixture's batch for `step`."""
        pool_index, slot = divmod(step, POOL)
        if pool_index != self._pool_index:
            self._pool_index, self._pool = pool_index, draw_pool(self.generator, self.config, pool_index)
        return collate(self._pool[slot], self.vocab)


def collate(examples: list[Example], vocab: CompactVocab):
    width = max(len(e.tokens) for e in examples) - 1
    inputs = torch.zeros(len(examples), width, dtype=torch.long)
    targets = torch.zeros_like(inputs)
    mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        rows = vocab.row_of[torch.tensor(e.tokens)]
        n = len(e.tokens) - 1
        inputs[i, :n], targets[i, :n] = rows[:-1], rows[1:]
        mask[i, :n] = torch.tensor(e.targets[1:])
    return inputs, targets, mask & (targets > 0)  # an id outside the vocabulary is never a target


# -- the model -----------------------------------------------------------------------------------

def new_model(vocab: CompactVocab, seed: int):
    from gptoss.model import Model, yarn_inv_freq

    config = dataclasses.replace(DEMO_CONFIG, vocab_size=vocab.rows)
    torch.manual_seed(seed)
    model = Model(config)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    with torch.no_grad():
        model.rotary.inv_freq.copy_(yarn_inv_freq(config)[0])
        # Small: the digits of a number token are learned into its row, and must not drown in noise.
        model.embedding.weight.normal_(0, h ** -0.5)
        for block in model.blocks:
            block.attn.o_proj.weight.mul_(1 / math.sqrt(2 * layers))
            block.mlp.router.weight.normal_(0, 0.02)
            block.mlp.router.bias.zero_()
            experts = block.mlp.experts
            experts.gate_up_proj.normal_(0, h ** -0.5)
            experts.down_proj.normal_(0, i ** -0.5 / math.sqrt(2 * layers))
        model.lm_head.weight.normal_(0, h ** -0.5)
        _zero_unused_rows(model)
    return model


def load_start(folder: Path):
    """A model folder to start training from (`--init-from`), in float32; the demo's architecture
    or a one-line error."""
    from gptoss.model import Model

    source = Model.from_pretrained(folder, dtype=torch.float32)
    want = {k: v for k, v in dataclasses.asdict(DEMO_CONFIG).items() if k != "expert_format"}
    have = {k: v for k, v in dataclasses.asdict(source.config).items() if k != "expert_format"}
    if want != have:
        wrong = sorted(k for k in want if want[k] != have.get(k))
        raise SystemExit(f"--init-from {folder}: not the demo model's architecture ({', '.join(wrong)} differ); "
                         f"start from a folder this script wrote")
    return source


def trained_token_ids(source) -> list[int]:
    """The ids whose embedding row is not zero: the rows the source model's training used."""
    return torch.nonzero(source.embedding.weight.detach().abs().sum(-1)).flatten().tolist()


def load_trained(model, vocab: CompactVocab, source) -> None:
    """Copy a loaded model's weights (float or MXFP4 experts) into a training model.

    MXFP4 experts are dequantized to float: training goes on from exactly what the folder runs.
    Ids of the vocabulary the source never trained start at zero, as unused rows are stored."""
    weights = source.state_dict()
    with torch.no_grad():
        for name, weight in model.state_dict().items():
            if name in ("embedding.weight", "lm_head.weight"):
                weight[1:] = weights[name][vocab.ids]
            elif name != "rotary.inv_freq" and not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                weight.copy_(weights[name])
        for block, source_block in zip(model.blocks, source.blocks):
            experts = source_block.mlp.experts.weights()
            # ExpertWeights.matrices gives [out, in] per expert; the training layout is [E, in, out]
            matrices = [experts.matrices(e, torch.float32) for e in range(experts.num_experts)]
            block.mlp.experts.gate_up_proj.copy_(torch.stack([gate_up.T for gate_up, _ in matrices]))
            block.mlp.experts.down_proj.copy_(torch.stack([down.T for _, down in matrices]))
        _zero_unused_rows(model)


def _zero_unused_rows(model) -> None:
    model.embedding.weight.data[0].zero_()
    model.lm_head.weight.data[0].zero_()


def loss_fn(model, vocab: CompactVocab, inputs, targets, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the full vocabulary on the trained tokens, and which were argmax-right."""
    hidden = model.hidden_states(inputs)[mask]
    logits = model.lm_head(model.norm(hidden))
    offset = torch.zeros(logits.shape[-1])
    offset[0] = math.log(vocab.unused)  # row 0's logit (0) stands for `unused` ids with logit 0
    logits = logits + offset
    wanted = targets[mask]
    return torch.nn.functional.cross_entropy(logits, wanted), logits.argmax(-1) == wanted


def compiled_loss(config: TrainConfig):
    """`loss_fn` through torch.compile: fusing the reference ops' elementwise work makes a step
    1.3x faster on a 2-core CPU, for about a minute of compiling at the start. Where compiling
    fails (no C++ compiler), training goes on uncompiled after one line saying so."""
    if not config.compile:
        return loss_fn
    compiled = torch.compile(loss_fn, dynamic=True)

    def run(*args):
        nonlocal compiled
        try:
            return compiled(*args)
        except Exception as error:  # torch._dynamo wraps compiler failures in several types
            if compiled is loss_fn:
                raise
            print(f"torch.compile failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                  f"training uncompiled (about 1.3x slower; --no-compile skips the attempt)", flush=True)
            compiled = loss_fn
            return loss_fn(*args)
    return run


EMBEDDING_LR_SCALE = 3.0  # a number token's row is updated only when it occurs: let it move faster


def make_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    named = dict(model.named_parameters())
    embedding = [named.pop("embedding.weight")]
    decay = [p for p in named.values() if p.dim() >= 2]
    rest = [p for p in named.values() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay, "lr_scale": 1.0},
                              {"params": rest, "weight_decay": 0.0, "lr_scale": 1.0},
                              {"params": embedding, "weight_decay": 0.0, "lr_scale": EMBEDDING_LR_SCALE}],
                             lr=config.lr, betas=(0.9, 0.98))


def learning_rate(config: TrainConfig, step: int, mixture_start: int | None) -> float:
    """Warmup, the peak through the stages (mixture_start None: not known yet), then a cosine to
    min_lr over the mixture's steps."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if mixture_start is None or step < mixture_start:
        return config.lr
    start = max(mixture_start, config.warmup)
    progress = (step - start) / max(1, mixture_start + config.steps - start)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# -- probes: teacher-forced exactness on held-out conversations -------------------------------------

@torch.no_grad()
def probe(model, vocab: CompactVocab, generator: ConversationGenerator, seed: int, count: int = 48) -> dict:
    """Share of held-out conversations whose every trained token is the argmax (then greedy
    decoding reproduces them exactly), per kind; and "verb": the share of verbs right in held-out
    two-family lookup drills (a favourite verb scores 0.5)."""
    rng = random.Random(f"{seed}-probe")
    cases = {"add": [], "sub": [], "tool": [], "other": []}
    while min(len(v) for v in cases.values()) < count:
        example = generator.example(rng)
        if len(cases[example.kind]) < count:
            cases[example.kind].append(example)
    model.eval()
    result = {}
    def right_tokens(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """(which next tokens the model's argmax gets right, the loss mask), never row 0."""
        inputs, targets, mask = collate(examples, vocab)
        logits = model.lm_head(model.norm(model.hidden_states(inputs)))
        logits[..., 0] = float("-inf")
        return logits.argmax(-1) == targets, mask

    for kind, examples in cases.items():
        right = 0
        for start in range(0, len(examples), 16):
            correct, mask = right_tokens(examples[start:start + 16])
            right += int((correct | ~mask).all(-1).sum())
        result[kind] = right / len(examples)
    drills = [generator.lookup_drill(rng, families=2) for _ in range(count // 2)]
    correct, mask = right_tokens(drills)
    verbs = torch.zeros_like(mask)
    for i, drill in enumerate(drills):
        verbs[i, [v - 1 for v in drill.meta["verbs"]]] = True  # position v - 1 predicts token v
    result["verb"] = float(correct[verbs].float().mean())
    model.train()
    return result


# -- checkpoints ---------------------------------------------------------------------------------

def save_state(path: Path, model, optimizer, step: int, vocab: CompactVocab, elapsed: float,
               copy_end: int | None) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "vocab_ids": vocab.ids.tolist(), "elapsed": elapsed, "copy_end": copy_end}, tmp)
    os.replace(tmp, path)


def export_float(model, vocab: CompactVocab, out: Path, dtype=torch.bfloat16) -> Path:
    """The trained model as a Hugging Face folder with float experts and the full vocabulary."""
    from gptoss.checkpoint import HF, ShardedWriter, to_checkpoint_tensors, write_generation_config
    from gptoss.tokenizer import write_tokenizer_json

    config = dataclasses.replace(DEMO_CONFIG)
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items() if k != "rotary.inv_freq"}
    for name in ("embedding.weight", "lm_head.weight"):
        full = torch.zeros(config.vocab_size, config.hidden_size, dtype=dtype)
        full[vocab.ids] = state[name][1:]
        state[name] = full
    writer = ShardedWriter(out, num_shards=1)
    writer.write_shard(to_checkpoint_tensors(state, HF, config))
    writer.finish()
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    write_generation_config(out, config)
    write_tokenizer_json(out)
    return out


# -- the loop ------------------------------------------------------------------------------------

def train(config: TrainConfig) -> Path:
    # Denormal floats flushed to zero, before the thread pool starts (its threads inherit the mode):
    # once the model is sure of itself, Adam's moments of rare tokens' rows fill with denormals
    # (24,514 in the embedding's first moment at step 757; the softmax's gradients likely add more,
    # not counted), each a slow microcode assist on the CPU. A hidden-256 run's
    # steps slowed from 1.0 to 1.8 s over its first 800 steps, and were 1.1 s again once resumed
    # with this; the same steps of its last state: 1.6-1.8x faster (docs/demo-training.md).
    torch.set_flush_denormal(True)
    ops.use("reference")  # autograd runs through the plain-torch twins
    if config.threads:
        torch.set_num_threads(config.threads)
    config.out.mkdir(parents=True, exist_ok=True)
    encoding, text_encoding = _encodings()
    if config.reasoning not in ("call", "noun"):
        raise SystemExit(f"--reasoning is 'call' or 'noun', not {config.reasoning!r}")
    generator = ConversationGenerator(encoding, text_encoding, "train", reasoning=config.reasoning)
    heldout = ConversationGenerator(encoding, text_encoding, "eval", reasoning=config.reasoning)
    state_path = config.out / "train_state.pt"
    state = torch.load(state_path, weights_only=False) if state_path.exists() else None
    if state is not None:
        ids = state["vocab_ids"]
        print(f"resuming from step {state['step']} ({state['elapsed'] / 60:.1f} min trained)", flush=True)
    else:
        start = load_start(config.init_from) if config.init_from else None  # a wrong folder fails first
        t = time.perf_counter()
        ids = used_token_ids(generator, config.seed, config.vocab_examples,
                             drills=config.drill_steps > 0 or config.lookup_share > 0)
        if start is not None:  # every row the starting model trained keeps its weights
            ids = sorted(set(ids) | set(trained_token_ids(start)))
        print(f"vocabulary: {len(ids)} token ids used by the data ({time.perf_counter() - t:.0f} s)", flush=True)
    vocab = CompactVocab(ids, DEMO_CONFIG.vocab_size)
    model = new_model(vocab, config.seed)
    if config.init_from and state is None:
        load_trained(model, vocab, start)
        print(f"starting from the model in {config.init_from}", flush=True)
    optimizer = make_optimizer(model, config)
    step, elapsed, copy_end = 0, 0.0, (0 if config.max_copy_steps == 0 else None)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, copy_end = state["step"], state["elapsed"], state.get("copy_end", 0)
    if config.export_only:
        if state is None:
            raise SystemExit(f"--export-only: no {state_path} to export")
        return finish(model, vocab, config, elapsed / 60, copy_end)
    counts = model.config.param_counts()
    print(f"model: {counts['total'] / 1e6:.2f} M parameters in training ({counts['active'] / 1e6:.2f} M active); "
          f"{config.batch_size} sequences a step"
          + (f"; copies until {config.copy_until:.0%} right (at most {config.max_copy_steps} steps)"
             if config.max_copy_steps else "")
          + (f"; {config.drill_steps} steps of lookup drills" if config.drill_steps else "")
          + f"; {config.steps} steps of the mixture", flush=True)

    batches = Batches(generator, config, vocab)
    step_loss = compiled_loss(config)
    model.train()
    started, last_save = time.perf_counter() - elapsed, time.perf_counter()
    window_loss, window_tokens, window_right = 0.0, 0, 0
    copied: list[float] = []  # the copy's accuracy, last COPY_WINDOW steps

    def stages_end() -> int | None:
        return None if copy_end is None else copy_end + config.drill_steps

    def total() -> int | None:
        return None if copy_end is None else stages_end() + config.steps

    while copy_end is None or step < total():
        if copy_end is None:
            inputs, targets, mask = batches.copy(step)
        elif step < stages_end():
            inputs, targets, mask = batches.drills(step)
        else:
            inputs, targets, mask = batches[step]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, stages_end()) * group["lr_scale"]
        loss, right = step_loss(model, vocab, inputs, targets, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.embedding.weight.grad[0].zero_()
        model.lm_head.weight.grad[0].zero_()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        _zero_unused_rows(model)
        step += 1
        window_loss += loss.item() * len(right)
        window_tokens += len(right)
        window_right += int(right.sum())
        now = time.perf_counter()
        if copy_end is None:
            copied = (copied + [float(right.float().mean())])[-COPY_WINDOW:]
            if (len(copied) == COPY_WINDOW and sum(copied) / COPY_WINDOW >= config.copy_until) \
                    or step >= config.max_copy_steps:
                copy_end = step
                print(f"copy stage done at step {step}: {sum(copied) / len(copied):.0%} of the repeats right over "
                      f"the last {len(copied)} steps; {config.drill_steps} steps of lookup drills next", flush=True)
        if step % config.log_every == 0 or step == total():
            print(f"step {step:5d}  loss {window_loss / window_tokens:.4f}  token acc "
                  f"{window_right / window_tokens:.4f}  lr {learning_rate(config, step - 1, stages_end()):.2e}  "
                  f"{(now - started) / 60:5.1f} min", flush=True)
            window_loss, window_tokens, window_right = 0.0, 0, 0
        if step % config.probe_every == 0 or step == total():
            scores = probe(model, vocab, heldout, config.seed)
            print("probe (held-out, teacher-forced exact): " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()),
                  flush=True)
        if now - last_save > config.checkpoint_seconds or step == total():
            save_state(state_path, model, optimizer, step, vocab, now - started, copy_end)
            last_save = now
    minutes = (time.perf_counter() - started) / 60
    print(f"trained {step} steps in {minutes:.1f} min", flush=True)
    return finish(model, vocab, config, minutes, copy_end)


def finish(model, vocab: CompactVocab, config: TrainConfig, minutes: float, copy_end: int | None) -> Path:
    """Export the float folder, quantize it to MXFP4, evaluate both."""
    import shutil

    from gptoss.quantize import quantize_checkpoint

    float_dir, mxfp4_dir = config.out / "float", config.out / "mxfp4"
    for folder in (float_dir, mxfp4_dir):
        if folder.exists():
            shutil.rmtree(folder)
    export_float(model, vocab, float_dir)
    quantize_checkpoint(float_dir, mxfp4_dir, progress=False)
    info = {"seed": config.seed, "steps": config.steps, "copy_steps": copy_end, "drill_steps": config.drill_steps,
            "lookup_share": config.lookup_share, "reasoning": config.reasoning, "batch_size": config.batch_size,
            "init_from": str(config.init_from) if config.init_from else None, "lr": config.lr,
            "warmup": config.warmup,
            "training_minutes": round(minutes, 1), "vocab_rows_used": len(vocab.ids)}
    (config.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {float_dir} and {mxfp4_dir}", flush=True)
    if config.evaluate:
        ops.use(None)  # evaluate as users run it, on the kernels
        from gptoss.demo.evaluate import evaluate, format_report

        reports = {name: evaluate(folder) for name, folder in (("float", float_dir), ("mxfp4", mxfp4_dir))}
        print(format_report(reports), flush=True)
        (config.out / "evaluation.json").write_text(json.dumps(reports, indent=2) + "\n")
    return mxfp4_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptoss.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for checkpoints and the trained model")
    defaults = TrainConfig(out=Path("."))
    for name in ("seed", "steps", "max_copy_steps", "drill_steps", "batch_size", "threads", "vocab_examples", "log_every", "probe_every"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "min_lr", "copy_until", "lookup_share", "checkpoint_seconds"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--reasoning", choices=("call", "noun"), default=defaults.reasoning,
                        help="the reasoning before a tool call: 'Call NAME with ...' or 'fn_NOUN NAME with ...'")
    parser.add_argument("--init-from", type=Path, default=None, metavar="FOLDER",
                        help="start from a model folder this script wrote (float or MXFP4 experts) instead of "
                             "random weights; 'demo' is the shipped demo model")
    parser.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip the final evaluation")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="run the training step uncompiled (no torch.compile start-up minute, 1.3x slower steps)")
    parser.add_argument("--export-only", action="store_true",
                        help="write the float and MXFP4 folders from the last checkpoint, without training")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.max_copy_steps < 0 or args.drill_steps < 0:
        parser.error("--steps and --batch-size must be at least 1, --max-copy-steps and --drill-steps at least 0")
    if not 0 <= args.lookup_share <= 1 - DRILL_SHARE:
        parser.error(f"--lookup-share is a share of the mixture from 0 to {1 - DRILL_SHARE}")
    if args.init_from is not None:
        if str(args.init_from) == "demo":
            from gptoss.demo import demo_model_path
            args.init_from = demo_model_path()
        if not (args.init_from / "config.json").is_file():
            parser.error(f"--init-from {args.init_from}: no config.json there; give a model folder this script "
                         f"wrote (OUT/float or OUT/mxfp4), or 'demo'")
    config = TrainConfig(**vars(args))
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
