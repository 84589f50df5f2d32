"""capsctl bench: throughput and memory of a training step (capsctl.bench.run), as a table or
JSON. torch is imported inside the command, so `capsctl bench --help` stays light."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from capsctl.cli.options import (DeviceOpt, SetOpt, cli_errors, json_line, print_table,
                                 warning_line)
from capsctl.errors import CapsctlError

# capsctl/models/conv.py's switch and formulations, spelled here too so that `bench --help` and
# the check of --conv need no torch (tests/test_conv.py checks that the two agree)
CONV_SWITCH = "CAPSCTL_CONV"
CONV_FORMULATIONS = ("onednn", "channels-last", "wgrad-gemm")


def _mem(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f} MiB"


def _header(r: dict) -> str:
    """The title over the table: model, device, precision, threads, compile and layout."""
    return (f"capsctl bench: {r['model']} ({r['parameters']:,} parameters) on {r['device']}"
            + (f" [{r['cpu']}]" if "cpu" in r else "")
            + f"\n{r['dtype']}, torch {r['torch']}, {r['threads']} threads, compile "
            + ("on" if r["compile_active"] else ("requested, fell back" if r["compile"]
                                                 else "off"))
            + f", channels_last {'on' if r['channels_last'] else 'off'}"
            + f", capsule layer: {r['capsule_layer']}; median of "
            f"{r['steps']} steps after {r['warmup']} warm-up"
            + (f"; load average {r['load_average']}" if "load_average" in r else "")
            + (f"\n{'allocated' if r['device_type'] == 'cuda' else 'resident'} before the "
               f"first step: {_mem(r['mem_start'])}" if r["mem_start"] is not None else "")
            + "\nmatrix-product peak: " + ", ".join(f"{p} {g:,.0f} GFLOP/s"
                                                   for p, g in r["peak_gflops"].items())
            + "; convolutions: " + _convs(r["conv_formulations"]))


def _convs(c: dict) -> str:
    """The convolution formulations: what each convolution ran in training and in inference,
    and the switch (auto: measured)."""
    runs = {k: v for k, v in c.items() if k != "mode"}
    parts = []
    for phase in ("train", "infer"):
        ran = {name: r[phase] for name, r in runs.items() if phase in r}
        kinds = sorted(set(ran.values()))
        if kinds:
            parts.append(f"{phase} " + (kinds[0] if len(kinds) == 1 else ", ".join(
                f"{name} {how}" for name, how in ran.items())))
    return ("; ".join(parts) or "none") + f" ({c['mode']})"


def _rate(p: dict) -> tuple[str, str, str]:
    if p.get("flops_per_image") is None:
        return "n/a", "n/a", "n/a"
    return (f"{p['flops_per_image'] / 1e9:.3f}", f"{p['gflops']:,.0f}",
            "n/a" if p["fraction_of_peak"] is None else f"{p['fraction_of_peak']:.2f}")


def bench_table(r: dict) -> Table:
    """One row per phase (train step, inference, large batch, conv-only bound) of result ``r``
    of capsctl.bench.run, with the train / bound ratio as the caption."""
    table = Table(title=_header(r), title_justify="left")
    for col in ("phase", "batch", "images/s", "ms/step (median)", "user ms/step",
                "sys ms/step", r["mem_kind"], "GFLOP/image", "GFLOP/s", "of peak"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    rows = [("train step", r["train"]), ("inference", r["infer"]),
            ("inference, large batch", r["infer_large"]), ("conv-only bound", r["conv_bound"])]
    for name, p in rows:
        if p is None:
            table.add_row(name, *(["n/a"] * 9))
            continue
        table.add_row(name, str(p["batch"]), f"{p['images_per_s']:,.1f}", f"{p['step_ms']:.1f}",
                      f"{p['user_ms']:.1f}", f"{p['sys_ms']:.1f}", _mem(p["peak_mem"]),
                      *_rate(p))
    ratio, cpu = r["train_vs_bound"], r["train_vs_bound_cpu"]
    table.caption = ("train / conv-only bound: " + ("n/a (the model has no Conv1 + PrimaryCaps)"
                                                    if ratio is None else f"{ratio:.2f}x")
                     + (f" (by CPU time: {cpu:.2f}x)" if cpu is not None else ""))
    return table


def _ms_rate(c: dict, part: str) -> str:
    if c[part + "_ms"] is None:
        return "-"
    return f"{c[part + '_ms']:.1f}; {c[part + '_gflops']:,.0f}"


def profile_tables(prof: dict) -> list[Table]:
    """bench --profile: the step's time by category and part, and each convolution alone."""
    step = prof["step"]
    t1 = Table(title=f"where a training step's time goes (profiled: {step['wall_ms']:.0f} ms "
                     "a step; operators' self time)", title_justify="left")
    for col in ("category", "ms/step", "share"):
        t1.add_column(col, justify="left" if col == "category" else "right")
    total = sum(step["categories"].values()) or 1.0
    for name, ms in step["categories"].items():
        t1.add_row(name, f"{ms:.1f}", f"{ms / total:.0%}")
    t1.caption = "parts (inclusive): " + ", ".join(f"{k} {v:.0f} ms"
                                                    for k, v in step["parts"].items())
    t2 = Table(title="each convolution alone, at the step's shapes (ms; GFLOP/s; '-': not "
                     "computed in training)", title_justify="left")
    for col in ("convolution", "formulation", "input", "GFLOP", "forward", "backward-data",
                "backward-weight"):
        t2.add_column(col, justify="left" if col in ("convolution", "formulation") else "right")
    for c in prof["convolutions"]:
        t2.add_row(c["conv"], c["formulation"], "x".join(map(str, c["input"])),
                   f"{c['gflop']:.2f}",
                   *(_ms_rate(c, k) for k in ("forward", "backward_data", "backward_weight")))
    return [t1, t2]


