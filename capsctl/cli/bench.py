"""capsctl bench: throughput and memory of a training step (capsctl.bench.run), as a table or
JSON. torch is imported inside the command, so `capsctl bench --help` stays light."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from capsctl.cli.options import DeviceOpt, SetOpt, cli_errors, err, json_line, print_table
from capsctl.errors import CapsctlError


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
               f"first step: {_mem(r['mem_start'])}" if r["mem_start"] is not None else ""))


def bench_table(r: dict) -> Table:
    """One row per phase (train step, inference, large batch, conv-only bound) of result ``r``
    of capsctl.bench.run, with the train / bound ratio as the caption."""
    table = Table(title=_header(r), title_justify="left")
    for col in ("phase", "batch", "images/s", "ms/step (median)", "user ms/step",
                "sys ms/step", r["mem_kind"]):
        table.add_column(col, justify="left" if col == "phase" else "right")
    rows = [("train step", r["train"]), ("inference", r["infer"]),
            ("inference, large batch", r["infer_large"]), ("conv-only bound", r["conv_bound"])]
    for name, p in rows:
        if p is None:
            table.add_row(name, *(["n/a"] * 6))
            continue
        table.add_row(name, str(p["batch"]), f"{p['images_per_s']:,.1f}", f"{p['step_ms']:.1f}",
                      f"{p['user_ms']:.1f}", f"{p['sys_ms']:.1f}", _mem(p["peak_mem"]))
    ratio, cpu = r["train_vs_bound"], r["train_vs_bound_cpu"]
    table.caption = ("train / conv-only bound: " + ("n/a (the model has no Conv1 + PrimaryCaps)"
                                                    if ratio is None else f"{ratio:.2f}x")
                     + (f" (by CPU time: {cpu:.2f}x)" if cpu is not None else ""))
    return table


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
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print exactly one JSON object on stdout. Default: a table.")] = False,
):
    """Measure a training step, inference and the conv-only bound (Conv1 + PrimaryCaps forward +
    backward) on a synthetic batch: images/s, peak memory, user and system CPU time.

    Examples: capsctl bench; capsctl bench configs/mnist.yaml --set train.precision=bf16
    --batch-size 100 --json
    """
    if batch_size < 0 or large_batch < 0 or steps < 1 or warmup < 0 or threads < 0:
        raise CapsctlError("--batch-size and --large-batch must be >= 0 (0 = from the config), "
                           "--steps >= 1, --warmup >= 0, --threads >= 0 (0 = torch's default)")
    import torch

    from capsctl import bench as bench_mod, config as config_mod, device as device_mod

    cfg = config_mod.load(config, set_)
    dev = device_mod.resolve(device or cfg.train.device)
    if threads:
        torch.set_num_threads(threads)
    r = bench_mod.run(cfg, dev, batch_size=batch_size or None, large_batch=large_batch or None,
                      steps=steps, warmup=warmup,
                      warn=lambda msg: err.print(f"[yellow]warning:[/] {msg}", highlight=False))
    if dev.type == "cpu":
        r["cpu"] = bench_mod.cpu_info()
        r["load_average"] = bench_mod.load_average()
    if as_json:
        json_line(r)
        return
    print_table(bench_table(r))


def register(app: typer.Typer) -> None:
    """Add the bench command to ``app``."""
    app.command()(bench)
