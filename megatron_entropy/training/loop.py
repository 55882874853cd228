"""The training loop, top to bottom: data, model, engine, steps, evaluation, checkpoints, figures."""

from __future__ import annotations

import math
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_entropy.analysis.flops import throughput, training_flops_per_token
from megatron_entropy.analysis import plots
from megatron_entropy.analysis.alarms import EntropyAlarms, wandb_alert
from megatron_entropy.config import Config, ConfigError, default_cache_dir
from megatron_entropy.data import DataError
from megatron_entropy.data.corpus import prepare_default_data
from megatron_entropy.data.blend import BlendedDataset, parse_data_path
from megatron_entropy.data.dataset import GlobalBatchSampler, TokenChunkDataset, collate, slice_for_rank
from megatron_entropy.data.indexed import IndexedTokens
from megatron_entropy.data.tokenizer import load_tokenizer
from megatron_entropy.downstream.periodic import PeriodicHarness
from megatron_entropy.model.entropy import entropy_bins
from megatron_entropy.model.gpt import GPTModel
from megatron_entropy.parallel.random import seed_all
from megatron_entropy.parallel.state import ParallelState
from megatron_entropy.training import checkpoint, pipeline, resilience
from megatron_entropy.training.distributed import DistInfo
from megatron_entropy.training.engine import build_ds_config, initialize, load_ds_config, zero_stage
from megatron_entropy.training.metrics import MetricsLogger, perplexity
from megatron_entropy.training.summaries import parameter_summaries


# ----------------------------------------------------------------------------- data

class RunData:
    """The tokenizer identity and the train / validation datasets of a run."""

    def __init__(self, cfg: Config, log, check_tokens: bool = True):
        d, m = cfg.data, cfg.model
        tokenizer = None
        if d.train_data:
            # ours (prefixes + data.train_weights) or Megatron's "0.7 data/code 0.3 data/web"
            train_prefixes, weights = parse_data_path(d.train_data, d.train_weights)
            valid_prefixes, valid_weights = parse_data_path(d.valid_data, key="data.valid_data")
            if valid_weights:
                raise ConfigError("data.valid_data takes prefixes only (it is not blended); drop its weights")
            tokenizer = load_tokenizer(d.tokenizer) if d.tokenizer else None
        else:
            default = prepare_default_data(d.cache_dir or default_cache_dir(), d.tokenizer_vocab_size,
                                           d.corpus_max_bytes, log=log)
            tokenizer = load_tokenizer(default.tokenizer_path)
            train_prefixes, valid_prefixes, weights = [default.train_prefix], [default.valid_prefix], []
        self.tokenizer_path = tokenizer.path if tokenizer else None
        self.tokenizer_identity = tokenizer.identity if tokenizer else None
        vocab = tokenizer.vocab_size if tokenizer else IndexedTokens(train_prefixes[0], check_tokens=False).vocab_size
        if m.vocab_size is None:
            m.vocab_size = vocab
        elif m.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {vocab}; unset it")
        # the tokenizer stands in for the sidecar of foreign (Megatron-made) shards
        kwargs = dict(expected_vocab_size=vocab, expected_tokenizer_identity=self.tokenizer_identity,
                      check_tokens=check_tokens, packing=d.packing, document_attention=d.document_attention,
                      eod_mask_loss=d.eod_mask_loss, tokenizer=tokenizer)
        if weights:  # a weighted blend, one dataset per prefix (data/blend.py)
            self.train = BlendedDataset([TokenChunkDataset(p, m.seq_length, **kwargs) for p in train_prefixes],
                                        weights, seed=d.seed, names=list(train_prefixes))
            log(self.train.describe())
        else:
            self.train = TokenChunkDataset(train_prefixes, m.seq_length, **kwargs)
        self.valid = TokenChunkDataset(valid_prefixes, m.seq_length, **kwargs) if valid_prefixes else None


# ----------------------------------------------------------------------------- steps

