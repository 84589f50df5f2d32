"""capsctl bench: throughput, memory and CPU time of a training step, of inference, and of the
"conv-only bound" (Conv1 + PrimaryCaps forward + backward, the work no CapsNet can avoid); and
each phase against the machine: FLOPs per image (capsctl/flops.py says how they are counted),
achieved GFLOP/s and the fraction of the matrix-product peak measured in the same run. With
``profile``, where a training step's time goes (capsctl/step_profile.py).

Every phase runs on a synthetic batch of the configured shape (no dataset needed), warms up, then
times ``steps`` steps one by one and reports the median. Memory is the peak of the phase: the
resident set's high-water mark on the CPU (reset before each phase through /proc/self/clear_refs
where Linux allows it, else the process's lifetime peak) and ``torch.cuda.max_memory_allocated``
on CUDA. CPU time is the process's user and system time (getrusage) per step: system time is
where page faults from memory churn show.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from capsctl import flops as flops_mod, step_profile as profile_mod, tasks
from capsctl.config import Config
from capsctl.data.registry import DATASETS
from capsctl.device import autocast, compile_model, describe, use_channels_last
from capsctl.errors import CapsctlError
from capsctl.models import build_model, count_parameters, loss_fn
from capsctl.models import conv as conv_mod, routing_kernel
from capsctl.models.capsnet import CapsNet
from capsctl.models.routing.dynamic import RoutedCapsules
from capsctl.training.step import build_optimizer, lr_at, train_step


@dataclass
class Phase:
    """One measured phase; times in milliseconds per step, memory in bytes."""

    batch: int
    images_per_s: float
    step_ms: float          # median over the timed steps
    step_ms_min: float
    user_ms: float          # process user CPU time per step (all threads)
    sys_ms: float           # process system CPU time per step
    peak_mem: int | None    # bytes; see ``mem_kind`` in the report
    flops_per_image: float | None = None  # capsctl/flops.py: how they are counted
    gflops: float | None = None           # flops_per_image x images_per_s / 1e9
    fraction_of_peak: float | None = None  # gflops / the matmul peak of the run's precision

    def rate(self, flops_per_image: float | None, peak: float | None) -> "Phase":
        """This phase with its FLOPs per image, achieved GFLOP/s and fraction of ``peak``."""
        if flops_per_image:
            self.flops_per_image = flops_per_image
            self.gflops = flops_per_image * self.images_per_s / 1e9
            self.fraction_of_peak = self.gflops / peak if peak else None
        return self


# --- memory -----------------------------------------------------------------------------------

def _reset_peak_rss() -> bool:
    """Reset the resident set's high-water mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    peak = _status_kib("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def current_rss() -> int | None:
    """Resident memory now (Linux), e.g. what the libraries take before any step runs."""
    return _status_kib("VmRSS")


class _Memory:
    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max allocated" if device.type == "cuda" else "peak RSS"
        self.since_start = False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_peak_rss():
            self.since_start = True
            self.kind = "peak RSS since start"

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _peak_rss()


# --- timing -----------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Timer:
    """One phase: a step function, its batch, its peak memory and per-step samples."""

    step: Callable[[], None]
    batch: int
    peak_mem: int | None = None
    wall: list | None = None
    user: float = 0.0
    sys: float = 0.0

    def warm(self, n: int, device: torch.device, memory: _Memory) -> None:
        """Run ``n`` untimed steps; the phase's peak memory is measured over them."""
        memory.reset()
        for _ in range(n):
            self.step()
        _sync(device)
        self.peak_mem = memory.peak()

    def timed(self, device: torch.device) -> None:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        self.step()
        _sync(device)
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        self.wall = (self.wall or []) + [dt]
        self.user += r1.ru_utime - r0.ru_utime
        self.sys += r1.ru_stime - r0.ru_stime

    def result(self) -> Phase:
        n = len(self.wall)
        med = statistics.median(self.wall)
        return Phase(batch=self.batch, images_per_s=self.batch / med, step_ms=1e3 * med,
                     step_ms_min=1e3 * min(self.wall), user_ms=1e3 * self.user / n,
                     sys_ms=1e3 * self.sys / n, peak_mem=self.peak_mem)


