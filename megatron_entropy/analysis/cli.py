"""Shared command-line plumbing of the analysis tools (tools/pi_cost.py, plot_entropy.py, reproduce.py)."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input as one `error: ...` line on stderr and exits with code 2."""

    def error(self, message):  # argparse would print the whole usage first
        fail(message)


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate config overrides (`--section.key value`, `--section.key=value`) from other arguments."""
    own, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:].split("=", 1)[0]
        if arg.startswith("--") and "." in key:
            take = 1 if "=" in arg or i + 1 >= len(argv) else 2
            overrides += argv[i:i + take]
            i += take
        else:
            own.append(arg)
            i += 1
    return own, overrides
