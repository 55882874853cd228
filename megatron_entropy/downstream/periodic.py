"""lm-eval during training (train.eval_harness_tasks): rank 0 evaluates a transformers copy of the
live model every train.eval_harness_interval steps and at the last step; the other ranks wait.

The copy is the model tools/convert_to_hf.py would export from a checkpoint saved at that step
(same tensors, fp32), so a `{"kind": "harness"}` record equals tools/eval_harness.py on that
checkpoint. Only layouts where rank 0 holds every weight are supported (TP = PP = 1, ZeRO <= 2;
config.py and this module refuse the others before the first step). The training RNG streams are
left untouched (the copy's initialisation runs under fork_rng; lm-eval is asked not to seed).
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.distributed as dist

from megatron_entropy.config import Config, ConfigError
from megatron_entropy.training import reshard


def live_full_state(model, vocab_size: int) -> dict[str, torch.Tensor]:
    """Canonical full fp32 tensors of an unsharded GPTModel, vocabulary padding removed."""
    names = reshard.canonical_names(model)
    full = {}
    for key, tensor in model.state_dict().items():
        name = names[key]
        value = tensor.detach()
        if name in reshard.VOCAB_TENSORS:
            value = value[:vocab_size]
        full[name] = value.float().cpu().clone()
    return full


class PeriodicHarness:
    def __init__(self, cfg: Config, tokenizer_path, zero_stage: int, rank: int, say=print):
        t = cfg.train
        self.cfg, self.tasks, self.rank, self.say = cfg, list(t.eval_harness_tasks), rank, say
        self.tokenizer_path = tokenizer_path
        if not self.tasks:
            return
        if zero_stage >= 3:
            raise ConfigError("train.eval_harness_tasks evaluates the unsharded model on rank 0; ZeRO stage 3 "
                              "partitions it: use ZeRO <= 2 or evaluate the saved checkpoint with "
                              "tools/eval_harness.py")
        if not tokenizer_path:
            raise ConfigError("train.eval_harness_tasks needs the run's tokenizer to encode the tasks; set "
                              "data.tokenizer")
        self.manager = None  # lm-eval's task index, built on the first evaluation (rank 0 only)

    def due(self, step: int) -> bool:
        interval = self.cfg.train.eval_harness_interval
        return bool(self.tasks) and (step == self.cfg.train.max_steps or (interval > 0 and step % interval == 0))

    def after_step(self, step: int, model, logger) -> None:
        """Called by every rank after every step; evaluates on rank 0 when due."""
        if not self.due(step):
            return
        if self.rank == 0:
            record = self.evaluate(step, model)
            logger.log(record)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if "/" in k and not k.endswith("_stderr"))
            logger.console(f"step {step}: lm-eval {shown} ({record['harness_s']:.1f}s)")
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # the other ranks wait here rather than inside the next step's collectives

    def evaluate(self, step: int, model) -> dict:
        from megatron_entropy.downstream import harness

        started = time.perf_counter()
        device = next(model.parameters()).device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            if self.manager is None:
                self.manager = harness.task_manager()
            hm = harness.model_from_state(self.cfg.model, live_full_state(model, self.cfg.model.vocab_size),
                                          self.tokenizer_path, f"step {step}")
            hm.model.to(device)
            limit = self.cfg.train.eval_harness_limit or None
            with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # lm-eval's progress bars
                results = harness.evaluate(hm, self.tasks, self.manager, limit=limit)
        del hm
        return {"kind": "harness", "step": step, **harness.metrics_of(results),
                "harness_s": time.perf_counter() - started}
