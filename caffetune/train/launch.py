"""Launching `caffe train`: the command's GPU flags, its environment, Ctrl-C forwarding, and the process loop that
copies caffe's output to caffe.log and feeds it, parsed, to a watcher.

Ctrl-C is forwarded to caffe as SIGINT (caffe's default -sigint_effect=stop snapshots and stops cleanly); a second
Ctrl-C kills it. caffe runs in its own session (a terminal's Ctrl-C reaches only caffetune, which decides), and on
Linux it is killed when caffetune dies without stopping it (SIGKILL, OOM killer): PR_SET_PDEATHSIG.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message

from caffetune.errors import RunError
from caffetune.model import caffe_tools
from caffetune.model.caffe_tools import CaffeInstall
from caffetune.train.events import Notice
from caffetune.train.logparse import LogParser


def gpu_flags(install: CaffeInstall, gpu: str | None, strict: bool, solver: Message) -> tuple[list[str], str,
                                                                                              list[Notice]]:
    """caffe's -gpu flag and the solver_mode to write. A GPU on a CPU_ONLY build falls back to CPU (or fails)."""
    solver_mode = solver.DESCRIPTOR.fields_by_name["solver_mode"].enum_type.values_by_number[solver.solver_mode].name
    if gpu is not None:
        if install.is_cuda:
            return [f"-gpu={gpu}"], "GPU", []
        if strict:
            raise RunError(f"--gpu {gpu} asked for, but {install.binary} is a CPU_ONLY build",
                           fix="build Caffe with CUDA (CAFFE_CUDA=1 make caffe), or drop --gpu / --strict-gpu")
        return [], "CPU", [Notice("warning", f"--gpu {gpu}: {install.binary} is a CPU_ONLY build; training on the "
                                             "CPU instead (--strict-gpu makes this an error)")]
    if solver_mode == "GPU" and not install.is_cuda:
        return [], "CPU", [Notice("warning", "the solver asks for solver_mode: GPU but this Caffe is a CPU_ONLY "
                                             "build; training on the CPU")]
    return [], solver_mode, []


def train_command(install: CaffeInstall, solver: Path, *, snapshot: Path | None = None,
                  weights: list[Path] = (), flags: list[str] = ()) -> list[str]:
    """`caffe train -solver=... [-snapshot=...] [-weights=a,b] [-gpu=...]`."""
    command = [str(install.binary), "train", f"-solver={solver}"]
    if snapshot:
        command.append(f"-snapshot={snapshot}")
    if weights:
        command.append(f"-weights={','.join(str(w) for w in weights)}")
    return command + list(flags)


class _SigintForwarder:
    """While caffe runs: the first Ctrl-C becomes caffe's SIGINT (snapshot, then stop), a second one kills it."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.count, self.previous = process, 0, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, _signum, _frame) -> None:
        self.count += 1
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT if self.count == 1 else signal.SIGKILL)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


_PR_SET_PDEATHSIG = 1     # <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGKILL when this process dies (Linux prctl PR_SET_PDEATHSIG; None
    elsewhere). Without it a caffe in its own session outlives a killed caffetune and trains on, unwatched, until
    its next log line meets the broken pipe (SIGPIPE): with display 0, or a long display interval and no data
    layer output, that may be max_iter. libc is looked up here, in the parent, so that the child between fork and
    exec only makes the call. The signal follows the death of the thread that started caffe: run_caffe waits for
    caffe in that thread."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:       # the parent died before the call: nobody would send the signal
            os.kill(os.getpid(), signal.SIGKILL)

    return set_death_signal


def caffe_env(install: CaffeInstall) -> dict:
    env = install.env()
    env["GLOG_logtostderr"] = "1"     # the whole log on the pipe, no /tmp/caffe.* files
    env.pop("GLOG_minloglevel", None)  # the INFO lines are the progress
    return env


@dataclass(frozen=True)
class Exit:
    status: int          # caffe's exit status
    interrupts: int      # Ctrl-Cs received while it ran


def run_caffe(command: list[str], run_dir: Path, install: CaffeInstall, watch, append_log: bool,
              on_started: Callable[[], None]) -> Exit:
    """Launch caffe in `run_dir`, copy its output to caffe.log, feed the parsed lines to `watch.on_item` and do
    what `watch.pending_action()` asks (stop gracefully, or kill)."""
    parser = LogParser()
    with open(run_dir / "caffe.log", "ab" if append_log else "wb") as log:
        process = subprocess.Popen(command, cwd=run_dir, env=caffe_env(install), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=die_with_parent())   # noqa: PLW1509 (only a libc call in the child)
        on_started()  # bookkeeping while caffe sets up its nets, not before
        with _SigintForwarder(process) as forwarder:
            for raw in process.stdout:
                log.write(raw)
                for item in parser.feed(raw.decode(errors="replace")):
                    watch.on_item(item)
                _act(watch.pending_action(), process)
            for item in parser.close():
                watch.on_item(item)
            status = process.wait()
    return Exit(status, forwarder.count)


def _act(action: str | None, process: subprocess.Popen) -> None:
    if action is None or process.poll() is not None:
        return
    if action == "kill":
        process.kill()                          # a diverged net is not worth a snapshot
    elif action == "stop":
        process.send_signal(signal.SIGINT)      # as Ctrl-C: caffe snapshots and stops


def failure(fatal: list[str], status: int, run_dir: Path) -> RunError:
    """The error of a caffe that failed: its own last FATAL line."""
    last = caffe_tools.strip_glog_prefix(fatal[-1]) if fatal else f"caffe exited with status {status}"
    return RunError(f"caffe train failed: {last}", where=str(run_dir / "caffe.log"),
                    fix="read the end of caffe.log; `caffetune run` checks most causes before launching (do not "
                        "pass --no-preflight)")
