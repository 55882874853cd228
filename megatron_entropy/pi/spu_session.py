"""Two SPU parties in one process (threads linked in memory, as spu.utils.simulation.Simulator does),
kept alive across stages so that shares stay inside the protocol from the first stage to the last.

Why not Simulator / sim_jax: they reconstruct every output in the clear and start fresh runtimes
for each call (a fresh protocol setup each time). Here each party's runtime holds its shares in its
own symbol table; a stage reads and writes named variables there, and only `reveal` reconstructs.

Per-stage cost comes from SPU's own profiler (RuntimeConfig.enable_pphlo_profile on party 0):
after every run it logs the run's link totals ("Link details: total send bytes ..., recv bytes ...,
send actions ..., recv actions ...") and per-pphlo-op lines. That log is C++ (spdlog to stdout), so
it is captured by redirecting file descriptor 1 around each run.
"""

from __future__ import annotations

import ctypes
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import spu.api as spu_api
import spu.libspu as libspu
import spu.utils.frontend as spu_fe

PROTOCOLS = {"semi2k": libspu.ProtocolKind.SEMI2K, "cheetah": libspu.ProtocolKind.CHEETAH}
EXP_MODES = {"taylor": libspu.RuntimeConfig.ExpMode.EXP_TAYLOR, "pade": libspu.RuntimeConfig.ExpMode.EXP_PADE}

_LINK = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), send actions (\d+), recv actions (\d+)")
_OP = re.compile(r"- (pphlo\.\w+), executed (\d+) times, duration ([0-9.e+-]+)s, send bytes (\d+) recv bytes (\d+), "
                 r"send actions (\d+), recv actions (\d+)")


def runtime_config(protocol: str, exp_mode: str = "pade", fraction_bits: int = 18) -> libspu.RuntimeConfig:
    """FM64 ring, `fraction_bits` fixed-point fraction bits; the reciprocal is SPU's Goldschmidt (2 iterations)."""
    cfg = libspu.RuntimeConfig(protocol=PROTOCOLS[protocol], field=libspu.FieldType.FM64)
    cfg.fxp_fraction_bits = fraction_bits
    cfg.fxp_exp_mode = EXP_MODES[exp_mode]
    if exp_mode == "taylor":
        cfg.fxp_exp_iters = 8
    cfg.enable_pphlo_profile = True  # party 0 only (see TwoPartySession)
    # Both off (the default), as the profiler's byte counts require.
    cfg.experimental_enable_inter_op_par = False
    cfg.experimental_enable_intra_op_par = False
    return cfg


@dataclass
class RunStats:
    """What one executable cost, seen from party 0 (send = 0 -> 1, recv = 1 -> 0)."""

    send_bytes: int
    recv_bytes: int
    send_actions: int
    recv_actions: int
    seconds: float
    ops: dict = field(default_factory=dict)  # pphlo op -> {"count", "seconds", "bytes", "actions"}

    @property
    def bytes(self) -> int:  # both directions
        return self.send_bytes + self.recv_bytes


def _in_threads(fn, n: int = 2) -> list:
    results, errors = [None] * n, [None] * n

    def target(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # re-raised in the caller
            errors[rank] = e

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in errors:
        if e is not None:
            raise e
    return results


class TwoPartySession:
    def __init__(self, config: libspu.RuntimeConfig):
        self.config = config
        self.io = spu_api.Io(2, config)
        desc = libspu.link.Desc()
        for rank in range(2):
            desc.add_party(f"id_{rank}", f"thread_{rank}")

        def start(rank):  # both parties at once: the link and the runtime handshake with the peer
            rank_config = libspu.RuntimeConfig(config)
            if rank != 0:
                rank_config.enable_pphlo_profile = False
            return spu_api.Runtime(libspu.link.create_mem(desc, rank), rank_config)

        self.runtimes = _in_threads(start)
        self._log = tempfile.TemporaryFile(mode="w+b")
        self._libc = ctypes.CDLL(None)

    def put(self, name: str, array: np.ndarray) -> None:
        """Secret-share `array` between the two parties (no communication: the dealer is this process)."""
        shares = self.io.make_shares(np.ascontiguousarray(array), libspu.Visibility.VIS_SECRET)
        for rank, runtime in enumerate(self.runtimes):
            runtime.set_var(name, shares[rank])

    def reveal(self, name: str) -> np.ndarray:
        return np.asarray(self.io.reconstruct([rt.get_var(name) for rt in self.runtimes]))

    def delete(self, name: str) -> None:
        for runtime in self.runtimes:
            runtime.del_var(name)

    def compile(self, fn, example_args: list, input_names: list[str], output_names: list[str]):
        executable, _ = spu_fe.compile(spu_fe.Kind.JAX, fn, example_args, {}, input_names,
                                       [libspu.Visibility.VIS_SECRET] * len(input_names), lambda outs: output_names)
        return executable

    def run(self, executable) -> RunStats:
        """Run on both parties; the cost is party 0's profile of this run."""
        import sys

        sys.stdout.flush()
        saved = os.dup(1)
        self._log.seek(0)
        self._log.truncate()
        os.dup2(self._log.fileno(), 1)
        try:
            start = time.perf_counter()
            _in_threads(lambda rank: self.runtimes[rank].run(executable))
            seconds = time.perf_counter() - start
        finally:
            self._libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        self._log.seek(0)
        text = self._log.read().decode(errors="replace")
        links = _LINK.findall(text)
        if not links:
            raise RuntimeError("SPU printed no 'Link details' line (is enable_pphlo_profile on?):\n" + text[-2000:])
        sb, rb, sa, ra = map(int, links[-1])
        ops = {}
        for name, count, dur, osb, orb, osa, _ in _OP.findall(text):
            ops[name] = {"count": int(count), "seconds": float(dur), "bytes": int(osb) + int(orb), "actions": int(osa)}
        return RunStats(sb, rb, sa, ra, seconds, ops)
