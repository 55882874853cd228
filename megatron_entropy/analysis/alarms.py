"""Entropy alarms: entropy collapse and entropic overload (paper section 3, Fig. 2a).

- Collapse: a layer's mean head entropy falls below `collapse_fraction * log T` (deep layers of
  the Softmax-only model go to ~0, paper Fig. 3f). One episode per layer.
- Overload: the share of heads in the top entropy bin [3m/4, m] exceeds `overload_share`, where m
  is the largest observed head entropy (paper Fig. 2a bins), and m itself is above the collapse
  threshold. One episode for the whole model.

Each alarm fires once when its condition starts and re-arms when the condition clears, so a run
that stays collapsed for 10K steps logs one record, not one per logging interval. "Clears" has a
small hysteresis (`rearm_margin`, 10%): a share hovering at 13/24 vs 12/24 heads would otherwise
re-fire every few hundred steps (seen in the reduced study's SM+LN+R run).
"""

from __future__ import annotations

import math
import sys

COLLAPSE = "entropy_collapse"
OVERLOAD = "entropic_overload"


def _nanmean(values) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else float("nan")


def top_bin_share(matrix) -> float:
    """Share of heads in [3m/4, m], m = max observed head entropy (paper Fig. 2a)."""
    from megatron_entropy.model.entropy import entropy_bins  # one definition of the bins

    return float(entropy_bins(matrix)[3])


class EntropyAlarms:
    """Stateful checker; `check` returns only the alarm records that are new at this step.

    `grace_steps` (default 0: the contract's behaviour) suppresses alarms before that step. At
    initialisation attention is near-uniform (every head in the top bin) or, with the paper's
    temperature init 1e-2, near one-hot (collapsed), so the first logged steps can trip either
    alarm for a healthy run; a caller may pass its warm-up length here.
    An episode ends when the layer mean rises to (1 + rearm_margin) x the collapse threshold, or
    the top-bin share falls to (1 - rearm_margin) x overload_share.
    """

    def __init__(self, log_t: float, collapse_fraction: float = 0.1, overload_share: float = 0.5,
                 grace_steps: int = 0, rearm_margin: float = 0.1):
        self.log_t = float(log_t)
        self.collapse_threshold = collapse_fraction * self.log_t
        self.overload_share = float(overload_share)
        self.grace_steps = int(grace_steps)
        self.rearm_margin = float(rearm_margin)
        self._collapsed_layers: set[int] = set()  # layers inside a collapse episode
        self._overloaded = False

    def check(self, step: int, entropy_matrix) -> list[dict]:
        """entropy_matrix: [L][H] per-head mean entropies (NaN allowed). Returns new alarm records."""
        rows = [list(map(float, row)) for row in _as_rows(entropy_matrix)]
        if step < self.grace_steps:
            return []
        return self._check_collapse(step, rows) + self._check_overload(step, rows)

    def _check_collapse(self, step: int, rows: list[list[float]]) -> list[dict]:
        records = []
        for layer, row in enumerate(rows):
            mean = _nanmean(row)
            if math.isnan(mean):  # diverged layer: NaN counts report it; keep the episode state
                continue
            if mean >= self.collapse_threshold * (1 + self.rearm_margin):
                self._collapsed_layers.discard(layer)  # condition cleared: re-arm
            elif mean < self.collapse_threshold and layer not in self._collapsed_layers:
                self._collapsed_layers.add(layer)
                records.append(_record(
                    step, COLLAPSE, layer, mean, self.collapse_threshold,
                    f"entropy collapse in layer {layer}: mean head entropy {mean:.3f} < "
                    f"{self.collapse_threshold:.3f} (= {self.collapse_threshold / self.log_t:g} x log T)",
                ))
        return records

    def _check_overload(self, step: int, rows: list[list[float]]) -> list[dict]:
        share = top_bin_share(rows)
        if math.isnan(share):
            return []
        # The bins are relative to the largest observed entropy: in a fully collapsed model every
        # head sits near that (tiny) maximum. That is collapse, not overload.
        largest = max((v for row in rows for v in row if not math.isnan(v)), default=0.0)
        overloaded = share > self.overload_share and largest >= self.collapse_threshold
        if not overloaded:
            if share <= self.overload_share * (1 - self.rearm_margin) or largest < self.collapse_threshold:
                self._overloaded = False  # condition cleared: re-arm
            return []
        if self._overloaded:
            return []
        self._overloaded = True
        return [_record(
            step, OVERLOAD, None, share, self.overload_share,
            f"entropic overload: {100 * share:.0f}% of heads in the top entropy bin "
            f"(> {100 * self.overload_share:.0f}%)",
        )]


def _as_rows(matrix) -> list:
    if hasattr(matrix, "tolist"):
        matrix = matrix.tolist()
    return [row if isinstance(row, (list, tuple)) else [row] for row in matrix]


def _record(step, alarm, layer, value, threshold, message) -> dict:
    return {"kind": "alarm", "step": int(step), "alarm": alarm, "layer": layer,
            "value": float(value), "threshold": float(threshold), "message": message}


def wandb_alert(record: dict) -> None:
    """Send an alarm record to wandb.alert, only when a wandb run is active and online."""
    wandb = sys.modules.get("wandb")  # never imported: no run can be active; stay import-light
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None or getattr(run, "offline", True) or getattr(run, "disabled", False):
        return
    try:
        wandb.alert(title=record["alarm"].replace("_", " "), text=record["message"], level="WARN")
    except Exception as e:  # an alert must never take the training run down
        print(f"warning: wandb.alert failed: {e}", file=sys.stderr)
