"""llama.cpp work in a child process: a native crash becomes one clear error, never a silent exit.

A segmentation fault (or any signal) inside llama.cpp kills the process that runs it; in the CLI
that would end the tool with exit 139 and no message. :func:`run_isolated` runs a module-level
function in a spawned child and relays its messages; the child announces each step
(:meth:`ChildReporter.phase`: what it does to which file of which type) before doing it, so when the
child dies the parent raises :class:`LlamaCppCrash` naming the file, its type, the llama.cpp version
and the signal. Exceptions raised in the child come back as the same package error (or RuntimeError).

Test hook: ``DSNOT_LLAMACPP_FAULT=segv`` makes the child dereference a null pointer at its first
``decoding`` step, a real SIGSEGV, so the containment itself is tested.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsnot_deploy import errors
from dsnot_deploy.errors import DsnotError

logger = logging.getLogger(__name__)

FAULT_ENV = "DSNOT_LLAMACPP_FAULT"
EXIT_CRASH = 1


class LlamaCppCrash(DsnotError):
    """llama.cpp ended the process that ran it (a signal or an abort): the CLI exits with code 1."""

    exit_code = EXIT_CRASH


@dataclass(frozen=True)
class Phase:
    """What the child was doing: ``what`` (loading, decoding...) to ``path`` of GGUF type ``qtype``."""

    what: str
    path: str
    qtype: str


class ChildReporter:
    """The child's side of the pipe: :meth:`phase` before each llama.cpp step, :meth:`send` for results."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._fault = os.environ.get(FAULT_ENV, "").strip().lower()

    def phase(self, what: str, path: str | os.PathLike[str], qtype: str) -> None:
        self._conn.send(("phase", Phase(what, str(path), qtype)))
        if self._fault == "segv" and what == "decoding":
            ctypes.string_at(0)  # a real null-pointer read: SIGSEGV, as a llama.cpp kernel fault would be

    def send(self, kind: str, *payload: Any) -> None:
        self._conn.send((kind, *payload))


def _child_main() -> None:
    """Entry point of the child (``python -c``): the socket's fd is argv[1]; the first message is the job."""
    from multiprocessing.connection import Connection

    conn = Connection(int(sys.argv[1]))
    try:
        target, args, log_level = conn.recv()
    except Exception as exc:  # noqa: BLE001 - an unimportable target is reported like any failure
        conn.send(("error", type(exc).__name__, f"could not receive the job: {exc}"))
        conn.close()
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dsnot_deploy").setLevel(log_level)
    logging.getLogger("converters").setLevel(log_level)
    reporter = ChildReporter(conn)
    try:
        result = target(reporter, *args)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent as data
        conn.send(("error", type(exc).__name__, str(exc)))
    else:
        conn.send(("result", result))
    finally:
        conn.close()


def _signal_name(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"{signal.Signals(-exitcode).name}, signal {-exitcode}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def crash_message(exitcode: int, phase: Phase | None) -> str:
    """The one line a crashed child becomes (file, type, llama.cpp version, signal, what to try)."""
    from converters.llamacpp_loader import (
        EXTRA_BUFTS_ENV,
        llamacpp_version,
        resolve_extra_buffers,
    )

    try:
        bufs = resolve_extra_buffers()
        buffers = f"extra buffer types {'on' if bufs.enabled else 'off'}: {bufs.reason}"
    except DsnotError as exc:
        buffers = str(exc)
    where = (f"while {phase.what} {Path(phase.path).name} (type {phase.qtype})" if phase is not None
             else "before it opened a file")
    return (f"llama.cpp crashed ({_signal_name(exitcode)}) {where} with {llamacpp_version()} ({buffers}); "
            f"nothing was written. See docs/llamacpp-amx.md; {EXTRA_BUFTS_ENV}=off avoids the repacking kernels")


def run_isolated(target: Callable[..., Any], *args: Any,
                 on_message: Callable[[tuple[Any, ...]], None] | None = None) -> Any:
    """``target(reporter, *args)`` in a child Python process; its return value, or the error it raised.

    ``target`` must be a module-level function of an importable module and its arguments picklable.
    The child is a fresh interpreter (``python -c``) with the parent's ``sys.path``, talking over a
    socket pair: unlike multiprocessing's spawn it never re-runs the caller's ``__main__``, so scripts
    need no entry-point guard. Messages the child sends with ``reporter.send(kind, ...)`` reach
    ``on_message((kind, ...))`` as they arrive. A child that dies (signal, abort, ``os._exit``) raises
    :class:`LlamaCppCrash` with the last announced phase.
    """
    from multiprocessing.connection import Connection

    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    command = [sys.executable, "-c", "from dsnot_deploy.evaluation.llamacpp_child import _child_main; _child_main()",
               str(theirs.fileno())]
    try:
        process = subprocess.Popen(command, pass_fds=(theirs.fileno(),), env=env)
    finally:
        theirs.close()  # only the child holds its end: EOF on ours means the child is gone
    conn = Connection(ours.detach())
    phase: Phase | None = None
    outcome: tuple[Any, ...] | None = None
    try:
        conn.send((target, args, logging.getLogger("dsnot_deploy").getEffectiveLevel()))
        while outcome is None:
            try:
                message = conn.recv()
            except (EOFError, ConnectionResetError):
                break
            kind = message[0]
            if kind == "phase":
                phase = message[1]
            elif kind in ("result", "error"):
                outcome = message
            elif on_message is not None:
                on_message(message)
        returncode = process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        conn.close()
    if outcome is None or (returncode != 0 and outcome[0] != "error"):
        raise LlamaCppCrash(crash_message(returncode, phase))
    if outcome[0] == "result":
        return outcome[1]
    _, name, text = outcome
    error_class = getattr(errors, name, None)
    if isinstance(error_class, type) and issubclass(error_class, DsnotError):
        raise error_class(text)
    if name == "KeyboardInterrupt":
        raise KeyboardInterrupt
    raise RuntimeError(f"{name} in the llama.cpp child process: {text}")
