#!/usr/bin/env python
"""Pretrain a (softmax-only, entropy-guided) GPT.

    python train.py                                          # tiny EReg model, embedded corpus, 1 process
    deepspeed train.py --deepspeed ds_configs/zero2.json     # the same through DeepSpeed's launcher
    torchrun --nproc_per_node 2 train.py --parallel.tensor 2
    python train.py --config gpt2_small_codeparrot_t128 --model.variant SM+LN+G --data.train_data ...

Options: --config PRESET_OR_YAML (default tiny), --deepspeed DS_CONFIG.json, and any config key as
--section.key VALUE (see docs/configuration.md or --help-config). Bad input exits with code 2 and
one line saying what to fix.

    python train.py --config 1b --deepspeed ds_configs/zero1.json --dry-run --world-size 32 [--gpu h200]
validates everything, builds the model on the meta device, prints the per-rank parameters and the
planner's memory / step-time estimate (docs/planning.md) and exits 0: run it before `sbatch`.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

USAGE = __doc__


def split_args(argv: list[str]):
    """Separate our launcher-level options from the dotted config overrides."""
    preset, ds_config, overrides, i = "tiny", None, [], 0
    while i < len(argv):
        arg = argv[i]
        name, _, inline = arg.partition("=")
        if name in ("--config", "--deepspeed", "--deepspeed_config"):
            value = inline or (argv[i + 1] if i + 1 < len(argv) else None)
            if value is None or value.startswith("--"):
                raise SystemExit(_fail(f"{name} needs a value"))
            if name == "--config":
                preset = value
            else:
                ds_config = value
            i += 1 if inline else 2
        elif name in ("--local_rank", "--local-rank"):  # passed by the deepspeed launcher
            i += 1 if inline else 2
        else:
            overrides.append(arg)
            i += 1
    return preset, ds_config, overrides


def take_dry_run_options(argv: list[str]):
    """(None or {'world_size': int | None, 'gpu': str}, the other arguments) for --dry-run."""
    if "--dry-run" not in argv:
        return None, argv
    rest, options, i = [], {"world_size": None, "gpu": "h100"}, 0
    while i < len(argv):
        if argv[i] in ("--world-size", "--gpu") and i + 1 < len(argv):
            options[argv[i][2:].replace("-", "_")] = argv[i + 1]
            i += 2
            continue
        if argv[i] != "--dry-run":
            rest.append(argv[i])
        i += 1
    return options, rest


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv and argv[0] == "--help-config":
        from megatron_entropy.config import describe_keys

        for key, typ, default in describe_keys():
            print(f"--{key:42s} {typ:16s} default {default!r}")
        return 0

    from megatron_entropy.config import ConfigError, build_config
    from megatron_entropy.data import DataError
    from megatron_entropy.training.checkpoint import CheckpointError

    try:
        dry_run, argv = take_dry_run_options(argv)
        preset, ds_config, overrides = split_args(argv)
        cfg = build_config(preset, overrides)
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE",
                                                                os.environ.get("SLURM_NTASKS", "1"))))
        if dry_run:
            from megatron_entropy.training.dry_run import check_options, dry_run as plan_run

            world = check_options(dry_run, world)
            cfg.validate(world_size=world)
            return plan_run(cfg, ds_config, world, gpu=dry_run["gpu"])
        cfg.validate(world_size=world)
        if ds_config:
            from megatron_entropy.training.engine import build_ds_config, load_ds_config

            build_ds_config(cfg, load_ds_config(ds_config), world, source=ds_config)
    except (ConfigError, DataError) as e:
        return _fail(str(e))

    from megatron_entropy.training.distributed import init_distributed
    from megatron_entropy.training.loop import run

    info = init_distributed()
    try:
        run(cfg, ds_config, info)
    except (ConfigError, DataError, CheckpointError) as e:
        return _fail(str(e))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except SystemExit as e:  # _fail via split_args, argparse-style exits
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 -- printed as Python would, then the same clean exit
        import traceback

        traceback.print_exc()
        code = 1
    if "torch.distributed" not in sys.modules:
        sys.exit(code)  # --help, bad config: torch was never loaded
    from megatron_entropy.training.distributed import exit_process

    exit_process(code)  # not sys.exit: see exit_process for the Gloo shutdown race it avoids
