"""A job owns its output directory: one writer at a time, checked writable before any work, no stale record.

- :func:`run_lock`: an exclusive ``fcntl.flock`` on ``<dir>/.dlab.lock`` held while a training run or a sample /
  evaluate / tune-grid job writes the directory. The kernel releases it when the holder's process dies (SIGKILL
  included), so a lock is never left behind; the holder's pid, host, start time and command are written inside
  for the message a second writer gets (:class:`RunDirBusy`, at once, before any work). A record left by a holder
  that died is taken over with a warning. Under DDP only global rank 0 locks (:func:`launched_as_rank_zero`): the
  other ranks share its directory.
- :func:`probe_writable`: create the directory, then create, write, fsync and delete a probe file in it, so a
  read-only, full or impossible directory is one :class:`RunDirError` naming it and the errno text before the
  checkpoint or any data is loaded.
- :func:`clear_records`: a re-run into a directory removes the previous job's records first, so a kill midway
  never leaves new data beside an old summary.

Needs neither torch nor Lightning.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".dlab.lock"
PROBE_PREFIX = ".dlab-probe-"
# Environment variables a launcher (torchrun, Lightning's subprocess launcher, SLURM, LSF) sets to a process's rank.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class RunDirError(RuntimeError):
    """An output directory that cannot be used: not writable, or owned by another running job."""


class RunDirBusy(RunDirError):
    """Another live process holds the directory's lock; ``holder`` is what it wrote inside (None if unreadable)."""

    def __init__(self, message: str, holder: LockHolder | None) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a directory's lock: written inside the lock file as JSON."""

    pid: int
    host: str
    started: str  # ISO 8601, UTC
    job: str  # e.g. "dlab-train"
    command: str

    @staticmethod
    def this_process(job: str) -> LockHolder:
        """The holder record of the calling process."""
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return LockHolder(os.getpid(), socket.gethostname(), now, job, " ".join(sys.argv))

    def describe(self) -> str:
        """``pid 123 on host h (dlab-train, started 2024-…: <command>)``."""
        return f"pid {self.pid} on host {self.host} ({self.job}, started {self.started}: {self.command})"

    def alive_here(self) -> bool | None:
        """Whether the holder's process is running: None when it ran on another host (it cannot be checked)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists, owned by someone else
            return True
        return True


def read_holder(lock_path: Path) -> LockHolder | None:
    """The holder record in ``lock_path``; None when the file is missing, empty (released) or unreadable."""
    try:
        data = json.loads(lock_path.read_text(encoding="utf-8") or "null")
        return LockHolder(**data) if isinstance(data, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def launched_as_rank_zero() -> bool:
    """Whether this process is global rank 0 (or not launched as one rank of many), from the launcher's
    environment (:data:`RANK_VARIABLES`), so it can be asked before Lightning has set up the ranks."""
    return all(os.environ.get(var, "0").strip() in ("", "0") for var in RANK_VARIABLES)


def probe_writable(directory: str | Path, what: str = "output directory") -> Path:
    """Create ``directory`` (with parents) and create, write, fsync and delete a probe file in it.

    Raises:
        RunDirError: naming ``what``, the directory and the errno text, when any step fails.
    """
    directory = Path(directory)
    probe = directory / f"{PROBE_PREFIX}{socket.gethostname()}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"diffusion_lab write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as err:
        raise RunDirError(_not_writable(what, directory, err)) from err
    return directory


def _not_writable(what: str, directory: Path, err: OSError) -> str:
    code = errno.errorcode.get(err.errno or 0, "?")
    where = f" ({err.filename})" if err.filename and Path(err.filename) != directory else ""
    return f"the {what} {directory} is not writable: {err.strerror or err} [{code}]{where}; nothing was started"


def clear_records(directory: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the records ``names`` (file names) a previous job left in ``directory``; returns what was removed.

    Called before any work, so that a job killed midway leaves no old record beside its new, partial output."""
    removed = []
    for name in names:
        path = Path(directory) / name
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(path)
    if removed:
        log.warning("removed the previous job's records %s from %s", [p.name for p in removed], directory)
    return removed


class RunLock:
    """An exclusive lock on a directory (``<directory>/.dlab.lock``) for ``job``: :meth:`acquire` / :meth:`release`
    or ``with``; ``what`` names the directory in errors. A second :class:`RunLock` on the same directory, in this
    process or another, is refused with :class:`RunDirBusy` while the first is held."""

    def __init__(self, directory: str | Path, job: str, what: str = "output directory") -> None:
        self.directory, self.job, self.what = Path(directory), job, what
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock (creating the directory); raise :class:`RunDirBusy` at once when it is held."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise RunDirError(_not_writable(self.what, self.directory, err)) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy() from None
        self._fd = fd
        self._take_over(read_holder(self.path))
        self._write(json.dumps(asdict(LockHolder.this_process(self.job))))
        return self

    def _busy(self) -> RunDirBusy:
        holder = read_holder(self.path)
        who = holder.describe() if holder is not None else "a process that has not written its pid yet"
        if holder is not None and holder.alive_here() is False:
            who += " (not running: a process it started still holds the lock)"
        return RunDirBusy(
            f"{self.directory} is in use by {who}; lock file {self.path}. Two jobs writing one directory mix "
            "their records: wait for it to finish (or stop it), or write to another directory",
            holder,
        )

    def _take_over(self, previous: LockHolder | None) -> None:
        """The lock was free but still names a holder: that process died without releasing it (e.g. SIGKILL)."""
        if previous is None:
            return
        alive = previous.alive_here()
        state = {False: "no longer running", None: "on another host"}.get(alive, "running, but not holding it")
        log.warning("taking over the stale lock %s of %s: %s", self.path, previous.describe(), state)

    def _write(self, text: str) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode("utf-8"), 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Empty the holder record and release the lock (the file stays: removing it would race a new holder)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)  # also for forked children sharing the descriptor (data workers)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


_HELD: dict[Path, RunLock] = {}  # directories this process holds through run_lock (re-entrant: one job, nested steps)


@contextlib.contextmanager
def run_lock(
    directory: str | Path, job: str, enabled: bool = True, what: str = "output directory"
) -> Iterator[RunLock | None]:
    """Hold the lock of ``directory`` for ``job`` inside the ``with`` block (:class:`RunLock`); ``enabled=False``
    (a DDP rank other than 0) holds nothing. Re-entrant within a process: a job's entry point holds its directory
    across its steps (sample, then record) while each step also asks for it; another process is refused."""
    if not enabled:
        yield None
        return
    key = Path(directory).resolve()
    if key in _HELD:
        yield _HELD[key]
        return
    with RunLock(directory, job, what) as lock:
        _HELD[key] = lock
        try:
            yield lock
        finally:
            del _HELD[key]


def prepare_output_dir(directory: str | Path, records: Iterable[str], what: str = "output directory") -> Path:
    """Before any work: :func:`probe_writable` ``directory``, then :func:`clear_records` the ``records`` a previous
    job left there. Call it while holding the directory's :func:`run_lock`."""
    probe_writable(directory, what)
    clear_records(directory, records)
    return Path(directory)
