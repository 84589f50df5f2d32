"""Making a run folder (its layout and what it holds are capsctl/runfolder.py's ``RunFolder``):
creating it (never overwriting one), the lock that keeps it to one process, writing its
config.yaml, and cutting its metrics.jsonl back to a resumed checkpoint. Torch-free."""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path

from capsctl.paths import nearest_existing, writable_folder
from capsctl.config import Config, dump
from capsctl.errors import CapsctlError, TrainingError
from capsctl.runfolder import FOREIGN, FINISHED, RESUMABLE, STARTED, FolderState, RunFolder

def holder(run_dir: Path) -> int | None:
    """The PID of the process training in ``run_dir`` (it holds the folder's lock), 0 when the
    lock is held but the PID unreadable, None when nobody holds it. Writes nothing."""
    import fcntl

    try:
        fd = os.open(RunFolder(run_dir).lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def in_use_error(run_dir: Path, pid: int) -> CapsctlError:
    who = f"PID {pid}" if pid else "another process"
    return CapsctlError(f"run folder {run_dir} is in use: {who} is training in it; wait for it "
                        "to end or stop it first")


class RunLock:
    """An exclusive lock on a run folder (``flock`` on its ``.lock``, which holds the PID) for
    the life of the training process; the kernel releases it on any death."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.fd = run_dir, None

    def acquire(self) -> "RunLock":
        """Take the lock or raise a one-line error naming the holder's PID."""
        import fcntl

        path = RunFolder(self.run_dir).lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TrainingError(f"cannot write {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise in_use_error(self.run_dir, int(text) if text.isdigit() else 0) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise TrainingError(f"cannot write {path}: {e.strerror or e}; free space or fix "
                                "permissions") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing the last descriptor drops the flock
            self.fd = None


def is_unused(run_dir: Path) -> bool:
    """A folder no run wrote into yet (RunFolder.is_unused)."""
    return RunFolder(run_dir).is_unused()


def _writable_parent(run_dir: Path) -> None:
    """Raise CapsctlError unless the run folder could be created: its nearest existing
    ancestor is a folder this process may write into."""
    parent = nearest_existing(run_dir.parent)
    if not writable_folder(parent):
        raise CapsctlError(f"cannot create run folder {run_dir}: {parent} is not a writable "
                           "folder; pick another --run-dir")


def folder_state(run_dir: Path, cfg: Config) -> FolderState:
    """What ``run_dir`` holds for a run of ``cfg`` (RunFolder.state). Writes nothing."""
    return RunFolder(run_dir).state(cfg)


HOLDS = {FINISHED: "a finished run of this config",
         RESUMABLE: "an unfinished run of this config, resumable from checkpoints/last.pt",
         STARTED: "a run of this config stopped before its first checkpoint"}


def exists_message(run_dir: Path, state: FolderState | None) -> str:
    """Why a new run cannot take ``run_dir``, what to do, and (``state``) what it holds."""
    text = (f"run folder {run_dir} already exists; continue it with --resume {run_dir}, pick "
            "another --name, or pass --force to move it aside")
    if state is not None and state.kind == FOREIGN:
        return text + f" (it holds a run of another config: {', '.join(state.differ[:5])})"
    if state is not None and state.kind in HOLDS:
        return text + f" (it holds {HOLDS[state.kind]})"
    return text


def check_run_dir(runs_root: Path, name: str, force: bool, cfg: Config | None = None) -> Path:
    """The path of a new run folder; an existing one is an error unless ``force`` or unused,
    and one that a process trains in is always an error. With ``cfg`` the error says what the
    folder holds (finished, resumable, another config). Writes nothing."""
    run_dir = runs_root / name
    if run_dir.exists():
        pid = holder(run_dir)
        if pid is not None:
            raise in_use_error(run_dir, pid)
        if not force and not is_unused(run_dir):
            state = None
            if cfg is not None:
                try:
                    state = folder_state(run_dir, cfg)
                except CapsctlError:   # an unreadable config.yaml: the plain answer
                    state = None
            raise CapsctlError(exists_message(run_dir, state))
    _writable_parent(run_dir)
    return run_dir


def _move_aside(run_dir: Path) -> None:
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{datetime.now():%Y%m%d-%H%M%S}")
    shutil.move(str(run_dir), str(aside))


def prepare_run_dir(runs_root: Path, name: str, force: bool) -> Path:
    """A new run folder (no lock is kept). An existing one is an error, or with ``force`` is
    moved aside (never deleted) to ``NAME.replaced-YYYYmmdd-HHMMSS``. Returns its path."""
    run_dir = check_run_dir(runs_root, name, force)
    if run_dir.exists() and force:
        _move_aside(run_dir)
    try:
        RunFolder(run_dir).checkpoints.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CapsctlError(f"cannot create run folder {run_dir}: {e.strerror or e}") from None
    return run_dir


def claim_run_dir(paths: RunFolder, resume: bool, force: bool) -> RunLock:
    """Lock the run folder for this process: an existing one (``resume``), or a new one,
    created now (``force``: an unlocked old one moved aside first; an unused one reused).
    Returns the held lock; raises a one-line error when another process holds it."""
    root = paths.root
    if resume:
        if not root.is_dir():
            raise CapsctlError(f"--resume {root}: no such run folder")
        return RunLock(root).acquire()
    check_run_dir(root.parent, root.name, force)
    if root.exists() and force and not is_unused(root):
        _move_aside(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CapsctlError(f"cannot create run folder {root}: {e.strerror or e}") from None
    lock = RunLock(root).acquire()
    if not is_unused(root):  # another process made a run here since the check
        lock.release()
        check_run_dir(root.parent, root.name, False)  # names the holder, or "already exists"
        raise CapsctlError(f"run folder {root} already exists")
    try:
        paths.checkpoints.mkdir(exist_ok=True)
    except OSError as e:
        lock.release()
        raise CapsctlError(f"cannot create run folder {root}: {e.strerror or e}") from None
    return lock


def write_config(paths: RunFolder, cfg: Config) -> None:
    """config.yaml, replaced atomically and only when it changes (resume with --set)."""
    path = paths.config
    text = "# resolved configuration of this run (capsctl)\n" + dump(cfg)
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot write {path}: {e.strerror or e}; free space or fix "
                            "permissions") from None


def metrics_size(paths: RunFolder) -> int:
    """metrics.jsonl's length in bytes (0 when absent): it is flushed per row, so its size
    marks the rows logged before a checkpoint."""
    return paths.metrics.stat().st_size if paths.metrics.is_file() else 0


def tidy_for_resume(paths: RunFolder, metrics_bytes: int | None) -> None:
    """Before resuming: remove temp files left by a kill during a checkpoint save, and cut
    metrics.jsonl back to its length when the resumed checkpoint was written (rows logged after
    it, and a line torn by a kill, are recomputed), so the file reads as one run."""
    for tmp in paths.last.parent.glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)
    path = paths.metrics
    if metrics_bytes is None or not path.is_file() or path.stat().st_size <= metrics_bytes:
        return
    with open(path, "r+b") as f:
        f.truncate(metrics_bytes)