# --- synthetic batches --------------------------------------------------------------------------

def synthetic_batch(cfg: Config, batch: int, device: torch.device, seed: int = 0) -> dict:
    """A batch of the configured shape drawn by the dataset's task: images in [0, 1] and
    labels (a "pair" task such as MultiMNIST's: two distinct labels and the two source
    images)."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    shape = (batch, m.in_channels, m.input_size, m.input_size)
    b = tasks.get(DATASETS[cfg.data.name].task).synthetic_batch(shape, m.num_classes, g)
    return {k: v.to(device) for k, v in b.items()}


def conv_bound_modules(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(Conv1, PrimaryCaps' convolution) of a CapsNet, else None (no bound)."""
    if isinstance(model, CapsNet):
        return model.conv1, model.primary.conv
    return None


# --- the benchmark ------------------------------------------------------------------------------

def capsule_layer(model: nn.Module, device: torch.device) -> str:
    """Which implementation runs the model's routed capsule layer here: 'C kernel' or
    'torch (why)' on a CPU, 'torch' elsewhere and for models without one (EM routing)."""
    if device.type != "cpu" or not any(isinstance(m, RoutedCapsules) for m in model.modules()):
        return "torch"
    return routing_kernel.status()


class _TrainPhase:
    """The trainer's own step (capsctl.training.step.train_step: learning rate of the step,
    forward, loss, backward, optimizer step), called on one batch at steps 0, 1, 2, ..."""

    def __init__(self, cfg: Config, model: nn.Module, batch: dict, device: torch.device,
                 warn: Callable[[str], None]):
        self.cfg, self.model, self.batch, self.device = cfg, model, batch, device
        self.task = tasks.get(DATASETS[cfg.data.name].task)
        self.losses_of = loss_fn(cfg, self.task.name)
        self.opt = build_optimizer(model, cfg)
        self.fell_back: list[str] = []
        self.step_model = compile_model(model, cfg.train.compile,
                                        lambda msg: (self.fell_back.append(msg), warn(msg)))
        self.step = 0

    def __call__(self) -> None:
        self.model.train()  # the inference phases leave it in eval mode
        train_step(self.step_model, self.opt, self.batch, self.task, self.losses_of,
                   lr_at(self.cfg, self.step), self.step, self.cfg.train.precision, self.device,
                   self.cfg.train.nonfinite == "skip")
        self.step += 1


