#!/usr/bin/env python
"""Run train.py (same arguments) while sampling the process's live heap bytes; write the peak.

    PEAK_FILE=out.json python benchmarks/peak_worker.py --config tiny ...

A daemon thread reads glibc's mallinfo2() every millisecond: uordblks (bytes in use in the malloc
arenas) + hblkhd (bytes in mmap'd blocks) is what the program holds right now -- torch's CPU
tensors included, whatever glibc keeps cached after frees (which peak RSS would count). PyTorch
releases the GIL inside its kernels, so the sampler also runs in the middle of a forward or
backward. At exit (train.py's exit_process runs the atexit handlers) the peak and ru_maxrss go
to $PEAK_FILE as JSON. Linux with glibc >= 2.33 only.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import resource
import runpy
import sys
import threading
import time
from pathlib import Path


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def main() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    peak = [0]

    def live() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], live())
            time.sleep(0.001)

    def report() -> None:
        peak[0] = max(peak[0], live())
        Path(os.environ["PEAK_FILE"]).write_text(json.dumps(
            {"peak_live": peak[0], "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))

    atexit.register(report)
    threading.Thread(target=sample, daemon=True).start()
    train = Path(__file__).resolve().parent.parent / "train.py"
    sys.argv = [str(train), *sys.argv[1:]]
    runpy.run_path(str(train), run_name="__main__")


if __name__ == "__main__":
    main()