def make_model_and_engine(cfg: Config, ds_config: dict, state: ParallelState, device, prepare=None):
    """The model — GPTModel, or with PP > 1 a DeepSpeed PipelineModule of the same layers — and its engine.

    prepare(model) runs before DeepSpeed wraps the model (loading a checkpoint of another layout)."""
    if cfg.parallel.pipeline > 1:
        model = pipeline.build_pipeline_model(cfg.model, state, cfg.train.seed, cfg.parallel.pipeline_partition)
    else:
        model = GPTModel(cfg.model, state, seed=cfg.train.seed).to(device)
    if prepare is not None:
        prepare(model)
    pipeline.set_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    engine, optimizer, scheduler = initialize(cfg, model, ds_config, state)
    return model, engine, optimizer, scheduler


def is_pipeline(model) -> bool:
    return getattr(model, "is_pipeline", False)


def train_step(engine, model: GPTModel, dataset, micro_batches, device, guard=None) -> torch.Tensor:
    """Forward/backward every micro-batch, then one optimizer step. Returns the mean LM loss."""
    if is_pipeline(model):  # DeepSpeed runs the 1F1B schedule over the micro-batches, then steps
        model.stats.micro_batches += len(micro_batches)
        model.loss_hook = guard.observe_loss if guard is not None else None  # the last stage's losses
        return engine.train_batch(pipeline.batches(dataset, micro_batches, collate, device)).detach().float()
    losses = []
    for indices in micro_batches:
        loss = forward_loss(engine, collate(dataset, indices).to(device))
        if guard is not None:  # non-finite check (resilience.py); the update itself is guarded in engine.step
            loss = guard.observe_loss(loss)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float())
    model.stats.micro_batches += len(micro_batches)
    return torch.stack(losses).mean()


def forward_loss(engine, batch) -> torch.Tensor:
    """The model's mean LM loss on one Batch (documents and loss mask as the data asks)."""
    return engine(batch.tokens, batch.labels, doc_start=batch.doc_start, loss_mask=batch.loss_mask)


def dp_mean(value: torch.Tensor, state: ParallelState) -> float:
    value = value.detach().float().clone().cpu()
    if state.dp_size > 1:
        dist.all_reduce(value, group=state.dp_group)
        value /= state.dp_size
    return float(value)


@torch.no_grad()
def evaluate(engine, model: GPTModel, dataset, cfg: Config, state: ParallelState, device) -> float:
    """Mean validation loss over the first eval_iters global micro-batches (0: the whole split).

    Every DP rank runs the same number of full micro-batches (indices wrap around a split smaller
    than one global micro-batch), so collectives inside the model (TP, ZeRO-3) stay matched.
    """
    mb, dp = cfg.train.micro_batch_size, state.dp_size
    per_step = mb * dp
    steps = math.ceil(len(dataset) / per_step) if cfg.train.eval_iters == 0 else cfg.train.eval_iters
    if is_pipeline(model):  # one inference schedule over all micro-batches; DeepSpeed averages over DP
        micro = [[(s * per_step + state.dp_rank * mb + j) % len(dataset) for j in range(mb)] for s in range(steps)]
        return float(engine.eval_batch(pipeline.batches(dataset, micro, collate, device), num_micro_batches=steps))
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for s in range(steps):
        first = s * per_step + state.dp_rank * mb
        mine = [(first + j) % len(dataset) for j in range(mb)]
        loss = forward_loss(engine, collate(dataset, mine).to(device))
        total += torch.tensor([float(loss) * mb, mb], dtype=torch.float64)
    if dp > 1:
        dist.all_reduce(total, group=state.dp_group)
    engine.train()
    return float(total[0] / total[1])


def stats_record(model: GPTModel, cfg: Config, state: ParallelState, seq_length: int) -> dict:
    """The reduced entropy statistics plus parameter summaries (collective on every rank)."""
    reduced = model.stats.reduce(state)
    matrix = reduced["entropy"]
    record = {
        "log_T": math.log(seq_length),
        "entropy": matrix,
        "entropy_layer_mean": [float(torch.tensor(row).nanmean()) for row in matrix],
        "entropy_bins": entropy_bins(matrix),
        "nan_counts": reduced["nan_counts"],
        "entropy_reg_loss": reduced["entropy_reg_loss"],
    }
    record.update(parameter_summaries(model, cfg.model, state))
    return record


# ----------------------------------------------------------------------------- the run

