"""The run folder: its layout (``RunPaths``), creating it (never overwriting one), the lock that
keeps it to one process, config.yaml, and cutting metrics.jsonl back to a resumed checkpoint.
Torch-free."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from capsctl.paths import nearest_existing, writable_folder
from capsctl.config import Config, dump
from capsctl.errors import CapsctlError, TrainingError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps its files."""

    root: Path

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE


LOCK_FILE = ".lock"
UNUSED = {LOCK_FILE, "checkpoints"}   # what a folder holds before its run wrote anything


def holder(run_dir: Path) -> int | None:
    """The PID of the process training in ``run_dir`` (it holds the folder's lock), 0 when the
    lock is held but the PID unreadable, None when nobody holds it. Writes nothing."""
    import fcntl

    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
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

        path = self.run_dir / LOCK_FILE
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
    """A folder no run wrote into yet (only an empty checkpoints/ and the lock file): made by
    prepare_run_dir, or by a run that died before writing its config. It may be reused."""
    checkpoints = run_dir / "checkpoints"
    try:
        names = {p.name for p in run_dir.iterdir()}
        return names <= UNUSED and ("checkpoints" not in names or (
            checkpoints.is_dir() and not any(checkpoints.iterdir())))
    except OSError:
        return False


def _writable_parent(run_dir: Path) -> None:
    """Raise CapsctlError unless the run folder could be created: its nearest existing
    ancestor is a folder this process may write into."""
    parent = nearest_existing(run_dir.parent)
    if not writable_folder(parent):
        raise CapsctlError(f"cannot create run folder {run_dir}: {parent} is not a writable "
                           "folder; pick another --run-dir")


# --- what an existing run folder holds: the answer of `train` and of `sweep` ----------------

NEW, FINISHED, RESUMABLE, STARTED, FOREIGN = "new", "finished", "resumable", "started", "foreign"
FIXED_TRAIN_KEYS = ("batch_size", "seed", "precision")   # what a resume cannot change
BUDGET_KEYS = ("epochs", "max_steps")                    # more of them: a finished run resumes
INCIDENTAL_KEYS = {"data.root", "data.download", "data.workers"}  # where, not what


@dataclass(frozen=True)
class FolderState:
    """What an existing run folder holds compared with the config asked for now: ``kind`` is
    NEW (nothing yet), FINISHED (tested, this config and budget), RESUMABLE (this config,
    checkpoints/last.pt: unfinished, or finished with another budget), STARTED (this config,
    no checkpoint yet) or FOREIGN (another config: ``differ`` names each differing key)."""

    kind: str
    differ: tuple[str, ...] = ()


def _short_value(value) -> str:
    text = repr(value)
    return text if len(text) <= 30 else text[:27] + "..."


def config_differences(stored: dict, cfg: Config) -> list[str]:
    """The keys whose value in ``stored`` (a run folder's config.yaml) differs from ``cfg``'s,
    as ``section.key (stored in the folder -> asked now)``: every key of model, loss, data and
    optim (not where the data lives: data.root, download, workers) and the train keys a resume
    cannot change. Keys only one of the two has (another capsctl version) are not compared."""
    from capsctl.config import to_dict
    from capsctl.migrate import nest_routing

    mine, differ = to_dict(cfg), []
    for section in ("model", "loss", "data", "optim", "train"):
        theirs = stored.get(section) if isinstance(stored.get(section), dict) else {}
        theirs = nest_routing(theirs) if section == "model" else theirs  # format 2's flat keys
        keys = set(mine[section]) & set(theirs)
        if section == "train":
            keys &= set(FIXED_TRAIN_KEYS)
        differ += [f"{section}.{k} ({_short_value(theirs[k])} -> "
                   f"{_short_value(mine[section][k])})"
                   for k in sorted(keys) if theirs[k] != mine[section][k]
                   and f"{section}.{k}" not in INCIDENTAL_KEYS]
    return differ


def stored_config(run_dir: Path) -> dict | None:
    """``run_dir``/config.yaml as a mapping (None when absent); one line when it is not one."""
    from capsctl.config import read_yaml

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    stored = read_yaml(path)
    if not isinstance(stored, dict):
        raise CapsctlError(f"{path} is not a config mapping; move {run_dir} away")
    return stored


def is_finished(run_dir: Path, cfg: Config) -> bool:
    """True when the run in ``run_dir`` tested its best model: the final test row, and a row
    for every ``train.final_eval`` dataset of ``cfg``."""
    from capsctl.compare import read_metrics

    keys = {k for row in read_metrics(run_dir / METRICS_FILE) for k in row}
    return "test/accuracy" in keys and all(f"test/{name}/accuracy" in keys
                                           for name in cfg.train.final_eval)


def folder_state(run_dir: Path, cfg: Config) -> FolderState:
    """What ``run_dir`` holds for a run of ``cfg`` (see FolderState). Writes nothing."""
    if not run_dir.exists() or is_unused(run_dir):
        return FolderState(NEW)
    stored = stored_config(run_dir)
    if stored is not None:
        differ = config_differences(stored, cfg)
        if differ:
            return FolderState(FOREIGN, tuple(differ))
    train = (stored or {}).get("train")
    train = train if isinstance(train, dict) else {}
    same_budget = all(train.get(k) == getattr(cfg.train, k) for k in BUDGET_KEYS)
    if same_budget and is_finished(run_dir, cfg):
        return FolderState(FINISHED)
    if RunPaths(run_dir).last.is_file():
        return FolderState(RESUMABLE)
    return FolderState(STARTED)


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
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CapsctlError(f"cannot create run folder {run_dir}: {e.strerror or e}") from None
    return run_dir


def claim_run_dir(paths: RunPaths, resume: bool, force: bool) -> RunLock:
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
        (root / "checkpoints").mkdir(exist_ok=True)
    except OSError as e:
        lock.release()
        raise CapsctlError(f"cannot create run folder {root}: {e.strerror or e}") from None
    return lock


def write_config(paths: RunPaths, cfg: Config) -> None:
    """config.yaml, replaced atomically and only when it changes (resume with --set)."""
    path = paths.config
    text = "# resolved configuration of this run (capsctl)\n" + dump(cfg)
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return
        tmp = path.with_name(f".{CONFIG_FILE}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot write {path}: {e.strerror or e}; free space or fix "
                            "permissions") from None


def metrics_size(paths: RunPaths) -> int:
    """metrics.jsonl's length in bytes (0 when absent): it is flushed per row, so its size
    marks the rows logged before a checkpoint."""
    return paths.metrics.stat().st_size if paths.metrics.is_file() else 0


def tidy_for_resume(paths: RunPaths, metrics_bytes: int | None) -> None:
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
