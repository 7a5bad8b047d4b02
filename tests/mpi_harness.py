"""Run real multi-rank jobs from pytest: ``mpirun -np N`` or ``horovodrun --gloo -np N``.

Every job has a timeout; on a non-zero exit or a timeout the assertion message carries every
rank's output (lines are tagged ``[1,R]<stdout>:`` by mpirun, ``[R]<stdout>:`` by horovodrun),
so a hang fails fast and shows where each rank was.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hvd_yolo import launch

VENV_BIN = Path(sys.executable).parent
_TAG = re.compile(r"^\[(?:1,)?(\d+)\]<std(?:out|err)>:")
_TAG_ANYWHERE = re.compile(r"\[(?:1,)?\d+\]<std(?:out|err)>:")


@dataclass
class JobResult:
    returncode: int
    output: str  # stdout and stderr of all ranks, interleaved, rank-tagged
    timed_out: bool
    argv: list[str]

    def rank_lines(self, rank: int) -> list[str]:
        """The lines printed by ``rank`` (stdout and stderr), tags removed.

        Open MPI 4.1's ``--tag-output`` sometimes drops a line's newline, so the next tagged
        line (of any rank, stdout or stderr) follows on the same line: every tag starts a line.
        """
        out = []
        text = _TAG_ANYWHERE.sub(lambda m: "\n" + m.group(0), self.output)
        for line in text.splitlines():
            m = _TAG.match(line)
            if m and int(m.group(1)) == rank:
                out.append(line[m.end():])
        return out

    def values(self, key: str) -> dict[int, str]:
        """Per rank, the last ``key=value`` printed as a line ``key=value`` by that rank."""
        found: dict[int, str] = {}
        for r in range(64):
            for line in self.rank_lines(r):
                if line.startswith(key + "="):
                    found[r] = line[len(key) + 1:]
        return found


def mpirun_argv(np: int) -> list[str]:
    """The package's recommended Open MPI line (hvd_yolo.launch), with rank-tagged output."""
    return launch.mpirun_argv(np, tag_output=True)


def horovodrun_argv(np: int) -> list[str]:
    return [str(VENV_BIN / "horovodrun"), "--gloo", "-np", str(np), "-H", f"localhost:{np}"]


def run_job(
    command: list[str],
    np: int = 2,
    launcher: str = "mpirun",
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    check: bool = True,
) -> JobResult:
    """Launch ``command`` on ``np`` ranks; with ``check``, fail (showing all output) unless rc 0."""
    if launcher == "mpirun":
        argv = mpirun_argv(np) + command
    elif launcher == "horovodrun":
        argv = horovodrun_argv(np) + command
    else:
        raise ValueError(f"launcher must be mpirun or horovodrun, got {launcher!r}")
    return run_argv(argv, timeout=timeout, env=env, cwd=cwd, check=check)


def run_argv(
    argv: list[str],
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    check: bool = True,
) -> JobResult:
    """Run ``argv`` in its own process group (the venv first on PATH); on timeout stop the
    whole group (SIGTERM, then SIGKILL); with ``check``, fail showing all output unless rc 0."""
    full_env = dict(os.environ)
    full_env["PATH"] = f"{VENV_BIN}{os.pathsep}{full_env.get('PATH', '')}"
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    full_env.update(env or {})
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, cwd=cwd, start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
    result = JobResult(proc.returncode if not timed_out else -1, output or "", timed_out, argv)
    if check and (timed_out or result.returncode != 0):
        raise AssertionError(describe_failure(result, timeout))
    return result


def describe_failure(result: JobResult, timeout: float) -> str:
    what = f"timed out after {timeout:.0f} s" if result.timed_out else f"exited {result.returncode}"
    return f"job {what}: {' '.join(result.argv)}\n----- output of every rank -----\n{result.output}"


def run_python(code: str, np: int = 2, **kwargs) -> JobResult:
    """Run a Python snippet on every rank (dedented; ``python -c``)."""
    return run_job([sys.executable, "-c", textwrap.dedent(code)], np=np, **kwargs)


def run_cli(args: list[str], np: int = 2, **kwargs) -> JobResult:
    """Run ``hvd-yolo ARGS`` on every rank."""
    return run_job([str(VENV_BIN / "hvd-yolo"), *args], np=np, **kwargs)


def _drained(proc: subprocess.Popen) -> str:
    out = proc.communicate()[0] or ""
    return out if isinstance(out, str) else out.decode(errors="replace")


def wait_for(cond: Callable[[], bool], timeout: float, what: str,
             proc: subprocess.Popen | None = None) -> float:
    """Poll ``cond`` until it holds; returns the time (``time.time()``) it did. Fails, with the
    job's output, when ``proc`` ends first or at the deadline (then the job's process group is
    killed first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return time.time()
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}:\n"
                                 + _drained(proc)[-4000:])
        time.sleep(0.1)
    if proc is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"no {what} within {timeout:g} s:\n" + _drained(proc)[-4000:])
    raise AssertionError(f"no {what} within {timeout:g} s")


def log_lines(path: Path) -> int:
    """Lines in a (rank or metrics) log so far; 0 before it exists."""
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0
