"""Resilience at cluster scale: stop signals, a wall-clock budget, non-finite losses, loss spikes.

Every decision that changes what a rank does is taken by all ranks together through one small
all-reduce, so no rank can save, skip or exit while another carries on into a collective:

* **Stop signals** (SIGUSR1, SIGTERM). The handler only sets a flag. At the next step boundary
  `should_stop` all-reduces (MAX) the flags of every rank; if any rank got a signal, every rank
  saves the checkpoint of the step just finished, rank 0 requeues the Slurm job
  (`scontrol requeue $SLURM_JOB_ID`, only under Slurm and with `train.requeue`), and all return
  normally (exit 0). The requeued job resumes from `<save_dir>/latest` (`--train.resume auto`):
  no step is lost, the one in flight when the signal came is completed and saved.
  `#SBATCH --signal=USR1@<seconds>` makes Slurm send it before the time limit; preemption sends
  SIGTERM; `scancel --signal=USR1 <job>` does it by hand.
* **Wall-clock budget** (`train.exit_duration_minutes`, measured from the process start): agreed the
  same way; every rank saves and exits 0, without requeueing (Megatron's --exit-duration-in-mins).
* **Non-finite loss or gradients** (`train.nonfinite`). Just before every optimizer update each rank
  checks its micro-batch losses and its local gradients; one all-reduce tells every rank which
  ranks saw a non-finite value. `skip`: every rank skips that update (parameters and optimizer
  state untouched, the learning-rate schedule does not advance, the step still counts), the skip
  is logged, and after MAX_CONSECUTIVE_SKIPS skipped steps in a row the run stops as with `stop`.
  `stop`: every rank prints the same diagnostic (step, ranks, what was non-finite, the ranks'
  sample indices) and exits with code 3. With fp16, gradient overflow is DeepSpeed's loss
  scaling at work and only the loss is checked.
* **Loss spikes** (`logging.spike_factor`): rank 0 warns (console and a `spike` record in
  metrics.jsonl) when a logged loss exceeds spike_factor x the median of the last SPIKE_WINDOW
  logged losses. A warning only: it changes nothing.
* **Data built once** (`first_rank_per_node_first`): token shards of the default corpus are built
  by global rank 0, then by local rank 0 of every other node (a node-local cache), then read by
  everyone else, each phase behind a collective, and a failure on the building rank becomes the
  same one-line error on every rank. Sample orders and blends are computed in memory,
  deterministically, on every rank (no index file that could be read half-written).

The update hook wraps DeepSpeed's `engine._take_model_step` (called once per optimizer step on
every rank, with and without pipeline parallelism) and, to skip, turns the innermost torch
optimizer's `step` into a no-op for that call, so DeepSpeed's own bookkeeping (zeroing gradients,
ZeRO buffers, step counters) runs as usual.
"""

from __future__ import annotations

import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
MAX_CONSECUTIVE_SKIPS = 10
NONFINITE_EXIT_CODE = 3
SPIKE_WINDOW = 20
SPIKE_MIN_HISTORY = 5
INJECT_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class NonFiniteStop(SystemExit):
    """Raised on every rank when a non-finite loss/gradient stops the run; exits with code 3."""

    def __init__(self, message: str):
        super().__init__(NONFINITE_EXIT_CODE)
        self.message = message


def parse_inject(value: str) -> tuple[int, int] | None:
    """train.inject_nan_at "STEP:RANK" -> (step, rank); "" -> None. Raises ValueError otherwise."""
    if not value:
        return None
    match = INJECT_PATTERN.match(value)
    if not match:
        raise ValueError(f"train.inject_nan_at={value!r} must look like STEP:RANK (e.g. 5:1) or be empty")
    return int(match.group(1)), int(match.group(2))


