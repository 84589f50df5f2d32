"""Hostile and broken files: every reader ends in one capsctl error line (exit 2 from the CLI),
in bounded time and memory, with nothing written.

Seeded mutation fuzz over the readers (IDX/.gz, smallNORB matrices, YAML, affNIST .mat,
checkpoints): any exception other than a capsctl error class fails the test, with the case's
seed and number. Then the refusals that must not cost much (gzip bombs, alias bombs, headers
that declare gigabytes, .mat files that crash scipy) run in forked children of the test process,
each measured for wall time and peak RSS. The counts here are the ones docs/reliability.md
reports (its "Hostile files" table).
"""

from __future__ import annotations

import gzip
import io
import os
import random
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from capsctl.data.idx import LABELS_MAGIC, read_idx
from capsctl.data.smallnorb import read_matrix
from capsctl.errors import CapsctlError, ConfigError, DataError
from capsctl.safe_yaml import MAX_FILE_BYTES, read_yaml

REPO = Path(__file__).resolve().parents[1]
SEED = 1729
N_FLIPS_HEAD, N_FLIPS_TAIL, N_FLIPS_RANDOM = 160, 64, 176   # 400 single-bit flips of a real .gz
N_IDX_MUTATIONS, N_NORB_MUTATIONS = 160, 80
N_YAML = 160
N_MAT = 100             # per layout (plain, compressed, mutated inside a valid zlib stream)
N_ZIP = 60              # a test_batches.zip holding three .mat files
N_CKPT = 80             # per file (format 2 written here, the format-1 fixture)


# --- the fuzz machinery ---------------------------------------------------------------------------

