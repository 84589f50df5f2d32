"""Every bad input of the CLI, table-driven: exit code 2, exactly one line on stderr (saying what
and where), no traceback, nothing on stdout, and not one file created, changed or removed.

The table runs in-process (fast); a handful of cases also run as real processes on a 30-column
terminal, where a wrapped or warning-polluted message would show.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from capsctl import checkpoint
from capsctl.cli import app
from capsctl.training import prepare_run_dir, train
from conftest import tiny_config, write_fake_mnist, write_idx

TINY_YAML = """\
model: {conv1_channels: 8, primary_types: 2, primary_dim: 4, class_dim: 6, decoder_hidden: [16, 32]}
data: {val_size: 32}
train: {batch_size: 16, eval_batch_size: 64, max_steps: 2, checkpoint_every: 0,
        checkpoint_minutes: 0, images_every_epoch: false}
"""
MARKER = "pwned.txt"   # what the malicious checkpoints would create


class _Exec:
    """A pickle payload: unpickling it calls exec(), which writes MARKER in the working folder."""

    def __reduce__(self):
        return exec, (f"open({MARKER!r}, 'w').write('code ran')",)


def _config(w: Path, name: str, text: str) -> None:
    (w / "cfg").mkdir(exist_ok=True)
    (w / "cfg" / name).write_text(text)


def _data(w: Path, name: str, mutate) -> None:
    """A copy of the good synthetic data with one file made bad by ``mutate(folder)``."""
    folder = w / "data" / name
    shutil.copytree(w / "mnist", folder)
    mutate(folder)


def _raw_idx(folder: Path, stem: str) -> bytes:
    return gzip.decompress((folder / f"{stem}.gz").read_bytes())


def _ckpt_variant(w: Path, name: str, change) -> Path:
    state = torch.load(w / "runs" / "ok" / "checkpoints" / "last.pt", weights_only=True)
    change(state)
    path = w / "ckpt" / name
    torch.save(state, path)
    return path


def _run_variant(w: Path, name: str, change) -> None:
    """A copy of the good run folder whose last.pt was changed by ``change(state)``."""
    folder = w / "runs" / name
    shutil.copytree(w / "runs" / "ok", folder)
    state = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
    state = change(state) or state
    torch.save(state, folder / "checkpoints" / "last.pt")


def _mismatch(state):
    state["config"]["model"]["class_dim"] = 7


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("bad")
    write_fake_mnist(w / "mnist")
    (w / "tiny.yaml").write_text(TINY_YAML)
    cfg = tiny_config(train={"max_steps": 2, "log_every": 1})
    train(cfg, prepare_run_dir(w / "runs", "ok", False), torch.device("cpu"),
          data_root=str(w / "mnist"), show_progress=False)
    last = w / "runs" / "ok" / "checkpoints" / "last.pt"

    # --- configs ------------------------------------------------------------------------------
    _config(w, "syntax.yaml", "model:\n  class_dim: 6\n  name: capsnet: paper\ntrain: {}\n")
    _config(w, "unknown.yaml", "train:\n  epoch: 3\n")
    _config(w, "section.yaml", "trian:\n  epochs: 3\n")
    _config(w, "type.yaml", "train:\n  batch_size: many\n")
    _config(w, "lr.yaml", "optim:\n  lr: -0.001\n")
    _config(w, "batch.yaml", "train:\n  batch_size: 0\n")
    _config(w, "routing.yaml", "model:\n  routing:\n    iterations: 0\n")
    _config(w, "shift.yaml", "data:\n  shift: -2\n")
    _config(w, "empty.yaml", "")
    _config(w, "comments.yaml", "# nothing but a comment\n")
    _config(w, "list.yaml", "- model\n- train\n")
    _config(w, "string.yaml", "model: capsnet\n")
    _config(w, "scalar.yaml", "42\n")
    _config(w, "binary.yaml", "")
    (w / "cfg" / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage\x81")

    # --- data ---------------------------------------------------------------------------------
    (w / "data" / "empty").mkdir(parents=True)
    images, labels = _raw_idx(w / "mnist", "train-images-idx3-ubyte"), \
        _raw_idx(w / "mnist", "train-labels-idx1-ubyte")
    n = len(labels) - 8
    img = np.frombuffer(images[16:], np.uint8).reshape(n, 28, 28)
    lab = np.frombuffer(labels[8:], np.uint8)
    _data(w, "magic", lambda f: write_idx(f / "train-images-idx3-ubyte.gz", img, magic=2049))
    _data(w, "truncated", lambda f: (f / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(images[: len(images) - 100])))
    _data(w, "badgzip", lambda f: (f / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(labels)[:40]))
    _data(w, "count", lambda f: write_idx(f / "train-labels-idx1-ubyte.gz", lab[:-1]))
    _data(w, "labels", lambda f: write_idx(f / "train-labels-idx1-ubyte.gz",
                                           np.where(np.arange(n) == 5, 10, lab)))
    _data(w, "shape", lambda f: write_idx(f / "t10k-images-idx3-ubyte.gz",
                                          np.zeros((64, 20, 20), np.uint8)))

    # --- checkpoints --------------------------------------------------------------------------
    c = w / "ckpt"
    c.mkdir()
    (c / "text.pt").write_text("this is not a checkpoint\n")
    (c / "empty.pt").write_bytes(b"")
    (c / "image.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with zipfile.ZipFile(c / "archive.pt", "w") as z:
        z.writestr("notes/readme.txt", "a zip, not a checkpoint")
    data = last.read_bytes()
    (c / "truncated.pt").write_bytes(data[: len(data) // 2])
    _ckpt_variant(w, "newer.pt", lambda s: s.update(format_version=checkpoint.FORMAT_VERSION + 1))
    _ckpt_variant(w, "mismatch.pt", _mismatch)
    _ckpt_variant(w, "badconfig.pt", lambda s: s["config"]["optim"].update(lr=-1.0))
    _ckpt_variant(w, "nomodel.pt", lambda s: s.pop("model"))
    _ckpt_variant(w, "version-text.pt", lambda s: s.update(format_version="1"))
    torch.save([1, 2, 3], c / "list.pt")
    torch.save({"format_version": 1, "model": _Exec(), "config": {}}, c / "exec.pt")
    (c / "exec-raw.pt").write_bytes(pickle.dumps({"model": _Exec()}, protocol=4))
    (c / "exec-legacy.pt").write_bytes(pickle.dumps(_Exec(), protocol=2))  # GLOBAL opcode
    (c / "nobest").mkdir()

    # --- run folders for --resume ---------------------------------------------------------------
    _run_variant(w, "mism", _mismatch)
    _run_variant(w, "badstep", lambda s: s.update(step="12"))
    _run_variant(w, "weights", lambda s: {k: s[k] for k in ("format_version", "model", "config")})
    (w / "runs" / "fresh" / "checkpoints").mkdir(parents=True)
    (w / "blocker").write_text("a file where a folder should be")
    return w


def test_the_malicious_checkpoints_really_run_code(work, tmp_path, monkeypatch):
    """The payloads are live: plain unpickling creates the marker file (here, in tmp_path)."""
    monkeypatch.chdir(tmp_path)
    pickle.loads((work / "ckpt" / "exec-raw.pt").read_bytes())
    assert (tmp_path / MARKER).read_text() == "code ran"
    (tmp_path / MARKER).unlink()
    torch.load(work / "ckpt" / "exec.pt", weights_only=False)
    assert (tmp_path / MARKER).is_file()


C, D, K, R = "cfg", "data", "ckpt", "runs"
TRAIN = ["train", "--run-dir", "{w}/runs", "--data-root", "{w}/mnist"]

# (id, argv with {w} = the work folder, a phrase the one line must contain)
CASES = [
    # YAML
    ("yaml-syntax", TRAIN + ["{w}/cfg/syntax.yaml"], "YAML syntax error at line 3, column 16"),
    ("unknown-key", TRAIN + ["{w}/cfg/unknown.yaml"],
     "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("unknown-section", TRAIN + ["{w}/cfg/section.yaml"], "(did you mean 'train'?)"),
    ("wrong-type", TRAIN + ["{w}/cfg/type.yaml"], "'train.batch_size' must be an integer"),
    ("negative-lr", TRAIN + ["{w}/cfg/lr.yaml"], "'optim.lr' must be > 0"),
    ("zero-batch", TRAIN + ["{w}/cfg/batch.yaml"], "'train.batch_size' must be >= 1"),
    ("routing-0", TRAIN + ["{w}/cfg/routing.yaml"], "'model.routing.iterations' must be >= 1"),
    ("negative-shift", TRAIN + ["{w}/cfg/shift.yaml"], "'data.shift' must be >= 0"),
    ("missing-yaml", TRAIN + ["{w}/cfg/nowhere.yaml"], "config file not found"),
    ("empty-yaml", TRAIN + ["{w}/cfg/empty.yaml"], "the config file is empty"),
    ("comment-only-yaml", TRAIN + ["{w}/cfg/comments.yaml"], "the config file is empty"),
    ("list-yaml", TRAIN + ["{w}/cfg/list.yaml"], "the top level must be a mapping"),
    ("scalar-yaml", TRAIN + ["{w}/cfg/scalar.yaml"], "the top level must be a mapping"),
    ("section-string", TRAIN + ["{w}/cfg/string.yaml"], "section 'model' must be a mapping"),
    ("binary-yaml", TRAIN + ["{w}/cfg/binary.yaml"], "binary.yaml"),
    ("yaml-folder", TRAIN + ["{w}/cfg"], "is a folder"),
    ("set-unknown", TRAIN + ["{w}/tiny.yaml", "--set", "optim.learning_rate=0.1"],
     "unknown config key 'optim.learning_rate'"),
    ("set-no-equals", TRAIN + ["{w}/tiny.yaml", "--set", "optim.lr"], "section.key=value"),
    ("set-markup", ["config", "--set", 'train.device="[/bold]"'], "'train.device' must be"),
    ("config-cmd", ["config", "{w}/cfg/routing.yaml"], "'model.routing.iterations' must be >= 1"),
    # data
    ("data-missing", ["train", "{w}/tiny.yaml", "--run-dir", "{w}/runs", "--name", "d1",
                      "--data-root", "{w}/data/empty"], "MNIST train files missing"),
    ("data-magic", ["train", "{w}/tiny.yaml", "--run-dir", "{w}/runs", "--name", "d2",
                    "--data-root", "{w}/data/magic"], "wrong magic number 2049, expected 2051"),
    ("data-truncated", ["train", "{w}/tiny.yaml", "--run-dir", "{w}/runs", "--name", "d3",
                        "--data-root", "{w}/data/truncated"], "truncated or corrupt"),
    ("data-bad-gzip", ["train", "{w}/tiny.yaml", "--run-dir", "{w}/runs", "--name", "d4",
                       "--data-root", "{w}/data/badgzip"],
     "train-labels-idx1-ubyte.gz: cannot read (EOFError"),
    ("data-count", ["train", "{w}/tiny.yaml", "--run-dir", "{w}/runs", "--name", "d5",
                    "--data-root", "{w}/data/count"], "256 images but 255 labels"),
    ("data-labels", ["train", "{w}/tiny.yaml", "--run-dir", "{w}/runs", "--name", "d6",
                     "--data-root", "{w}/data/labels"], "label 10 out of range 0-9"),
    ("data-shape", ["train", "{w}/tiny.yaml", "--run-dir", "{w}/runs", "--name", "d7",
                    "--data-root", "{w}/data/shape"], "expected N x 28 x 28 images"),
    ("eval-data-missing", ["eval", "{w}/runs/ok", "--data-root", "{w}/data/empty"],
     "MNIST train files missing"),
    # checkpoints
    ("ckpt-text", ["eval", "{w}/ckpt/text.pt"], "not a readable checkpoint"),
    ("ckpt-empty", ["eval", "{w}/ckpt/empty.pt"], "not a readable checkpoint"),
    ("ckpt-png", ["eval", "{w}/ckpt/image.pt"], "not a readable checkpoint"),
    ("ckpt-zip", ["eval", "{w}/ckpt/archive.pt"], "not a readable checkpoint"),
    ("ckpt-truncated", ["eval", "{w}/ckpt/truncated.pt"], "not a readable checkpoint"),
    ("ckpt-newer", ["eval", "{w}/ckpt/newer.pt"], "is newer than this capsctl understands"),
    ("ckpt-mismatch", ["eval", "{w}/ckpt/mismatch.pt"], "the weights do not match the model"),
    ("ckpt-bad-config", ["eval", "{w}/ckpt/badconfig.pt"], "'optim.lr' must be > 0"),
    ("ckpt-no-model", ["eval", "{w}/ckpt/nomodel.pt"], "not a capsctl checkpoint (missing model)"),
    ("ckpt-version-text", ["eval", "{w}/ckpt/version-text.pt"], "(format_version '1')"),
    ("ckpt-list", ["eval", "{w}/ckpt/list.pt"], "not a capsctl checkpoint"),
    ("ckpt-missing", ["eval", "{w}/ckpt/nowhere.pt"], "checkpoint not found"),
    ("ckpt-folder", ["eval", "{w}/ckpt/nobest"], "without checkpoints/best.pt"),
    ("ckpt-exec", ["eval", "{w}/ckpt/exec.pt"], "refused to load (weights_only=True)"),
    ("ckpt-exec-raw", ["eval", "{w}/ckpt/exec-raw.pt"], "it names builtins.exec"),
    ("ckpt-exec-legacy", ["eval", "{w}/ckpt/exec-legacy.pt"], "refused to load"),
    ("resume-mismatch", ["train", "--resume", "{w}/runs/mism", "--data-root", "{w}/mnist"],
     "does not match the configured model"),
    ("resume-weights-only", ["train", "--resume", "{w}/runs/weights", "--data-root",
                             "{w}/mnist"], "not a resumable checkpoint"),
    ("resume-corrupt-state", ["train", "--resume", "{w}/runs/badstep", "--data-root",
                              "{w}/mnist"], "corrupt training state (step"),
    ("resume-set-model", ["train", "--resume", "{w}/runs/ok", "--data-root", "{w}/mnist", "--set",
                     "model.class_dim=3"], "only train.* keys"),
    # CLI
    ("resume-and-force", ["train", "--resume", "{w}/runs/ok", "--force"], "conflict"),
    ("resume-and-config", ["train", "{w}/tiny.yaml", "--resume", "{w}/runs/ok"],
     "--resume takes the config from the run folder"),
    ("resume-nothing", ["train", "--resume", "{w}/runs/fresh"], "no checkpoints/last.pt"),
    ("run-exists", ["train", "{w}/tiny.yaml", "--run-dir", "{w}/runs", "--name", "ok",
                    "--data-root", "{w}/mnist"], "already exists; continue it with --resume"),
    ("run-dir-unwritable", ["train", "{w}/tiny.yaml", "--run-dir", "{w}/blocker",
                            "--data-root", "{w}/mnist"], "cannot create run folder"),
    ("no-config", ["train"], "missing CONFIG"),
    ("cuda-train", ["train", "{w}/tiny.yaml", "--run-dir", "{w}/runs", "--name", "c1",
                    "--data-root", "{w}/mnist", "--device", "cuda"], "CUDA is not available"),
    ("cuda-eval", ["eval", "{w}/runs/ok", "--device", "cuda:0"], "CUDA is not available"),
    ("device-typo", ["eval", "{w}/runs/ok", "--device", "gpu"], "expected auto, cpu, cuda"),
    ("eval-split", ["eval", "{w}/runs/ok", "--split", "train"], "expected test or val"),
    ("bench-threads", ["bench", "{w}/tiny.yaml", "--threads", "-1"], "--threads >= 0"),
    # --name is a name: a path would put the run folder outside --run-dir
    ("name-parent", TRAIN + ["{w}/tiny.yaml", "--name", ".."], "'..': a run name, not a path"),
    ("name-dot", TRAIN + ["{w}/tiny.yaml", "--name", "."], "'.': a run name, not a path"),
    ("name-slash", TRAIN + ["{w}/tiny.yaml", "--name", "a/b"], "'a/b': a run name, not a path"),
    ("name-up-and-out", TRAIN + ["{w}/tiny.yaml", "--name", "../escaped"], "not a path"),
    ("name-absolute", TRAIN + ["{w}/tiny.yaml", "--name", "{w}/elsewhere"], "not a path"),
    ("name-backslash", TRAIN + ["{w}/tiny.yaml", "--name", "a\\b"], "not a path"),
    ("name-empty", TRAIN + ["{w}/tiny.yaml", "--name", ""], "not a path"),
    # option parsing (click): one line and a --help hint instead of the usage block
    ("option-not-int", ["eval", "{w}/runs/ok", "--limit", "abc"],
     "error: Invalid value for '--limit'"),
    ("option-unknown", ["eval", "{w}/runs/ok", "--limti", "3"],
     "No such option: --limti"),
    ("argument-missing", ["eval"], "Missing argument 'checkpoints'; see 'capsctl eval --help'"),
    ("option-no-value", TRAIN + ["{w}/tiny.yaml", "--name"], "'--name' requires an argument"),
    ("command-unknown", ["evaluate", "{w}/runs/ok"],
     "No such command 'evaluate'"),
    ("root-option-unknown", ["--verbose", "eval"], "No such option: --verbose"),
    ("subgroup-option", ["data", "affnist-synth", "--per-digit", "two"],
     "see 'capsctl data affnist-synth --help'"),
]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def argv(case, w: Path) -> list[str]:
    return [a.replace("{w}", str(w)) for a in case[1]]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, work, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CAPSCTL_DEBUG", raising=False)
    monkeypatch.chdir(work)
    before = snapshot(work)
    result = CliRunner().invoke(app, argv(case, work))
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, \
        result.stderr
    assert "Traceback" not in result.stderr
    assert case[2] in result.stderr
    assert snapshot(work) == before
    assert not (work / MARKER).exists()


# a few cases as real processes on a narrow terminal: warnings or wrapping would add lines
REAL = ["unknown-key", "data-truncated", "ckpt-exec-raw", "ckpt-newer", "option-not-int",
        "name-parent"]


@pytest.fixture(scope="module")
def real_runs(work):
    env = dict(os.environ, COLUMNS="30", OMP_NUM_THREADS="1")
    env.pop("CAPSCTL_DEBUG", None)
    before = snapshot(work)
    procs = {c[0]: subprocess.Popen([sys.executable, "-m", "capsctl", *argv(c, work)],
                                    cwd=work, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for c in CASES if c[0] in REAL}
    results = {name: (p.communicate(timeout=120), p.returncode) for name, p in procs.items()}
    return results, before, snapshot(work)


@pytest.mark.parametrize("name", REAL)
def test_bad_input_in_a_real_process(name, real_runs, work):
    results, before, after = real_runs
    (out, err), rc = results[name]
    expected = next(c[2] for c in CASES if c[0] == name)
    assert rc == 2, err
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert after == before
    assert not (work / MARKER).exists()
