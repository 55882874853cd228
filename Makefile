# The two commands of the README. Both do all set-up first (scripts/setup.sh, idempotent).
.PHONY: setup pi-setup train test

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export OMP_NUM_THREADS ?= 2

setup:
	bash scripts/setup.sh

# The private-inference environment: SPU + JAX in their own .venv-pi (they conflict with .venv);
# tools/pi_measure.py runs there (docs/pi.md). CI installs it in .ci/run.
pi-setup:
	bash scripts/setup_pi.sh

# The main job: the tiny EReg(SM(t)+ScFuFFN) model on the embedded corpus, through DeepSpeed.
train: setup
	.venv/bin/deepspeed train.py --deepspeed ds_configs/zero2.json

# The whole test suite (what CI runs). Two workers: most tests wait on process start-up,
# barriers and Slurm scheduling; the Slurm jobs share one worker (xdist_group "slurm").
test: setup
	.venv/bin/python -m pytest -n 2 --dist loadgroup tests