def mutate(data: bytes, rng: random.Random, zones: list[tuple[int, int]] | None = None) -> bytes:
    """One seeded mutation: a bit flip, a byte or 4-byte word set to a boundary value, a cut, a
    deletion or an insertion. Half of the positions fall in ``zones`` (headers, tags) if given."""
    b = bytearray(data)

    def pos() -> int:
        if zones and rng.random() < 0.5:
            lo, hi = rng.choice(zones)
            return rng.randrange(lo, min(hi, len(b)))
        return rng.randrange(len(b))

    kind = rng.randrange(6)
    i = pos()
    if kind == 0:
        b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        b[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif kind == 2:
        b[i:i + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xff" * 4,
                                 b"\x00" * 4, b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00"])
    elif kind == 3:
        del b[i:]
    elif kind == 4:
        del b[i:i + rng.randrange(1, 64)]
    else:
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    return bytes(b)


class Cases:
    """Writes each case to its own new file (overwriting a file in place is slow on some file
    systems), runs the reader, and records anything that is not a one-line capsctl error."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name, self.n = folder, name, 0
        folder.mkdir(parents=True, exist_ok=True)
        self.failures: list[str] = []
        self.outcomes = {"refused": 0, "read": 0}

    def run(self, data: bytes, reader, check=None, suffix: str = "") -> None:
        path = self.folder / f"{self.name}-{self.n}{suffix}"
        self.n += 1
        path.write_bytes(data)
        try:
            result = reader(path)
        except CapsctlError as e:
            msg = str(e)
            if "\n" in msg or not msg or len(msg) > 600:
                self.failures.append(f"{path.name}: message not one short line: {msg[:200]!r}")
            self.outcomes["refused"] += 1
            return
        except BaseException as e:  # noqa: BLE001 - the point of the test
            self.failures.append(f"{path.name}: {type(e).__name__}: {str(e)[:200]}")
            return
        self.outcomes["read"] += 1
        if check is not None:
            problem = check(result)
            if problem:
                self.failures.append(f"{path.name}: read, but {problem}")

    def assert_clean(self) -> None:
        assert not self.failures, f"{len(self.failures)} of {self.n} {self.name} cases " \
            f"(seed {SEED}) broke: " + "; ".join(self.failures[:5])
        assert len(list(self.folder.iterdir())) == self.n, "a reader wrote a file"


# --- IDX and smallNORB ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_labels_gz(mnist_root) -> bytes:
    return (Path(mnist_root) / "t10k-labels-idx1-ubyte.gz").read_bytes()


def test_single_bit_flips_of_a_real_gzipped_idx(tmp_path, real_labels_gz):
    """Every bit of the gzip header and the first deflate bytes, every bit of the CRC/size
    trailer, and random bits elsewhere: a DataError naming the file, or the very same labels
    (flips in fields gzip ignores, such as the timestamp)."""
    good, truth = real_labels_gz, read_idx_bytes(real_labels_gz)
    rng = random.Random(SEED)
    bits = list(range(N_FLIPS_HEAD)) + [len(good) * 8 - 1 - i for i in range(N_FLIPS_TAIL)]
    bits += rng.sample(range(N_FLIPS_HEAD, (len(good) - 8) * 8), N_FLIPS_RANDOM)
    cases = Cases(tmp_path / "flips", "flip")

    def same(labels):
        return None if np.array_equal(labels, truth) else "the labels changed"

    for bit in bits:
        b = bytearray(good)
        b[bit // 8] ^= 1 << (bit % 8)
        cases.run(bytes(b), lambda p: read_idx(p, LABELS_MAGIC), same, ".gz")
    cases.assert_clean()
    assert cases.outcomes["refused"] > 0.8 * len(bits)  # the rest: timestamp, OS, flags bytes


def read_idx_bytes(data: bytes) -> np.ndarray:
    raw = gzip.decompress(data)
    return np.frombuffer(raw, np.uint8, offset=8)


def _names_the_file(path_check):
    def reader(p):
        try:
            return path_check(p)
        except DataError as e:
            assert str(p) in str(e), f"the message does not name the file: {e}"
            raise
    return reader


def test_idx_and_norb_mutations(tmp_path, real_labels_gz):
    rng = random.Random(SEED + 1)
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    raw_idx = struct.pack(">IIII", 2051, 4, 28, 28) + images.tobytes()
    seeds = [(real_labels_gz, [(0, 64)], ".gz"), (gzip.compress(raw_idx), [(0, 40)], ".gz"),
             (raw_idx, [(0, 16)], "")]
    cases = Cases(tmp_path / "idx", "idx")
    for k in range(N_IDX_MUTATIONS):
        data, zones, suffix = seeds[k % 3]
        cases.run(mutate(data, rng, zones), _names_the_file(read_idx), suffix=suffix)
    cases.assert_clean()

    norb = struct.pack("<iiiiii", 0x1E3D4C54, 2, 5, 4, 1, 1) + np.arange(20, dtype="<i4").tobytes()
    norb_seeds = [(norb, [(0, 24)]), (gzip.compress(norb), [(0, 40)])]
    cases = Cases(tmp_path / "norb", "norb")
    for k in range(N_NORB_MUTATIONS):
        data, zones = norb_seeds[k % 2]
        cases.run(mutate(data, rng, zones), _names_the_file(read_matrix))
    cases.assert_clean()


@pytest.mark.parametrize("header, gz, phrase", [
    (struct.pack(">IIII", 2051, 65536, 65536, 256), False, "more than the 2147483648 byte limit"),
    (struct.pack(">IIII", 2051, 65536, 65536, 256), True, "more than the 2147483648 byte limit"),
    (struct.pack(">IIII", 2051, 60000, 28, 28), False, "file has 0"),
    (struct.pack(">IIII", 2051, 60000, 280, 28), True, "inflates to at most"),
    (struct.pack(">I", 0x08FF) + b"\xff" * 1020, False, "byte limit"),
    (struct.pack(">II", 0x0801, 3) + b"\x01\x02\x03\x04", False, "file has 4"),
])
def test_idx_declared_sizes_are_checked_before_reading(tmp_path, header, gz, phrase):
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(header) if gz else header)
    with pytest.raises(DataError, match="header says") as e:
        read_idx(path)
    assert phrase in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("dims, phrase", [
    ((4, -3, -5), "negative size"),
    ((1 << 30, 1 << 30, 4), "byte limit"),
    ((100, 100, 1), "file has 8"),
])
def test_norb_declared_sizes_are_checked_before_reading(tmp_path, dims, phrase):
    path = tmp_path / "m.mat"
    path.write_bytes(struct.pack("<ii3i", 0x1E3D4C54, 3, *dims) + b"\x00" * 8)
    with pytest.raises(DataError, match=phrase):
        read_matrix(path)


def test_a_fifo_or_device_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "t10k-labels-idx1-ubyte"
    os.mkfifo(fifo)
    for path, phrase in ((fifo, "FIFO"), (Path("/dev/zero"), "character device")):
        with pytest.raises(DataError, match=phrase):
            read_idx(path)
        with pytest.raises(DataError, match=phrase):
            read_matrix(path)
        with pytest.raises(ConfigError, match=phrase):
            read_yaml(path)


# --- YAML -----------------------------------------------------------------------------------------

YAML_TOKENS = ["&a ", "*a", "<<: ", "!!python/object/apply:os.system ['true']", "{", "}", "[",
               "]", ": ", "- ", "\t", "\x00", "? ", "---\n", "%YAML 1.1\n", "'", '"', "\\u12",
               "!!binary ", "!!timestamp 2001-02-30", "!!float ", "1e400", "0x", "~", "|\n",
               ">-\n", "#", "\n  ", "\ufeff", "\xff", "!!set {a}", "!!omap [a: 1]", "&b [*b]"]


def yaml_seed() -> bytes:
    text = (REPO / "configs" / "mnist-quick.yaml").read_text()
    return (text + "\nanchors:\n  base: &base {lr: 0.001, decay: 0.9}\n  use: {<<: *base, "
            "lr: 0.01}\n  list: &l [1, 2, {x: *base}]\n  again: *l\n").encode()


def test_yaml_mutations(tmp_path):
    from capsctl import config

    rng = random.Random(SEED + 2)
    good = yaml_seed()
    cases = Cases(tmp_path / "yaml", "yaml")
    for k in range(N_YAML):
        if k % 2:
            data = mutate(good, rng)
        else:
            i = rng.randrange(len(good))
            data = good[:i] + rng.choice(YAML_TOKENS).encode("utf-8", "surrogatepass") + good[i:]
        cases.run(data, read_yaml, suffix=".yaml")
        cases.run(data, config.load, suffix=".yaml")  # and on through the config loader
    cases.assert_clean()


def billion_laughs(levels: int) -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefghijklmnop", "bcdefghijklmnop"[:levels - 1]):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_refusals_are_one_short_line(tmp_path):
    def error(text: str | bytes) -> str:
        p = tmp_path / "c.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ConfigError) as e:
            read_yaml(p)
        msg = str(e.value)
        assert "\n" not in msg and len(msg) < 300 and str(p) in msg
        return msg

    assert len(billion_laughs(9)) < 440  # the classic document: a few hundred bytes
    assert "alias bomb" in error(billion_laughs(9))
    assert "alias bomb" in error(billion_laughs(7))
    assert "recursive alias" in error("a: &a [1, *a]\n")
    msg = error("train:\n  epochs: 3\n  lr: 1\n  epochs: 4\n")
    assert "duplicate key 'epochs' at line 4, column 3 (first at line 2, column 3)" in msg
    assert "duplicate key 'a'" in error("{a: 1, b: 2, a: 3}\n")
    assert "nested too deeply" in error("[" * 5000)
    assert "YAML syntax error at line 2, column 1" in error("a: [\n")
    assert "empty" in error("# only a comment\n")
    assert "cannot read" in error(b"a: \xff\xfe\n")
    # merge keys are not duplicates; small alias use is fine
    p = tmp_path / "ok.yaml"
    p.write_text("base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  x: 5\nl: &l [1, 2]\nk: [*l, *l]\n")
    assert read_yaml(p) == {"base": {"x": 1, "y": 2}, "m": {"x": 5, "y": 2}, "l": [1, 2],
                            "k": [[1, 2], [1, 2]]}


def test_yaml_path_kinds(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        read_yaml(tmp_path)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"a: 1\n" + b"#" * MAX_FILE_BYTES)
    with pytest.raises(ConfigError, match=f"more than the {MAX_FILE_BYTES} allowed"):
        read_yaml(big)


def test_the_cli_refuses_an_alias_bomb_with_exit_2_and_writes_nothing(tmp_path):
    (tmp_path / "bomb.yaml").write_text(billion_laughs(9))
    r = subprocess.run([sys.executable, "-m", "capsctl", "config", "bomb.yaml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "alias bomb" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]


# --- affNIST .mat ---------------------------------------------------------------------------------

def mat_bytes(layout: str) -> tuple[bytes, list[tuple[int, int]]]:
    """A small valid affNIST-layout file (plus a cell, a text and a nested struct to give the
    fuzz some structure) and the byte ranges outside the pixel data, where the fuzz aims half
    of its mutations. Layouts: "plain", "compressed" (variables deflated), "inner": the plain
    ``affNISTdata`` variable, to be mutated and then deflated (see ``deflated_var``)."""
    import scipy.io

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 1600), dtype=np.uint8)
    b = io.BytesIO()
    scipy.io.savemat(b, {"affNISTdata": {
        "image": images.T, "label_int": np.array([[3, 7]], np.uint8),
        "notes": np.array([[np.array([[1.0, 2.0]]), "text"]], dtype=object),
        "meta": {"seed": 1, "name": "x"}}, "capsctl_synth": {"seed": 1}},
        do_compression=layout == "compressed")
    data = b.getvalue()
    if layout == "inner":  # the first variable alone, without the file header
        data = data[128:136 + struct.unpack("<I", data[132:136])[0]]
    start = data.find(images.T.tobytes(order="F"))
    zones = [(0, len(data))] if start < 0 else [(0, start), (start + 3200, len(data))]
    return data, zones


def deflated_var(var: bytes) -> bytes:
    """A v5 file holding ``var`` (an miMATRIX element, possibly mutated) as a compressed
    variable, so the mutation is inside a valid zlib stream."""
    packed = zlib.compress(var)
    return MAT_HEADER + struct.pack("<II", 15, len(packed)) + packed


def batches_zip(declare: int | None = None) -> bytes:
    """A test_batches.zip of three small .mat files (one deflated in the zip); ``declare``
    patches the unpacked size each member declares in the central directory."""
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w") as z:
        z.writestr("test_batches/1.mat", mat_bytes("plain")[0], zipfile.ZIP_DEFLATED)
        z.writestr("test_batches/2.mat", mat_bytes("compressed")[0])
        z.writestr("test_batches/3.mat", mat_bytes("plain")[0])
    data = bytearray(b.getvalue())
    at = data.find(b"PK\x01\x02")
    while declare is not None and at >= 0:
        data[at + 24:at + 28] = struct.pack("<I", declare)
        at = data.find(b"PK\x01\x02", at + 4)
    return bytes(data)


def unpack_and_read(zip_file: Path, folder: Path):
    """Unpacks ``zip_file`` as ``folder/test_batches.zip`` the way the first evaluation does,
    then reads every batch."""
    zip_file.rename(folder / "test_batches.zip")
    try:
        return [affnist_read_mat(p) for p in affnist_split_files(folder)]
    finally:
        (folder / "test_batches.zip").rename(zip_file)


def affnist_read_mat(path: Path):
    from capsctl.data import affnist

    return affnist.read_mat(path)


def affnist_split_files(folder: Path) -> list[Path]:
    from capsctl.data import affnist

    return affnist.split_files(folder, "test") or []


def test_mat_mutations(tmp_path):
    """In a forked child: scipy's reader is compiled code, and a crash must fail this test with
    the case that caused it rather than end the test session."""
    from capsctl.data import affnist

    def check(result):
        images, labels = result
        if images.shape[1:] != (40, 40) or len(images) != len(labels) or not len(labels):
            return f"shapes {images.shape} {labels.shape}"
        if labels.min() < 0 or labels.max() > 9:
            return "labels outside 0-9"
        return None

    def fuzz():
        out = {}
        for k, layout in enumerate(("plain", "compressed", "inner")):
            rng = random.Random(SEED + 3 + k)
            data, zones = mat_bytes(layout)
            cases = Cases(tmp_path / layout, layout)
            for _ in range(N_MAT):
                (tmp_path / "last").write_text(f"{layout}-{cases.n}")
                bad = mutate(data, rng, zones)
                cases.run(deflated_var(bad) if layout == "inner" else bad, affnist.read_mat,
                          check, ".mat")
            out[layout] = [cases.failures[:10], len(cases.failures), cases.outcomes]
        rng = random.Random(SEED + 6)
        good = batches_zip()
        cases = Cases(tmp_path / "zip", "zip")
        for _ in range(N_ZIP):  # a downloaded test_batches.zip, unpacked on first use
            folder = tmp_path / "zips" / str(cases.n) / "affnist"
            folder.mkdir(parents=True)
            (tmp_path / "last").write_text(f"zip-{cases.n}")
            cases.run(mutate(good, rng, [(0, 80), (len(good) - 200, len(good))]),
                      lambda p: unpack_and_read(p, folder), suffix=".zip")
        out["zip"] = [cases.failures[:10], len(cases.failures), cases.outcomes]
        return out

    status, _, _, out = in_child(fuzz, timeout=300)
    last = (tmp_path / "last").read_text() if (tmp_path / "last").exists() else "?"
    assert status == 0, f"the reader crashed (wait status {status}) at case {last}: {out}"
    for failures, n_failed, outcomes in out.values():
        assert not n_failed, f"{n_failed} of {N_MAT} cases broke: " + "; ".join(failures[:5])
        assert outcomes["refused"] > 0


def test_mat_content_errors_name_the_file_and_value(tmp_path):
    import scipy.io

    from capsctl.data import affnist

    images = np.zeros((1600, 3), np.uint8)

    def error(**fields) -> str:
        p = tmp_path / "1.mat"
        scipy.io.savemat(p, {"affNISTdata": {"image": images, "label_int": [[1, 2, 3]],
                                             **fields}})
        with pytest.raises(DataError) as e:
            affnist.read_mat(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value)
        return str(e.value)

    assert "label 9.5 is not a whole number" in error(label_int=[[1.0, 9.5, 2.0]])
    assert "holds nan" in error(label_int=[[1.0, np.nan, 2.0]])
    assert "label 10 out of range 0-9" in error(label_int=[[1, 10, 2]])
    assert "label -1 out of range 0-9" in error(label_int=np.array([[1, -1, 2]], np.int8))
    assert "not numbers" in error(image=np.array(["x" * 3] * 1600))
    assert "holds no images" in error(image=np.zeros((1600, 0), np.uint8),
                                      label_int=np.zeros((1, 0)))
    assert "pixel value 300 outside 0-255" in error(image=np.full((1600, 3), 300, np.uint16))
    batches = tmp_path / "affnist" / "test_batches"
    batches.mkdir(parents=True)
    for name in ("1.mat", "2.mat", "readme.mat"):
        (batches / name).write_bytes(b"")
    with pytest.raises(DataError, match="readme.mat is not a numbered batch"):
        affnist.split_files(tmp_path / "affnist", "test")
    (batches / "readme.mat").rename(batches / "02.mat")
    with pytest.raises(DataError, match="02.mat is not a numbered batch"):
        affnist.split_files(tmp_path / "affnist", "test")


# --- checkpoints ----------------------------------------------------------------------------------

def test_checkpoint_mutations(tmp_path):
    import torch

    from capsctl import checkpoint

    b = io.BytesIO()
    torch.save({"format_version": checkpoint.FORMAT_VERSION,
                "model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)},
                "config": {"model": {"name": "cnn"}, "data": {"name": "mnist"}},
                "step": 3, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, b)
    seeds = [b.getvalue(), (REPO / "tests" / "fixtures" / "format1" / "cnn-best.pt").read_bytes()]
    rng = random.Random(SEED + 5)
    cases = Cases(tmp_path / "ckpt", "ckpt")
    for data in seeds:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            pkl = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
        zones = [(pkl.header_offset, pkl.header_offset + 64 + pkl.compress_size),
                 (len(data) - 400, len(data))]
        for _ in range(N_CKPT):
            cases.run(mutate(data, rng, zones), checkpoint.load, suffix=".pt")
    cases.assert_clean()


def deflated_checkpoint(mib: int) -> bytes:
    """A torch.save zip whose tensor record is ``mib`` MiB of zeros stored deflated (torch.save
    stores every record uncompressed): about 1 KB of file per MiB."""
    import torch

    b = io.BytesIO()
    torch.save({"format_version": 2, "model": {"w": torch.arange(6.0)}, "config": {}}, b)
    src, out = zipfile.ZipFile(b), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, compresslevel=1) as dst:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                dst.writestr(info.filename, src.read(info.filename))
                continue
            record = zipfile.ZipInfo(info.filename)
            record.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(record, "w", force_zip64=True) as f:
                for _ in range(mib):
                    f.write(bytes(1 << 20))
    return out.getvalue()


def test_a_deflated_checkpoint_record_is_refused_without_inflating_it(tmp_path):
    from capsctl import checkpoint

    path = tmp_path / "bomb.pt"
    path.write_bytes(deflated_checkpoint(128))
    _, _, base, _ = in_child(lambda: None)
    status, seconds, rss, message = in_child(lambda: refusal(checkpoint.load, path))
    assert status == 0, message
    assert rss - base < 64, f"{rss - base:.0f} MB to refuse a {path.stat().st_size} byte file"


# --- resources: each refusal in a forked child, timed and measured --------------------------------

def gzip_bomb(head: bytes, gib: float, wbits: int = 31) -> bytes:
    """A gzip (``wbits`` 31) or zlib (15) stream of ``head`` then ``gib`` GiB of zeros, about
    1 MB per GiB: one compressed 1 MiB block of zeros repeated (after a full flush every block
    compresses the same). Its trailer is wrong: nothing may read that far."""
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    out = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return out + block * int(gib * 1024) + c.flush()


def mat_element(mtype: int, data: bytes) -> bytes:
    """A MATLAB v5 data element: type, byte count, data padded to 8 bytes (little-endian)."""
    return struct.pack("<II", mtype, len(data)) + data + b"\0" * (-len(data) % 8)


def mat_matrix_head(cls: int, name: str, body_bytes: int, dims=(1, 1), flags: int = 0) -> bytes:
    """The start of an miMATRIX element whose class-specific body is ``body_bytes`` long."""
    head = (mat_element(6, struct.pack("<II", cls | flags, 0))
            + mat_element(5, struct.pack(f"<{len(dims)}i", *dims)) + mat_element(1, name.encode()))
    return struct.pack("<II", 14, len(head) + body_bytes) + head


MAT_HEADER = (b"MATLAB 5.0 MAT-file".ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100)
              + b"IM")


def nested_cells_mat(depth: int) -> bytes:
    """A MATLAB v5 file whose ``affNISTdata`` is a cell in a cell ... ``depth`` deep, written
    by hand (scipy's writer recurses too): scipy's reader crashes on it without the check."""
    innermost = mat_matrix_head(6, "", 16) + mat_element(9, struct.pack("<d", 1.0))
    heads, size = [], len(innermost)
    for level in range(depth + 1):  # inside out; the outermost one is the named variable
        heads.append(mat_matrix_head(1, "affNISTdata" if level == depth else "", size))
        size += len(heads[-1])
    var = zlib.compress(b"".join(reversed(heads)) + innermost)
    return MAT_HEADER + struct.pack("<II", 15, len(var)) + var


def hostile_mats() -> dict[str, bytes]:
    """Hand-made .mat files that crash scipy's reader or make it allocate gigabytes."""
    double = mat_element(9, struct.pack("<d", 1.0))
    huge_cell = mat_matrix_head(1, "affNISTdata", 8, dims=(1, 1 << 30)) + mat_element(14, b"")
    complex_flag = mat_matrix_head(6, "affNISTdata", 16, flags=0x800) + double
    other = mat_matrix_head(6, "other", 16) + double
    # a compressed variable declaring 4 GiB, and a valid one followed by 2 GiB of zeros
    declares_4g = gzip_bomb(struct.pack("<II", 14, 0xFFFFFFF0), 2, wbits=15)
    trailing = gzip_bomb(mat_matrix_head(6, "affNISTdata", 16) + double, 2, wbits=15)
    return {
        "mat-nested-100k": nested_cells_mat(100_000),
        "mat-cell-of-2^30": MAT_HEADER + huge_cell,
        "mat-complex-without-imaginary": MAT_HEADER + complex_flag + other,
        "mat-declares-4GiB": MAT_HEADER + struct.pack("<II", 15, len(declares_4g)) + declares_4g,
        "mat-zlib-bomb-2GiB": MAT_HEADER + struct.pack("<II", 15, len(trailing)) + trailing,
    }


def in_child(fn, timeout: float = 60) -> tuple[int, float, float, object]:
    """Runs ``fn()`` in a forked child: (wait status, seconds, how far the child's resident set
    rose above what it started with, in MB, what ``fn`` returned or the exception it raised, as
    text). A child that crashes or hangs is reported, not fatal: the status says how it ended
    (SIGKILL after ``timeout`` s). The rise is measured inside the child (its high-water mark,
    reset at the start, minus its resident set then), so the pages it shares with pytest and
    the kernel reclaiming them on a busy machine do not enter it; NaN for a child that was
    killed before it could say."""
    import pickle
    import signal
    import tempfile
    import time

    fd, result = tempfile.mkstemp(prefix="capsctl-child-")
    os.close(fd)
    t = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current resident set
            start = _status_mb("VmRSS")
            value = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            value, code = f"{type(e).__name__}: {e}", 3
        try:
            with open(result, "wb") as f:
                pickle.dump((value, _status_mb("VmHWM") - start), f)
        finally:
            os._exit(code)
    while True:
        done, status, _ = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t > timeout:
            os.kill(pid, signal.SIGKILL)
            _, status, _ = os.wait4(pid, 0)
            break
        time.sleep(0.002)
    seconds = time.monotonic() - t
    try:
        with open(result, "rb") as f:
            value, rise = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError):
        value, rise = None, float("nan")
    os.unlink(result)
    return status, seconds, rise, value


def _status_mb(key: str) -> float:
    """One memory line of /proc/self/status (``VmRSS``, ``VmHWM``), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {key}")


def refusal(reader, path: Path):
    """The one-line message ``reader`` refuses ``path`` with (AssertionError if it does not)."""
    try:
        reader(path)
    except CapsctlError as e:
        return str(e)
    raise AssertionError(f"{path.name} was read")


def test_refusals_are_fast_and_small(tmp_path):
    """Each hostile file is refused in under a few seconds and well under 1 GB of memory (peak
    RSS of a forked child, less that of a child that does nothing), with nothing written."""
    from capsctl.data.affnist import read_mat

    w = tmp_path
    files = {
        "idx-gzip-bomb-3GiB.gz": gzip_bomb(struct.pack(">II", 2049, 10000), 3),
        "idx-images-gzip-bomb-2GiB.gz": gzip_bomb(struct.pack(">IIII", 2051, 10000, 28, 28), 2),
        "idx-header-2^40.gz": gzip.compress(struct.pack(">IIII", 2051, 1 << 20, 1 << 10, 1 << 10)),
        "idx-header-2^31-raw": struct.pack(">II", 0x0801, (1 << 31) - 1) + b"\0" * 64,
        "norb-header-2^34": struct.pack("<ii3i", 0x1E3D4C54, 3, 1 << 15, 1 << 15, 16),
        "norb-gzip-bomb-1GiB": gzip_bomb(struct.pack("<ii3i", 0x1E3D4C55, 1, 1000, 1, 1), 1),
        "yaml-billion-laughs.yaml": billion_laughs(9).encode(),
        "yaml-7-levels.yaml": billion_laughs(7).encode(),
        "yaml-too-big.yaml": b"a: [" + b"1, " * (MAX_FILE_BYTES // 3 + 10) + b"]\n",
        **{name + ".mat": data for name, data in hostile_mats().items()},
    }
    readers = {"idx": read_idx, "norb": read_matrix, "yaml": read_yaml, "mat": read_mat}
    cases = []
    for name, data in files.items():
        (w / name).write_bytes(data)
        cases.append((readers[name.split("-")[0]], w / name))
    os.mkfifo(w / "fifo.yaml")
    cases += [(read_yaml, w / "fifo.yaml"), (read_yaml, Path("/dev/zero")),
              (read_idx, Path("/dev/zero"))]
    folder = w / "unpack" / "affnist"  # a test_batches.zip whose members declare 12 GiB
    folder.mkdir(parents=True)
    (folder / "test_batches.zip").write_bytes(batches_zip(declare=0xFFFFFFF0))
    cases.append((lambda p: affnist_split_files(p.parent), folder / "test_batches.zip"))
    before = sorted(p.name for p in w.iterdir())
    _, _, base, _ = in_child(lambda: None)
    _, _, hungry, _ = in_child(lambda: int(np.ones(512 << 20, np.uint8).sum()))
    # the measurement does see a child that allocates 512 MB; half of it is the bar, because a
    # busy machine reclaims the child's file pages meanwhile (CI once saw 200 MB of 256)
    assert hungry - base > 256
    lines = []
    for reader, path in cases:
        status, seconds, rss, message = in_child(lambda: refusal(reader, path))
        assert status == 0, f"{path.name}: {message} (wait status {status})"
        assert str(path) in message and "\n" not in message
        assert seconds < 5, f"{path.name}: refused after {seconds:.1f} s"
        assert rss - base < 1024, f"{path.name}: {rss - base:.0f} MB"
        lines.append(f"{path.name}: {seconds:.2f} s, {rss - base:+.0f} MB: {message}")
    assert sorted(p.name for p in w.iterdir()) == before  # nothing written
    assert [p.name for p in folder.iterdir()] == ["test_batches.zip"]
    print("\n".join(lines))