def process_start_time() -> float:
    """When this process started (epoch seconds); the wall-clock budget counts from here."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # pragma: no cover - psutil comes with DeepSpeed
        return time.time()


def under_slurm() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


# ----------------------------------------------------------------------------- signals

class StopFlag:
    """SIGUSR1 / SIGTERM -> a flag; nothing else happens in the handler."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopFlag":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        """The handlers from before install() (for train.py the defaults, so that a later SIGTERM,
        e.g. Slurm ending a requeued job, is final)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


# ----------------------------------------------------------------------------- spikes

class SpikeDetector:
    """Warn when a loss exceeds factor x the median of the previous SPIKE_WINDOW logged losses."""

    def __init__(self, factor: float, window: int = SPIKE_WINDOW, min_history: int = SPIKE_MIN_HISTORY):
        self.factor = float(factor)
        self.history: deque[float] = deque(maxlen=window)
        self.min_history = min_history

    def check(self, step: int, loss) -> dict | None:
        if not self.factor or loss is None or not math.isfinite(loss):
            return None
        record = None
        if len(self.history) >= self.min_history:
            reference = statistics.median(self.history)
            if reference > 0 and loss > self.factor * reference:
                record = {"kind": "spike", "step": step, "loss": loss, "reference": reference,
                          "factor": self.factor,
                          "message": f"loss spike at step {step}: {loss:.4f} > {self.factor:g} x {reference:.4f} "
                                     f"(median of the last {len(self.history)} logged losses)"}
        self.history.append(loss)
        return record


# ----------------------------------------------------------------------------- data

def first_rank_per_node_first(build, rank: int, local_rank: int, world_size: int):
    """Run build(first_on_node) on global rank 0, then local rank 0 of the other nodes, then the rest.

    Each phase ends with a collective, so a later phase only starts once the files the earlier
    one wrote are complete. If a builder raises (a DataError or ConfigError: bad input), every
    rank raises the same error type with the same one-line message instead of hanging.
    """
    if world_size == 1 or not dist.is_initialized():
        return build(True)
    phase_of_mine = 0 if rank == 0 else (1 if local_rank == 0 else 2)
    result, mine, failure = None, None, None
    for phase in range(3):
        if phase == phase_of_mine:
            try:
                result = build(phase < 2)
            except Exception as e:  # noqa: BLE001 - every rank must learn of it, or the others hang
                failure, mine = e, (type(e).__module__, type(e).__name__, str(e))
        errors = [None] * world_size
        dist.all_gather_object(errors, mine if phase == phase_of_mine else None)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            if failure is not None:
                raise failure  # the rank that failed: its own exception and traceback
            raise _rebuild_error(first)
    return result


def _rebuild_error(error: tuple[str, str, str]) -> Exception:
    """The builder's exception on every rank: our ValueErrors (DataError, ConfigError: exit 2) as
    themselves, anything else as a RuntimeError naming it."""
    module, name, message = error
    cls = getattr(sys.modules.get(module), name, None)
    if isinstance(cls, type) and issubclass(cls, ValueError):
        try:
            return cls(message)
        except TypeError:
            pass
    return RuntimeError(f"{name} while preparing the data on another rank: {message}")


# ----------------------------------------------------------------------------- the run's guard

class Resilience:
    """One per run; see the module docstring. All methods that communicate are called by every rank."""

    def __init__(self, cfg, info, say=print):
        self.cfg, self.t = cfg, cfg.train
        self.rank, self.world, self.local_rank = info.rank, info.world_size, info.local_rank
        self.device = info.device
        self.say = say
        self.started = process_start_time()
        self.flag = StopFlag().install()
        self.inject = parse_inject(self.t.inject_nan_at)
        self.spikes = SpikeDetector(cfg.logging.spike_factor)
        self.logger = None
        self.engine = None
        self.step = 0
        self.micro_batches: list = []
        self._losses: list[torch.Tensor] = []
        self._skip_now = False
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self.stop_reason: str | None = None

    # ---------------------------------------------------------------- attach

    def attach(self, engine, logger) -> None:
        """Hook the non-finite check into DeepSpeed's update (before the parameters change)."""
        self.engine, self.logger = engine, logger
        take = getattr(engine, "_take_model_step", None)
        if take is None:  # pragma: no cover - every DeepSpeed since 0.3 has it
            self.say("warning: this DeepSpeed has no _take_model_step; non-finite steps cannot be skipped")
            return

        def guarded_take_model_step(*args, **kwargs):
            self._skip_now = self._decide()
            try:
                return take(*args, **kwargs)
            finally:
                if self._skip_now:
                    self._mark_overflow(False)
                self._skip_now = False

        engine._take_model_step = guarded_take_model_step
        for opt in _torch_optimizers(engine.optimizer):
            _gate(opt, self)

    # ---------------------------------------------------------------- per step

    def begin_step(self, step: int, micro_batches) -> None:
        self.step = step
        self.micro_batches = [list(map(int, mb)) for mb in micro_batches]
        self._losses = []

    def observe_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Called with each micro-batch loss before backward; applies the NaN-injection test hook."""
        if self.inject and self.inject == (self.step, self.rank) and not self._losses:
            loss = loss * float("nan")
        self._losses.append(loss.detach())
        return loss

    def _local_problem(self) -> str | None:
        """What is non-finite on this rank right now ("" / None when all is finite)."""
        problems = []
        if self._losses:
            finite = torch.isfinite(torch.stack([x.float().reshape(()) for x in self._losses])).cpu().tolist()
            bad = [i for i, ok in enumerate(finite) if not ok]
            if bad:
                problems.append(f"loss (micro-batch {', '.join(map(str, bad))})")
        grads = [] if self.t.precision == "fp16" else _local_grads(self.engine)
        if self.inject and self.inject == (self.step, self.rank) and not self._losses and grads:
            grads[0].fill_(float("nan"))  # pipeline engine: no per-micro-batch hook, poison a gradient
        if grads and not problems:
            total = torch.stack([g.float().sum() for g in grads]).sum()
            if not bool(torch.isfinite(total)):
                problems.append("gradient")
        return "; ".join(problems) or None

    def _decide(self) -> bool:
        """All ranks: agree whether this update is non-finite anywhere; skip it or stop."""
        problem = self._local_problem()
        flags = torch.zeros(self.world, dtype=torch.float32, device=self.device)
        if problem:
            flags[self.rank] = 1.0
        if self.world > 1:
            dist.all_reduce(flags)
        bad_ranks = [int(r) for r in flags.nonzero().flatten().cpu().tolist()]
        if not bad_ranks:
            self.consecutive_skips = 0
            return False
        mine = {"rank": self.rank, "problem": problem, "samples": self.micro_batches}
        details = [mine]
        if self.world > 1:
            details = [None] * self.world
            dist.all_gather_object(details, mine)
        bad = [d for d in details if d["problem"]]
        origin = [d for d in bad if d["problem"].startswith("loss")] or bad
        self.consecutive_skips += 1
        stop = self.t.nonfinite == "stop" or self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS
        action = "stop" if stop else "skip"
        where = "; ".join(f"rank {d['rank']}: {d['problem']}" for d in bad)
        samples = {d["rank"]: d["samples"] for d in origin}
        message = (f"non-finite values at step {self.step} on {len(bad)} of {self.world} ranks ({where}); "
                   f"sample indices of rank(s) {', '.join(str(d['rank']) for d in origin)}: "
                   f"{_short(samples)}")
        record = {"kind": "nonfinite", "step": self.step, "action": action, "ranks": [d["rank"] for d in bad],
                  "problems": {d["rank"]: d["problem"] for d in bad}, "samples": samples,
                  "consecutive": self.consecutive_skips}
        if self.logger is not None:
            self.logger.log(record)
        if stop:
            why = (f"train.nonfinite=stop" if self.t.nonfinite == "stop"
                   else f"{self.consecutive_skips} consecutive skipped steps")
            text = f"error: {message}; stopping ({why})"
            print(f"[rank {self.rank}] {text}", file=sys.stderr, flush=True)
            if self.logger is not None:
                self.logger.close()
            raise NonFiniteStop(text)
        self.skipped_steps += 1
        if self.logger is not None:
            self.logger.console(f"warning: {message}; skipping this update on every rank "
                                f"({self.skipped_steps} skipped so far)")
        return True

    def _mark_overflow(self, value: bool) -> None:
        """DeepSpeed reads optimizer.overflow after a step: True = skipped (no LR step, skipped_steps += 1)."""
        opt = getattr(self.engine, "optimizer", None)
        if opt is not None:
            try:
                opt.overflow = value
            except AttributeError:  # pragma: no cover - a read-only property
                pass

    # ---------------------------------------------------------------- logging

    def after_log(self, record: dict) -> None:
        """Rank 0, with each logged train record: the loss-spike warning."""
        if self.logger is None or not self.logger.enabled:
            return
        spike = self.spikes.check(record["step"], record.get("lm_loss"))
        if spike:
            self.logger.log(spike)
            self.logger.console(f"warning: {spike['message']}")

    # ---------------------------------------------------------------- stopping

    def budget_exceeded(self) -> bool:
        minutes = self.t.exit_duration_minutes
        return bool(minutes) and (time.time() - self.started) / 60.0 >= minutes

    def should_stop(self, step: int) -> str | None:
        """All ranks, at every step boundary: has any rank been signalled or run out of time?"""
        if step >= self.t.max_steps:
            return None  # the last step: finishing is quicker than stopping
        local = torch.tensor([float(self.flag.received or 0), float(self.budget_exceeded())],
                             dtype=torch.float32, device=self.device)
        if self.world > 1:
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
        signum, budget = int(local[0].item()), bool(local[1].item())
        if signum:
            self.stop_reason = f"signal {signal.Signals(signum).name}"
        elif budget:
            self.stop_reason = f"train.exit_duration_minutes={self.t.exit_duration_minutes:g} reached"
        return self.stop_reason

    def stop(self, step: int, save) -> dict:
        """All ranks: save (unless step was just saved), log, requeue under Slurm (rank 0), return.

        `save()` is the run's checkpoint.save call for this step; None when checkpoints are off.
        """
        t = self.t
        saved_already = bool(t.save_interval) and step % t.save_interval == 0
        path = None
        if save is not None:
            path = save() if not saved_already else "(saved at this step)"
        by_signal = self.stop_reason.startswith("signal")
        requeue = by_signal and t.requeue and under_slurm() and save is not None
        self.flag.restore()
        record = {"kind": "stop", "step": step, "reason": self.stop_reason,
                  "checkpoint": None if path is None else str(path), "requeue": requeue,
                  "skipped_steps": self.skipped_steps, "wall_s": time.time() - self.started}
        if self.logger is not None:
            self.logger.log(record)
            note = ("; requeueing the Slurm job, it resumes from this checkpoint" if requeue else
                    "" if save is not None else "; checkpoints are off (train.save_dir ''), nothing saved")
            self.logger.console(f"stopping after step {step}: {self.stop_reason}{note}")
            self.logger.close()
        if self.world > 1:
            dist.barrier()  # every rank is done with its files before the job may be killed
        if requeue and self.rank == 0:
            self._requeue()
        return record

    def _requeue(self) -> None:
        job = os.environ["SLURM_JOB_ID"]
        try:
            proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            ok, detail = proc.returncode == 0, proc.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            ok, detail = False, str(e)
        if ok:
            print(f"requeued Slurm job {job}", flush=True)
        else:
            print(f"warning: scontrol requeue {job} failed ({detail}); resubmit the job to resume "
                  "(--train.resume auto)", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- DeepSpeed internals

def _torch_optimizers(opt) -> list:
    """The torch optimizer(s) at the bottom of DeepSpeed's optimizer wrappers."""
    found, seen = [], set()
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "optimizer"):
            found.append(opt)
            break
        opt = getattr(opt, "optimizer", None)
    return found


