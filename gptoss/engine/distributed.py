"""Several ranks for one model: starting them, feeding them steps, and failing cleanly.

Rank 0 is the process the user started: it loads its shard, schedules, samples and serves. On
one machine it starts ranks 1..N-1 itself (`python -m gptoss.engine.distributed`, one process
each, gloo on CPU with each rank pinned to its share of the cores, NCCL on CUDA). Across
machines, torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) runs the same
command everywhere, and the processes with RANK > 0 become workers.

Each step rank 0 broadcasts the step's ForwardBatch; every rank runs the same forward, whose
collectives (gptoss.parallel) time out after GPTOSS_STEP_TIMEOUT seconds (15). While idle,
rank 0 sends a heartbeat every few seconds, so a worker that hears nothing knows rank 0 is gone.
A rank that dies or hangs turns into a ParallelError on rank 0 that names it; rank 0 then stops
the other workers, so no process is left behind.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gptoss import parallel
from gptoss.parallel import ParallelError, Shard

log = logging.getLogger("gptoss")

HEARTBEAT_SECONDS = 3.0
SPEC_ENV = "GPTOSS_WORKER_SPEC"


@dataclass(frozen=True)
class LoadSpec:
    """What every rank loads: the same on all of them, sent to workers as JSON."""

    path: str
    world_size: int
    expert_parallel: bool = False
    device: str = "cpu"
    dtype: str = "bfloat16"
    dense_int8: bool = False
    mmap: bool = True

    def load(self, rank: int, progress: bool = False):
        from gptoss.model import Model

        device = self.device
        if device.startswith("cuda") and self.world_size > 1:
            device = f"cuda:{rank % torch.cuda.device_count()}"
            torch.cuda.set_device(device)
        return Model.from_pretrained(self.path, device=device, dtype=getattr(torch, self.dtype), progress=progress,
                                     dense_int8=self.dense_int8, mmap=self.mmap,
                                     shard=Shard(rank, self.world_size, self.expert_parallel))


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _pin(device: str, rank: int, world: int) -> None:
    """CPU ranks of one machine share its cores (under torchrun: the ranks of this node)."""
    if device.startswith("cuda"):
        return
    if "LOCAL_RANK" in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    parallel.pin_threads(rank, world)


def _torchrun_rank() -> int | None:
    """This process's rank when a launcher (torchrun) set the environment, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"])
    return None


def load_model(path, *, tensor_parallel_size: int = 1, expert_parallel: bool = False, device: str = "cpu",
               dtype: torch.dtype = torch.bfloat16, dense_int8: bool = False, progress: bool = False,
               mmap: bool = True):
    """The model on rank 0: the whole of it when tensor_parallel_size is 1, else rank 0's shard,
    with the other ranks started and attached as `model.ranks`. Under torchrun, a process with
    RANK > 0 serves steps here and exits when rank 0 stops."""
    from gptoss.model import Model

    if tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, not {tensor_parallel_size}")
    if tensor_parallel_size == 1:
        if expert_parallel:
            log.warning("--expert-parallel does nothing with one rank")
        return Model.from_pretrained(path, device=device, dtype=dtype, progress=progress, dense_int8=dense_int8,
                                     mmap=mmap)
    spec = LoadSpec(str(path), tensor_parallel_size, expert_parallel, device, str(dtype).removeprefix("torch."),
                    dense_int8, mmap)
    launched = _torchrun_rank()
    if launched is not None:
        if int(os.environ["WORLD_SIZE"]) != tensor_parallel_size:
            raise ParallelError(f"--tensor-parallel-size {tensor_parallel_size} but the launcher started "
                                f"WORLD_SIZE={os.environ['WORLD_SIZE']} processes: give the same number to both")
        if launched > 0:
            sys.exit(run_worker(spec, launched))
        workers = None
    else:
        workers = _start_local_workers(spec)
    try:
        parallel.init(0, tensor_parallel_size, backend=_backend(device),
                      init_method=f"tcp://127.0.0.1:{workers.port}" if workers else "env://")
        _pin(device, 0, tensor_parallel_size)
        model = spec.load(0, progress)
        parallel.ready()
    except BaseException as exc:
        why = workers.exited() if workers else []
        if workers:
            workers.kill()
        parallel.shutdown()
        if why and isinstance(exc, ParallelError):
            raise ParallelError(f"tensor parallelism could not start: {'; '.join(why)} (its message is above)") from None
        raise
    model.ranks = Ranks(workers)
    return model


# -- rank 0's side ---------------------------------------------------------------------------------

