"""Continuous batching: which sequences run in the next model step, and with how many tokens.

Every step has a token budget. Running sequences come first, oldest first (a decode costs one
token, an unfinished prefill continues in chunks); then waiting requests are admitted while the
budget, the sequence limit and the KV cache allow. Long prompts are cut into chunks, so they
share steps with decodes instead of stalling them. When the cache runs out, the newest running
sequence is preempted: its blocks are released (complete pages stay in the prefix cache) and it
goes back to the front of the queue, to be recomputed when there is room.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from gptoss.engine.kv_cache import KVCacheManager
from gptoss.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens fed to the model in this step

    @property
    def samples(self) -> bool:
        """True when the step reaches the end of the known tokens, so a new token is sampled."""
        return self.seq.num_computed + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int = 32, max_batched_tokens: int = 512):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.kv.free(seq)
                    seq.finish("abort")
                    return seq
        return None

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_batched_tokens
        batch: list[ScheduledSeq] = []
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            num = min(seq.num_uncomputed, budget)
            while not self.kv.reserve(seq, num):
                scheduled = {id(s.seq) for s in batch}
                victims = [s for s in self.running if s is not seq and id(s) not in scheduled]
                victim = max(victims, key=lambda s: s.arrival) if victims else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.append(ScheduledSeq(seq, num))
                budget -= num
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.kv.admit(seq)
            num = min(seq.num_uncomputed, budget)
            if not self.kv.reserve(seq, num):
                self.kv.free(seq)
                seq.num_computed = 0
                break
            if seq.num_cached_prompt_tokens == 0 and not seq.output_token_ids:
                seq.num_cached_prompt_tokens = seq.num_computed
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, num))
            budget -= num
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish_step(self, batch: list[ScheduledSeq], sampled: dict[int, int]) -> list[Sequence]:
        """Advance each scheduled sequence; `sampled` maps id(seq) -> new token. Returns the finished."""
        finished = []
        for item in batch:
            seq = item.seq
            if seq.status is not Status.RUNNING:  # aborted during the step
                continue
            seq.num_computed += item.num_tokens
            self.kv.commit(seq)
            if id(seq) in sampled:
                seq.append_token(sampled[id(seq)])
            if seq.is_finished:
                self.running.remove(seq)
                self.kv.free(seq)
                finished.append(seq)
        return finished
