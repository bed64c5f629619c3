"""Several processes of one service on one port (SO_REUSEPORT), so one host uses all its cores.

A Python gRPC server spends a core's worth of CPU long before the machine is busy (issue #13:
about 550 µs of producer CPU per unary Enqueue). gRPC's own answer for Python is several
processes listening on the same port with SO_REUSEPORT, the kernel spreading new connections
over them. This module is the parent: it checks that the port is free, starts ``count``
members (``python -m <module>`` with CONVEYOR_PROCESS_INDEX set), forwards SIGTERM/SIGINT to
them, restarts a member that dies (with backoff), and stops them all when one cannot start
because of its configuration. Members die with the parent (PR_SET_PDEATHSIG), so a SIGKILLed
parent leaves no orphan holding the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

log = structlog.get_logger("conveyor.process_group")

#: Set in each member's environment: its index in the group (0, 1, ...).
INDEX_VAR = "CONVEYOR_PROCESS_INDEX"
#: Exit codes after which restarting is pointless: the configuration must change first.
FATAL_EXITS = frozenset({78, 98})
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the member, before exec: ask the kernel for SIGTERM when the parent dies."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: members may outlive the parent
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class _Member:
    index: int
    proc: subprocess.Popen[bytes]
    started: float
    #: Seconds to wait before the next restart (doubles, reset after a minute of good health).
    backoff: float = 1.0
    restart_at: float = 0.0


class ProcessGroup:
    """``count`` members of ``python -m module``; :meth:`run` supervises them until stopped."""

    def __init__(self, module: str, count: int, *, grace_s: float = 10.0, env: Mapping[str, str] | None = None) -> None:
        self._module = module
        self._count = count
        self._grace_s = grace_s
        self._env = dict(os.environ if env is None else env)
        self._members: dict[int, _Member] = {}
        self._stopping = False
        #: When members still running after a stop get SIGKILL (their grace, and some margin).
        self._stop_deadline: float | None = None

    def _spawn(self, index: int, backoff: float = 1.0) -> _Member:
        proc = subprocess.Popen(
            [sys.executable, "-m", self._module],
            env={**self._env, INDEX_VAR: str(index)},
            preexec_fn=_die_with_parent,  # only prctl: nothing that could deadlock after fork
        )
        log.info("member_started", index=index, pid=proc.pid)
        member = _Member(index, proc, time.monotonic(), backoff)
        self._members[index] = member
        return member

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self._stopping:
            log.info("group_stopping", signal=signal.Signals(signum).name, members=len(self._members))
        self._stopping = True
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self._grace_s + 15.0
        for member in self._members.values():
            if member.proc.poll() is None:
                member.proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0 once every member stopped) or a fatal member exit (its code)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for index in range(self._count):
            self._spawn(index)
        fatal = 0
        while True:
            now = time.monotonic()
            for member in list(self._members.values()):
                code = member.proc.poll()
                if code is None:
                    if now - member.started > 60:
                        member.backoff = 1.0
                    continue
                if self._stopping or fatal:
                    continue
                if code in FATAL_EXITS:
                    log.error("member_cannot_start", index=member.index, exit_code=code)
                    fatal = code
                    self._on_signal(signal.SIGTERM, None)
                    continue
                if member.restart_at == 0.0:
                    member.restart_at = now + member.backoff
                    log.warning("member_exited", index=member.index, exit_code=code, restart_in_s=member.backoff)
                elif now >= member.restart_at:
                    self._spawn(member.index, backoff=min(30.0, member.backoff * 2))
            if (self._stopping or fatal) and all(m.proc.poll() is not None for m in self._members.values()):
                break
            if self._stop_deadline is not None and now > self._stop_deadline:
                for member in self._members.values():
                    if member.proc.poll() is None:
                        member.proc.kill()
            time.sleep(0.1)
        log.info("group_stopped", exit_code=fatal)
        return fatal