@cli_errors
def bench(
    config: Annotated[Optional[Path], typer.Argument(
        help="Experiment YAML. Default: none (the built-in defaults: the paper's MNIST "
             "CapsNet).")] = None,
    set_: SetOpt = [],
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Training (and first inference) batch. Default: "
                             "train.batch_size.")] = 0,
    large_batch: Annotated[int, typer.Option(
        "--large-batch", help="Batch of the large-batch inference. Default: "
                              "train.eval_batch_size.")] = 0,
    steps: Annotated[int, typer.Option(
        "--steps", help="Timed steps per phase (the median counts). Default: 10.")] = 10,
    warmup: Annotated[int, typer.Option(
        "--warmup", help="Untimed steps before each phase. Default: 3.")] = 3,
    threads: Annotated[int, typer.Option(
        "--threads", help="CPU threads for torch (torch.set_num_threads; 0 = torch's "
                          "default).")] = 0,
    device: DeviceOpt = None,
    conv: Annotated[str, typer.Option(
        "--conv", help="Convolution formulation: auto (measure once per machine and shape, "
                       "cached), onednn, channels-last or wgrad-gemm (sets $CAPSCTL_CONV). "
                       "Default: $CAPSCTL_CONV, else auto.")] = "",
    remeasure: Annotated[bool, typer.Option(
        "--remeasure", help="Forget the cached convolution choices and measure again. "
                            "Default: off.")] = False,
    profile: Annotated[bool, typer.Option(
        "--profile", help="Also print where a training step's time goes (by operator "
                          "category and part) and each convolution's forward, backward-data "
                          "and backward-weight alone. Default: off.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print exactly one JSON object on stdout. Default: a table.")] = False,
    export: Annotated[bool, typer.Option(
        "--export", help="Instead: inference latency (batch 1: median and p99 of --runs "
                         "calls) and batch-100 throughput of eager torch, the C routing "
                         "kernel, TorchScript and ONNX Runtime, for the paper CapsNet and "
                         "Efficient-CapsNet (or CONFIG's model). Needs capsctl[onnx]. "
                         "Default: off.")] = False,
    runs: Annotated[int, typer.Option(
        "--runs", help="With --export: timed batch-1 calls per path. Default: 200.")] = 200,
):
    """Measure a training step, inference and the conv-only bound (Conv1 + PrimaryCaps forward +
    backward) on a synthetic batch: images/s, peak memory, user and system CPU time.

    Examples: capsctl bench; capsctl bench configs/mnist.yaml --set train.precision=bf16
    --batch-size 100 --json
    """
    if batch_size < 0 or large_batch < 0 or steps < 1 or warmup < 0 or threads < 0:
        raise CapsctlError("--batch-size and --large-batch must be >= 0 (0 = from the config), "
                           "--steps >= 1, --warmup >= 0, --threads >= 0 (0 = torch's default)")
    how = (conv or os.environ.get(CONV_SWITCH, "auto")).strip().lower() or "auto"
    if how not in ("auto", *CONV_FORMULATIONS):
        raise CapsctlError(f"--conv / ${CONV_SWITCH} {how!r}: expected auto or one of "
                           f"{', '.join(CONV_FORMULATIONS)}")
    os.environ[CONV_SWITCH] = how
    if export:
        return export_latency(config, set_, runs, large_batch or 100, threads, as_json)
    import torch

    from capsctl import bench as bench_mod, config as config_mod, device as device_mod
    from capsctl.models import conv as conv_mod

    if remeasure:
        conv_mod.forget()

    cfg = config_mod.load(config, set_)
    dev = device_mod.resolve(device or cfg.train.device)
    if threads:
        torch.set_num_threads(threads)
    r = bench_mod.run(cfg, dev, batch_size=batch_size or None, large_batch=large_batch or None,
                      steps=steps, warmup=warmup, profile=profile,
                      warn=warning_line)
    if dev.type == "cpu":
        r["cpu"] = device_mod.cpu_name()
        r["load_average"] = bench_mod.load_average()
    if as_json:
        json_line(r)
        return
    print_table(bench_table(r))
    if profile:
        for table in profile_tables(r["profile"]):
            print_table(table)