class LocalWorkers:
    """The worker processes rank 0 started on this machine."""

    def __init__(self, procs: list[subprocess.Popen], port: int):
        self.procs, self.port = procs, port
        atexit.register(self.kill)

    def exited(self) -> list[str]:
        """Why each worker that is not running any more stopped (or is stopped)."""
        found = []
        for rank, proc in enumerate(self.procs, start=1):
            code = proc.poll()
            if code is not None:
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                found.append(f"rank {rank} {how}")
            elif _stopped(proc.pid):
                found.append(f"rank {rank} is stopped (SIGSTOP) and does not answer")
        return found

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (for rank 0's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_local_workers(spec: LoadSpec) -> LocalWorkers:
    port = free_port()
    procs = []
    for rank in range(1, spec.world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(spec.world_size), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), **{SPEC_ENV: json.dumps(spec.__dict__)})
        procs.append(subprocess.Popen([sys.executable, "-m", "gptoss.engine.distributed"], env=env,
                                      stdin=subprocess.DEVNULL, start_new_session=False))
    return LocalWorkers(procs, port)


class Ranks:
    """Rank 0's handle on the others: sends each step (under a lock shared with the heartbeat),
    and turns any failure into one ParallelError that says which rank and why."""

    def __init__(self, workers: LocalWorkers | None):
        self.workers = workers
        self.failure: ParallelError | None = None
        self._done = False
        self._last_sent = time.monotonic()
        self._closed = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="gptoss-heartbeat", daemon=True)
        self._heartbeat.start()
        atexit.register(self.close)

    @property
    def world_size(self) -> int:
        return parallel.world_size()

    def send(self, command) -> None:
        """Broadcast a step's batch (the caller then runs the forward, under `parallel.lock()`)."""
        self.check()
        try:
            parallel.broadcast(command)
        except ParallelError as exc:
            raise self._failed(exc) from None
        self._last_sent = time.monotonic()

    def run(self, fn, *args):
        """fn(*args) as a collective step: a failure in it names the rank to blame."""
        try:
            return fn(*args)
        except ParallelError as exc:
            raise self._failed(exc) from None

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _failed(self, exc: Exception) -> ParallelError:
        if self.failure is None:
            why = self._exited_workers(wait=2.0)
            if not why:
                detail = str(exc).split(". This is typically")[0]  # gloo's advice is not for our users
                why = [f"a rank did not answer within {parallel.step_timeout():.0f} s or closed its connection "
                       f"({detail})"]
            self.failure = ParallelError("tensor parallelism failed: " + "; ".join(why) +
                                         ". The model cannot run without every rank; restart gptoss.")
            log.error("%s", self.failure)
            self._closed.set()
            if self.workers:
                self.workers.kill()
        return self.failure

    def _exited_workers(self, wait: float) -> list[str]:
        """Which local workers stopped; a killed one may close its sockets a moment before it exits."""
        deadline = time.monotonic() + wait
        while self.workers:
            found = self.workers.exited()
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)
        return []

    def _beat(self) -> None:
        while not self._closed.wait(HEARTBEAT_SECONDS / 3):
            if self.workers and self.workers.exited():  # found while idle, not at the next step
                self._failed(ParallelError("a worker stopped"))
                return
            if time.monotonic() - self._last_sent < HEARTBEAT_SECONDS:
                continue
            with parallel.lock():
                if self._closed.is_set() or self.failure:
                    return
                try:
                    self.send("beat")
                except ParallelError:
                    return

    def close(self) -> None:
        """Stop the workers (they exit when told, or are killed after 10 s) and leave the group."""
        if self._done:
            return
        self._done = True
        self._closed.set()
        if self.failure is None and parallel.lock().acquire(timeout=parallel.step_timeout() + 5):
            try:
                parallel.broadcast("stop")
            except ParallelError:
                pass
            finally:
                parallel.lock().release()
        if self.workers:
            self.workers.wait(10)
        parallel.shutdown()


# -- the workers ------------------------------------------------------------------------------------

def serve_steps(model) -> None:
    """Run the forward of every step rank 0 sends, until it says stop."""
    from gptoss.engine.runner import PagedCache, allocate_pools, sliding_layers

    pools = None
    while True:
        command = parallel.broadcast(None)
        if command == "stop":
            return
        if command == "beat":
            continue
        if isinstance(command, tuple) and command[0] == "pools":
            pools = allocate_pools(model, *command[1:])
            continue
        batch = command.to(model.device)
        with torch.no_grad():
            model.forward_batch(batch, PagedCache(batch, pools, sliding_layers(model)))


def run_worker(spec: LoadSpec, rank: int) -> int:
    logging.basicConfig(level=logging.INFO, format=f"gptoss rank {rank}: %(message)s")
    parallel.init(rank, spec.world_size, backend=_backend(spec.device))
    _pin(spec.device, rank, spec.world_size)
    try:
        model = spec.load(rank)
        parallel.ready()
        serve_steps(model)
    except ParallelError as exc:
        log.error("lost contact with the other ranks, exiting: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        parallel.shutdown()
    return 0


def main() -> int:
    spec = LoadSpec(**json.loads(os.environ[SPEC_ENV]))
    return run_worker(spec, int(os.environ["RANK"]))


if __name__ == "__main__":
    sys.exit(main())
