"""Downstream evaluation with lm-evaluation-harness (the optional `eval` extra).

    local_tasks.py   the shipped task set, built from the embedded corpus' held-out files
    harness.py       a checkpoint (any layout) or a Hugging Face directory -> lm-eval results
    periodic.py      lm-eval during training (train.eval_harness_tasks), on rank 0

Only periodic.py and local_tasks.py are imported by training code; lm_eval itself is imported
lazily, so a machine without the extra trains as before.
"""