def export_latency(config, set_: list[str], runs: int, large: int, threads: int,
                   as_json: bool) -> None:
    """bench --export: capsctl.export_bench's latency table (or its JSON)."""
    if runs < 1:
        raise CapsctlError(f"--runs {runs}: expected 1 or more")
    import torch

    from capsctl import bench as bench_mod, device as device_mod, export_bench

    if threads:
        torch.set_num_threads(threads)
    r = export_bench.run(str(config) if config else None, set_, runs=runs, large=large)
    r["cpu"], r["load_average"] = device_mod.cpu_name(), bench_mod.load_average()
    if as_json:
        json_line(r)
        return
    print_table(latency_table(r))


def latency_table(r: dict) -> Table:
    """bench --export's result as a table: a row per model and path."""
    table = Table(title=f"capsctl bench --export: inference on {r['cpu']}, {r['threads']} "
                        f"threads, torch {r['torch']}, onnxruntime {r['onnxruntime']}; load "
                        f"average {r['load_average']}", title_justify="left")
    for col in ("model", "path", "batch 1 median ms", "batch 1 p99 ms", "runs",
                "batch N images/s"):
        table.add_column(col, justify="left" if col in ("model", "path") else "right")
    for label, m in r["models"].items():
        for path, row in m["paths"].items():
            if isinstance(row, str):
                table.add_row(label, path, row, "", "", "")
            else:
                table.add_row(label, path, f"{row['median_ms']:.2f}", f"{row['p99_ms']:.2f}",
                              str(row["runs"]), f"{row['images_per_s']:,.0f} (N = "
                                                f"{row['large_batch']})")
    return table


def register(app: typer.Typer) -> None:
    """Add the bench command to ``app``."""
    app.command()(bench)
