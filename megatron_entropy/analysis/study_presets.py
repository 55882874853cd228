"""The study's two fixed designs: FULL (the report in docs/analysis.md section 5) and SMOKE (CI).

FULL was chosen from measurements of how each effect depends on depth, learning rate and steps
(docs/analysis.md section 5, "Choosing the design"). Every run uses the eager attention core, whose
temperature gradient is exact at t = 1e-2 (docs/fused_attention.md).
"""

from __future__ import annotations

from megatron_entropy.analysis.study import EREG, STUDY_VARIANTS, Arm, StudySettings

DESIGN = ["--model.num_layers", "8", "--model.hidden_size", "64", "--model.seq_length", "64",
          "--train.lr", "3e-3", "--train.min_lr", "3e-5", "--train.warmup_steps", "100",
          "--model.attention_core", "eager", "--train.eval_interval", "0", "--train.eval_iters", "0",
          "--logging.log_interval", "50",
          # pinned so a change of the tiny preset's optimiser defaults does not change the study
          "--train.global_batch_size", "16", "--train.micro_batch_size", "8", "--train.adam_beta2", "0.95",
          "--train.adam_eps", "1e-8", "--train.grad_clip", "1.0", "--train.weight_decay", "0.1"]


# EReg's main arm starts its temperatures at 1 (standard attention): the paper's 1e-2 collapsed the
# deep layers and cost perplexity in the design runs (docs/analysis.md section 5). Its other settings
# are the package defaults: log-parameterised t, theta init 0.5, lambda 1e-5, token_mean reduction.
EREG_MAIN = ("--model.temperature_init", "1.0")


def _sensitivity(label: str, note: str, *overrides: str) -> Arm:
    """An EReg arm that differs from the main one in exactly `overrides` (one seed)."""
    return Arm(label, EREG, EREG_MAIN + overrides, note)


# The paper's open choices (paper.md ambiguities A1, A5 and the regulariser's reduction).
SENSITIVITIES = (
    _sensitivity("EReg t0=1e-2 (paper)", "temperature init 1e-2", "--model.temperature_init", "1e-2"),
    _sensitivity("EReg raw t", "t learned directly (clamped >= 1e-4), as the paper's code", "--model.temperature_param", "raw"),
    _sensitivity("EReg theta0=0.3", "threshold init 0.3 (trained values end at 0.2-0.5)", "--model.entropy_threshold_init", "0.3"),
    _sensitivity("EReg paper_sum", "reduction of the official code (sum over positions)", "--model.entropy_reduction", "paper_sum"),
    _sensitivity("EReg paper_text", "reduction of the paper's text (mean over queries, one penalty per head)",
                 "--model.entropy_reduction", "paper_text"),
    _sensitivity("EReg lambda=1e-4", "lambda x10 (token_mean)", "--model.entropy_reg_coeff", "1e-4"),
)

FULL = StudySettings(STUDY_VARIANTS, steps=1000, overrides=DESIGN, seeds=(1, 2, 3), sensitivities=SENSITIVITIES,
                     arm_overrides={EREG: EREG_MAIN})

SMOKE = StudySettings(("SM+LN+G", EREG), steps=20, seeds=(1,),
                      overrides=["--model.num_layers", "2", "--model.hidden_size", "64", "--model.seq_length", "64",
                                 "--data.corpus_max_bytes", "300000", "--data.tokenizer_vocab_size", "512",
                                 "--train.eval_interval", "0", "--model.attention_core", "eager",
                                 "--logging.log_interval", "5"])