def run(cfg: Config, device: torch.device, *, batch_size: int | None = None,
        large_batch: int | None = None, steps: int = 10, warmup: int = 3,
        profile: bool = False, warn: Callable[[str], None] = lambda msg: None) -> dict:
    """Measure the configured model on ``device``; returns a JSON-ready dict (see ``KEYS``)."""
    t = cfg.train
    batch_size = batch_size or t.batch_size
    large_batch = large_batch or t.eval_batch_size
    if batch_size < 1 or large_batch < 1 or steps < 1 or warmup < 0:
        raise CapsctlError("bench: --batch-size, --large-batch and --steps must be >= 1")
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    channels_last = use_channels_last(device, t.precision)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    memory = _Memory(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    batch = synthetic_batch(cfg, batch_size, device, t.seed)
    batch["x"] = batch["x"].contiguous(memory_format=fmt)
    report = {
        "device": describe(device), "device_type": device.type, "dtype": t.precision,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "model": cfg.model.name, "parameters": count_parameters(model),
        "channels_last": channels_last, "compile": t.compile, "compile_active": False,
        "capsule_layer": capsule_layer(model, device),
        "batch_size": batch_size, "large_batch": large_batch, "steps": steps, "warmup": warmup,
        "mem_kind": memory.kind,
        "mem_start": (int(torch.cuda.memory_allocated(device)) if device.type == "cuda"
                      else current_rss()),
    }

    # The phases warm up (and have their peak memory taken) one after the other, smallest
    # working set first; then the timed steps are interleaved round-robin, so that a change of
    # load on a shared machine hits every phase alike and the ratios stay fair.
    phases: dict[str, _Timer] = {}
    mods = conv_bound_modules(model)
    if mods is not None:
        conv1, primary = mods
        params = list(conv1.parameters()) + list(primary.parameters())

        def bound_step():
            with autocast(device, t.precision):
                a = primary(torch.relu(conv1(batch["x"])))
            a.float().sum().backward()
            for p in params:
                p.grad = None

        phases["conv_bound"] = _Timer(bound_step, batch_size)

    def infer_at(b: dict):
        def step():
            model.eval()
            with torch.no_grad(), autocast(device, t.precision):
                model(b["x"])
        return step

    phases["infer"] = _Timer(infer_at(batch), batch_size)

    train_phase = _TrainPhase(cfg, model, batch, device, warn)
    phases["train"] = _Timer(train_phase, batch_size)
    large = synthetic_batch(cfg, large_batch, device, t.seed + 1)
    large["x"] = large["x"].contiguous(memory_format=fmt)
    phases["infer_large"] = _Timer(infer_at(large), large_batch)

    report["peak_gflops"] = {p: flops_mod.matmul_peak(device, p)
                             for p in dict.fromkeys((t.precision, "fp32"))}
    counted = flops_mod.count(model, batch["x"], train_phase.task.model_labels(batch))
    fpi = {"train": counted["train"], "infer": counted["infer"], "infer_large": counted["infer"],
           "conv_bound": flops_mod.conv_bound(*mods, batch["x"]) if mods else None}
    report["flops_per_image"] = {**fpi, "modules": counted["modules"]}
    for name, ph in phases.items():
        n = max(warmup, 1)
        if name == "train" and t.compile:
            n = max(n, 3)  # compiles the forward, then the backward, then one steady step
        ph.warm(n, device, memory)
    report["compile_active"] = bool(t.compile and not train_phase.fell_back)
    report["mem_kind"] = memory.kind
    for _ in range(steps):
        for ph in phases.values():
            ph.timed(device)
    peak = report["peak_gflops"][t.precision]
    res = {name: ph.result().rate(fpi[name], peak) for name, ph in phases.items()}
    train, bound = res["train"], res.get("conv_bound")
    infer, infer_large = res["infer"], res["infer_large"]
    report["conv_formulations"] = {"mode": conv_mod.mode(), **conv_mod.choices(model)}
    report.update(train=asdict(train), infer=asdict(infer), infer_large=asdict(infer_large),
                  conv_bound=asdict(bound) if bound else None)
    report["train_vs_bound"] = train.images_per_s / bound.images_per_s if bound else None
    # the same ratio from CPU time (user + system), steadier than wall time on a shared machine
    report["train_vs_bound_cpu"] = ((bound.user_ms + bound.sys_ms) / (train.user_ms + train.sys_ms)
                                    if bound and train.user_ms + train.sys_ms > 0 else None)
    if profile:
        model.train()
        report["profile"] = {"step": profile_mod.step_profile(phases["train"].step),
                             "convolutions": profile_mod.conv_table(model, batch["x"],
                                                                    t.precision)}
    return report


KEYS = ("device", "device_type", "dtype", "torch", "threads", "model", "parameters",
        "channels_last", "compile", "compile_active", "capsule_layer", "batch_size",
        "large_batch", "steps", "warmup", "mem_kind", "mem_start", "peak_gflops",
        "flops_per_image", "train", "infer", "infer_large", "conv_bound", "conv_formulations",
        "train_vs_bound", "train_vs_bound_cpu")  # + "profile" with --profile
PHASE_KEYS = tuple(Phase.__dataclass_fields__)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