def _gate(opt, guard: Resilience) -> None:
    """opt.step becomes a no-op (and the engine sees an overflow) while guard._skip_now is set."""
    real_step = opt.step

    def step(*args, **kwargs):
        if guard._skip_now:
            guard._mark_overflow(True)
            return None
        return real_step(*args, **kwargs)

    opt.step = step


def _local_grads(engine) -> list[torch.Tensor]:
    """This rank's gradients about to be applied: parameter .grad, plus ZeRO's partition buffers."""
    if engine is None:
        return []
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    opt = getattr(engine, "optimizer", None)
    averaged = getattr(opt, "averaged_gradients", None)  # ZeRO-1/2: {group: [partition grads]}
    for group in (averaged.values() if isinstance(averaged, dict) else []):
        if isinstance(group, torch.Tensor):
            grads.append(group)
        elif group:
            grads.extend(g for g in group if isinstance(g, torch.Tensor))
    flat = getattr(opt, "grad_partitions_flat_buffer", None)
    if isinstance(flat, torch.Tensor):
        grads.append(flat)
    return grads


def _short(samples: dict, limit: int = 32) -> str:
    parts = []
    for rank, micro in samples.items():
        flat = [i for mb in micro for i in mb]
        more = f" ... (+{len(flat) - limit})" if len(flat) > limit else ""
        parts.append(f"rank {rank}: {flat[:limit]}{more}")
    return "; ".join(parts)


__all__ = ["Resilience", "StopFlag", "SpikeDetector", "NonFiniteStop", "first_rank_per_node_first",
           "parse_inject", "NONFINITE_EXIT_CODE"]
