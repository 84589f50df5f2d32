"""`capsctl bench --export`: inference latency of a model in each way it can run on this CPU -
eager torch (the routed layer's torch path), eager with capsctl's C routing kernel, the
TorchScript export and the ONNX export in ONNX Runtime - for the paper CapsNet and
Efficient-CapsNet (or one config).

Batch 1: the median and the 99th percentile of ``runs`` (>= 200) single calls after a warm-up;
batch ``large`` (100): images/s of the median of ``large_runs`` calls. Every path runs on the
same random weights and inputs with the same number of threads (torch's; ONNX Runtime's
intra-op pool is set to it); the exports are made as ``capsctl export`` makes them (fp32,
dynamic batch), in a temporary folder, and checked against the eager model first.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from capsctl.export import TOLERANCE, _quiet, compare, graph_of, reference, require_onnx, \
    write_onnx, write_torchscript

PATHS = ("eager torch", "eager + C kernel", "TorchScript", "ONNX Runtime")
MODELS = {"CapsNet (paper)": [], "Efficient-CapsNet": ["model.name=efficient-capsnet"]}


def time_calls(fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Seconds of each of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _row(fn_of: Callable[[np.ndarray], Callable[[], object]], x1, xl, runs: int,
         large_runs: int) -> dict:
    t1 = time_calls(fn_of(x1), runs, warmup=max(20, runs // 10))
    tl = time_calls(fn_of(xl), large_runs, warmup=2)
    return {"median_ms": 1e3 * statistics.median(t1),
            "p99_ms": 1e3 * float(np.percentile(t1, 99)), "runs": runs,
            "large_batch": len(xl), "images_per_s": len(xl) / statistics.median(tl)}


def _runners(model, folder: Path, x_check: np.ndarray, threads: int) -> dict:
    """name -> (function of an input batch -> a call) or a reason it is not measured."""
    import onnxruntime as ort

    from capsctl.models import routing_kernel
    from capsctl.models.routing.dynamic import RoutedCapsules

    def eager(on: bool):
        def of(x):
            t = torch.from_numpy(x)

            def call():
                with routing_kernel.switched(on), torch.no_grad():
                    return model(t)
            return call
        return of

    graph = graph_of(model, False, "fp32")
    example = torch.from_numpy(x_check[:2].copy())
    onnx_path, ts_path = folder / "model.onnx", folder / "model.pt"
    write_onnx(graph, example, onnx_path, True)
    write_torchscript(graph, example, ts_path, {})
    with _quiet():
        traced = torch.jit.load(str(ts_path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    routed = any(isinstance(m, RoutedCapsules) for m in model.modules())
    with routing_kernel.switched(True):
        kernel = routing_kernel.load() is not None
    out = {"eager torch": eager(False),
           "eager + C kernel": eager(True) if routed and kernel else
           ("n/a (no dynamic routing)" if not routed else "n/a (kernel not built)"),
           "TorchScript": lambda x: (lambda t=torch.from_numpy(x): _no_grad(traced, t)),
           "ONNX Runtime": lambda x: (lambda: session.run(names, {"image": x}))}
    with routing_kernel.switched(False):
        ref = {"scores": reference(model, x_check, False)["scores"]}
    for name, fn in (("TorchScript", out["TorchScript"]), ("ONNX Runtime", out["ONNX Runtime"])):
        got = fn(x_check)()
        got = got if isinstance(got, (list, tuple)) else [got]
        result = compare(ref, {"scores": np.asarray(got[0])}, TOLERANCE["fp32"])
        if not result["passed"]:
            out[name] = f"n/a (export check failed: {result['max_abs_diff']['scores']:.2g})"
    return out


def _no_grad(module, t):
    with torch.no_grad():
        return module(t)


def measure(overrides: list[str], runs: int = 200, large: int = 100, large_runs: int = 10,
            config_path: str | None = None) -> dict:
    """The four paths of one model (defaults + ``overrides``): {"model", "parameters",
    "paths": {name: row or reason}}."""
    from capsctl import config as config_mod
    from capsctl.models import build_model, count_parameters

    cfg = config_mod.load(config_path, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    shape = (m.in_channels, m.input_size, m.input_size)
    x1 = torch.rand((1, *shape), generator=g).numpy()
    xl = torch.rand((large, *shape), generator=g).numpy()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="capsctl-bench-export-") as tmp:
        runners = _runners(model, Path(tmp), xl[:8].copy(), torch.get_num_threads())
        for name in PATHS:
            r = runners[name]
            rows[name] = r if isinstance(r, str) else _row(r, x1, xl, runs, large_runs)
    return {"model": cfg.model.name, "parameters": count_parameters(model), "paths": rows}


def run(config_path: str | None = None, overrides: list[str] = (), runs: int = 200,
        large: int = 100, large_runs: int = 10) -> dict:
    """The latency table: the paper CapsNet and Efficient-CapsNet (or the model of
    ``config_path`` / ``overrides``), each path of ``PATHS``."""
    require_onnx()
    if runs < 1 or large < 1 or large_runs < 1:
        from capsctl.errors import CapsctlError

        raise CapsctlError("runs, large batch and large-batch runs must be 1 or more")
    todo = {"config": list(overrides)} if config_path or overrides else MODELS
    models = {label: measure(list(o), runs, large, large_runs, config_path)
              for label, o in todo.items()}
    if config_path or overrides:
        models = {f"{m['model']}": m for m in models.values()}
    return {"threads": torch.get_num_threads(), "torch": torch.__version__,
            "onnxruntime": _ort_version(), "models": models}


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
