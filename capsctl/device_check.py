"""The GPU check: one command (``make device-check``, or ``python -m capsctl.device_check``) that,
on one CUDA GPU, in about 8 minutes, runs the CUDA tests, ``capsctl bench`` fp32 / bf16 /
bf16+compile for the paper CapsNet and Efficient-CapsNet, and one epoch of MNIST in bf16 with
its test accuracy, then prints one table with the card's name (and ``--json`` the rows).

Without a CUDA device it refuses with one line and exit code 2 before doing anything. MNIST is
read from ``$CAPSCTL_DATA`` (the epoch is skipped, and says so, when no MNIST is there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from capsctl.runfolder import RunFolder

REPO = Path(__file__).resolve().parents[1]
BENCHES = [("configs/mnist.yaml", p, c) for p, c in (("fp32", 0), ("bf16", 0), ("bf16", 1))] + [
    ("configs/efficient-capsnet.yaml", p, c) for p, c in (("fp32", 0), ("bf16", 0))]
CUDA_TESTS = ["tests/test_routing_algorithms.py", "tests/test_routing.py", "-k", "cuda"]


def _capsctl(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capsctl", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def _bench(config: str, precision: str, compile_: int) -> dict:
    done = _capsctl("bench", config, "--device", "cuda", "--json", "--steps", "10",
                    "--set", f"train.precision={precision}",
                    "--set", f"train.compile={'true' if compile_ else 'false'}")
    if done.returncode != 0:
        return {"what": f"bench {config} {precision}", "error": done.stderr.strip()[-300:]}
    r = json.loads(done.stdout)
    return {"what": f"bench {Path(config).stem} {precision}{' compile' if compile_ else ''}",
            "train_img_s": r["train"]["images_per_s"],
            "infer_img_s": r["infer_large"]["images_per_s"],
            "train_fraction_of_peak": r["train"]["fraction_of_peak"],
            "peak_mem_mib": r["train"]["peak_mem"] / 2**20,
            "compile_active": r["compile_active"]}


def _epoch() -> dict:
    if not os.environ.get("CAPSCTL_DATA"):
        return {"what": "MNIST 1 epoch bf16", "error": "skipped: $CAPSCTL_DATA is not set"}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        done = _capsctl("train", "configs/mnist.yaml", "--device", "cuda", "--no-progress",
                        "--run-dir", tmp, "--name", "epoch", "--set", "train.epochs=1",
                        "--set", "train.precision=bf16", timeout=420)
        wall = time.perf_counter() - t0
        metrics = RunFolder(Path(tmp) / "epoch").metrics
        if done.returncode != 0 or not metrics.is_file():
            return {"what": "MNIST 1 epoch bf16", "error": done.stderr.strip()[-300:]}
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    test = [r["test/accuracy"] for r in rows if "test/accuracy" in r]
    return {"what": "MNIST 1 epoch bf16", "wall_s": wall,
            "test_accuracy": test[-1] if test else None}


def main(argv: list[str]) -> int:
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device here: the GPU check runs on a machine with one "
              "(CPU speed: capsctl bench)", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", *CUDA_TESTS],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    rows = [{"what": "CUDA tests", "result": (tests.stdout.strip().splitlines() or ["?"])[-1]}]
    rows += [_bench(*b) for b in BENCHES]
    rows.append(_epoch())
    out = {"card": card, "torch": torch.__version__, "wall_s": time.perf_counter() - t0,
           "rows": rows}
    if "--json" in argv:
        print(json.dumps(out))
    else:
        print(f"GPU check on {card} (torch {torch.__version__}), {out['wall_s']:.0f} s")
        for r in rows:
            print("  " + r.pop("what") + ": " + ", ".join(
                f"{k} {v:,.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    return 0 if tests.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
