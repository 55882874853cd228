"""exit_process: a Gloo process ends with the status it chose, its output and atexit work intact.

The race it avoids (a Gloo worker thread freeing a finished collective's tensors during interpreter
finalization aborts the process) is made near-certain here: eight all-reduces are handed to the
worker threads and dropped at once, and a 100 s GIL switch interval keeps the main thread from
yielding the GIL before it exits. With a plain sys.exit this script aborted in 6 of 8 runs.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, free_port

SCRIPT = """
import atexit, os, sys
import torch, torch.distributed as dist
from megatron_entropy.training.distributed import exit_process

os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo")
atexit.register(lambda: open(sys.argv[2], "w").write("atexit ran"))
sys.setswitchinterval(100.0)
for _ in range(8):
    dist.all_reduce(torch.ones(1 << 22), async_op=True)  # the worker thread holds the last reference
sys.stdout.write("unflushed line")
exit_process(3)
"""


def test_gloo_process_exits_with_its_code_after_dropped_collectives(tmp_path):
    for attempt in range(3):
        marker = tmp_path / f"atexit{attempt}"
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(free_port()), str(marker)], cwd=REPO,
                              env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 3, f"attempt {attempt}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        assert proc.stdout == "unflushed line"
        assert marker.read_text() == "atexit ran"