def default_run_dir(cfg: Config) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in cfg.model.variant).strip("-").lower()
    return f"runs/{slug}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def broadcast_str(value: str, state: ParallelState) -> str:
    if state.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run(cfg: Config, ds_config_path: str | None, info: DistInfo) -> dict:
    state = ParallelState.from_topology(cfg.parallel.tensor, cfg.parallel.pipeline)
    is_logger = info.rank == 0
    say = (lambda msg: print(msg, flush=True)) if is_logger else (lambda msg: None)
    seed_all(cfg.train.seed)
    guard = resilience.Resilience(cfg, info, say)  # stop signals become a flag from here on

    # one rank builds the default corpus' shards (and checks token ranges) per node, the rest wait, then read
    data = resilience.first_rank_per_node_first(lambda first: RunData(cfg, say, check_tokens=first),
                                                info.rank, info.local_rank, info.world_size)
    cfg.validate(info.world_size)
    ds_config = build_ds_config(cfg, load_ds_config(ds_config_path), info.world_size,
                                source=ds_config_path or "the DeepSpeed config")
    harness = PeriodicHarness(cfg, data.tokenizer_path, zero_stage(ds_config), info.rank, say)  # lm-eval tasks
    run_dir = Path(broadcast_str(cfg.logging.run_dir or default_run_dir(cfg), state))
    cfg.logging.run_dir = str(run_dir)

    save_dir = cfg.train.save_dir if cfg.train.save_dir is not None else str(run_dir / "checkpoints")
    # Which checkpoint, and can DeepSpeed load it as saved? (else: weights via the shard spec, before DeepSpeed)
    resume_plan = checkpoint.plan_resume(save_dir, cfg.train.resume, cfg, state, zero_stage(ds_config),
                                         data.tokenizer_identity, say) if cfg.train.resume else None
    model, engine, optimizer, scheduler = make_model_and_engine(
        cfg, ds_config, state, info.device, prepare=resume_plan.prepare_model if resume_plan else None)
    gas = cfg.grad_accumulation_steps(info.world_size)
    sampler = GlobalBatchSampler(len(data.train), cfg.train.global_batch_size, seed=cfg.data.seed)

    start_step = 0
    if resume_plan is not None:
        start_step = checkpoint.resume(engine, sampler, resume_plan, state, say)

    n_params = sum(p.numel() for p in model.parameters())
    say(f"megatron_entropy: {cfg.model.variant} | {cfg.model.num_layers} layers, d={cfg.model.hidden_size}, "
        f"{cfg.model.num_heads} heads, T={cfg.model.seq_length}, vocab {cfg.model.vocab_size} "
        f"(padded {model.padded_vocab}) | {n_params / 1e6:.2f}M params on this rank | "
        f"world {info.world_size} = TP{state.tp_size} x PP{state.pp_size} x DP{state.dp_size}, "
        f"ZeRO-{zero_stage(ds_config)}, {cfg.train.precision}, grad accumulation {gas} | "
        f"{len(data.train)} train samples | run dir {run_dir}")
    if note := pipeline.bubble_note(state.pp_size, gas):
        say(note)
    logger = MetricsLogger(run_dir, cfg.to_dict(), is_logger, cfg.logging.wandb, cfg.logging.wandb_project,
                           cfg.train.max_steps, cfg.logging.progress_bar, start_step)
    alarms = _make_alarms(cfg)
    guard.attach(engine, logger)
    if resume_plan is not None and resume_plan.converted and data.valid is not None:
        # Weights came through the shard spec: show they reproduce the saved model's validation loss.
        val = evaluate(engine, model, data.valid, cfg, state, info.device)
        logger.log({"kind": "eval", "step": start_step, "val_loss": val, "val_ppl": perplexity(val), "resume_check": True})
        say(f"resume check: validation loss {val:.6f} at step {start_step}")

    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    flops_per_token = training_flops_per_token(cfg.model) if cfg.logging.peak_tflops else 0.0  # for MFU
    started = window_start = time.perf_counter()
    window_steps, last_val = 0, None
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        log_now = step % cfg.logging.log_interval == 0 or step == cfg.train.max_steps
        model.stats.reset()
        model.stats.active = log_now
        model.aux_scale.value = 1.0 / gas * _loss_scale(engine, cfg)
        micro = slice_for_rank(sampler.next_global_batch(), state.dp_rank, state.dp_size, cfg.train.micro_batch_size)
        guard.begin_step(step, micro)
        lm_loss = train_step(engine, model, data.train, micro, info.device, guard)
        window_steps += 1

        if log_now:
            lm = dp_mean(lm_loss, state)
            now = time.perf_counter()
            record = {"kind": "train", "step": step, "lm_loss": lm, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": _grad_norm(engine), "tokens": step * tokens_per_step,
                      "tokens_per_s": window_steps * tokens_per_step / (now - window_start),
                      "elapsed_s": now - started}
            record.update(throughput(flops_per_token, record["tokens_per_s"], info.world_size, cfg.logging.peak_tflops))
            record.update(stats_record(model, cfg, state, cfg.model.seq_length))
            record["loss"] = lm + record["entropy_reg_loss"]
            logger.log(record)
            guard.after_log(record)
            for alarm in alarms.check(step, record["entropy"]):
                logger.log(alarm)
                logger.console(f"warning: {alarm['message']}")
                if is_logger:
                    wandb_alert(alarm)  # a no-op unless a wandb run is online
            logger.advance(step, {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"})
            window_start, window_steps = time.perf_counter(), 0
        if data.valid is not None and cfg.train.eval_interval and step % cfg.train.eval_interval == 0 \
                and step != cfg.train.max_steps:
            last_val = evaluate(engine, model, data.valid, cfg, state, info.device)
            logger.log({"kind": "eval", "step": step, "val_loss": last_val, "val_ppl": perplexity(last_val)})
            logger.console(f"step {step}: validation loss {last_val:.4f}, perplexity {perplexity(last_val):.2f}")
        harness.after_step(step, model, logger)  # downstream evaluation when due (rank 0)
        if save_dir and cfg.train.save_interval and step % cfg.train.save_interval == 0 and step != cfg.train.max_steps:
            checkpoint.save(engine, save_dir, step, sampler, cfg, data, state, say)
        if guard.should_stop(step):  # a stop signal or the time budget, agreed by every rank
            break

    if guard.stop_reason:  # save, requeue under Slurm, exit 0
        return guard.stop(step, (lambda: checkpoint.save(engine, save_dir, step, sampler, cfg, data, state, say))
                          if save_dir else None)
    step = cfg.train.max_steps
    final = {"kind": "final", "step": step, "wall_s": time.perf_counter() - started}
    if data.valid is not None:
        model.stats.reset()
        model.stats.active = True  # the final heatmap uses validation data (ambiguity A14)
        last_val = evaluate(engine, model, data.valid, cfg, state, info.device)
        model.stats.active = False
        final.update(val_loss=last_val, val_ppl=perplexity(last_val))
        final["entropy"] = model.stats.reduce(state)["entropy"]
        logger.log({"kind": "eval", "step": step, "val_loss": last_val, "val_ppl": perplexity(last_val)})
    if save_dir:
        checkpoint.save(engine, save_dir, step, sampler, cfg, data, state, say)
    logger.log(final)
    if is_logger and cfg.logging.figures:
        _figures(run_dir, final, say)
    logger.close()
    guard.flag.restore()  # the signal handlers this run installed
    if is_logger and last_val is not None:
        print(f"final validation loss {last_val:.4f} | perplexity {perplexity(last_val):.2f} | "
              f"{final['wall_s']:.1f}s | metrics {run_dir / 'metrics.jsonl'}", flush=True)
    return final


def _loss_scale(engine, cfg: Config) -> float:
    if cfg.train.precision != "fp16":
        return 1.0
    return float(getattr(engine.optimizer, "loss_scale", getattr(engine.optimizer, "cur_scale", 1.0)))


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _make_alarms(cfg: Config):
    # No alarms during warm-up: attention starts near-uniform (every head in the top bin).
    return EntropyAlarms(math.log(cfg.model.seq_length), cfg.logging.collapse_fraction, cfg.logging.overload_share,
                         grace_steps=cfg.train.warmup_steps)


def _figures(run_dir: Path, final: dict, say) -> None:
    """The paper's figures from metrics.jsonl (the heatmap from the final validation entropies)."""
    try:
        paths = plots.render_run_figures(run_dir)
        plots.log_figures_to_wandb(paths, final["step"])
        say(f"figures: {', '.join(str(p) for p in paths)}")
    except Exception as e:  # figures must never lose a finished run
        say(f"warning: could not draw figures ({type(e).__name__}: {e})")


__all__ = ["run", "evaluate", "train_step", "RunData", "DataError"]
