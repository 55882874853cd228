"""Where metrics go: <run_dir>/metrics.jsonl, the console, wandb, a progress bar. Rank 0 only.

wandb: "auto" is online when WANDB_API_KEY is set and offline otherwise (offline never touches the
network; `wandb sync` uploads later); "off" disables it. No secret is ever written to a log.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path


def perplexity(loss: float) -> float:
    """exp(loss), inf instead of OverflowError when a diverged run's loss is past exp's range."""
    return math.exp(loss) if not loss > 709.0 else math.inf


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def wandb_mode(setting: str) -> str | None:
    if setting == "off":
        return None
    if setting == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return setting


class MetricsLogger:
    def __init__(self, run_dir: Path, config: dict, enabled: bool, wandb_setting: str, project: str,
                 total_steps: int, progress_bar: bool, initial_step: int = 0):
        self.enabled, self.run_dir = enabled, Path(run_dir)
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        mode = wandb_mode(wandb_setting)
        if mode is not None:
            import wandb

            self.wandb = wandb.init(project=project, dir=str(self.run_dir), config=config, mode=mode,
                                    name=self.run_dir.name, settings=wandb.Settings(silent=True))
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = _jsonable(record)
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            scalars = {f"{record.get('kind', 'train')}/{k}": v for k, v in record.items()
                       if isinstance(v, (int, float)) and k not in ("step", "kind")}
            self.wandb.log(scalars, step=record["step"])

    def console(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def advance(self, step: int, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.n = step
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
