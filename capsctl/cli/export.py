"""capsctl export: a trained model as one ONNX or TorchScript file, checked against the model
before it is kept (capsctl.export.export). torch is imported inside the command, so
`capsctl export --help` stays light."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from capsctl.cli.options import DataRootOpt, cli_errors, data_root_text, json_line, out
from capsctl.errors import CapsctlError


def _line(result: dict) -> str:
    c, m = result["check"], result["metadata"]
    d = c["max_abs_diff"]
    diffs = ", ".join(f"{k} {v:.2g}" for k, v in d.items())
    return (f"exported {escape(m['model'])} ({escape(m['dataset'])}, {m['precision']}, batch "
            f"{m['batch']}) to {escape(result['out'])} ({result['format']}, "
            f"{result['bytes'] / 1e6:,.1f} MB, outputs {', '.join(m['outputs'])})\n"
            f"checked on {escape(c['on'])}: max |difference| {diffs} (scores tolerance "
            f"{c['tolerance']:g}); predictions equal on {c['images'] - c['predictions_differ']}"
            f"/{c['images']}" + (f" ({c['predictions_differ']} near-tie(s) of the model differ)"
                                 if c["predictions_differ"] else ""))


@cli_errors
def export(
    model: Annotated[Path, typer.Argument(
        help="The checkpoint (.pt), run folder (its checkpoints/best.pt) or pretrained folder "
             "(pretrained/NAME).")],
    out_file: Annotated[Path, typer.Option(
        "--out", help="The file to write (.onnx, or .pt/.ts for TorchScript). Required.")],
    fmt: Annotated[Optional[str], typer.Option(
        "--format", help="onnx | torchscript. Default: from the --out suffix (.onnx: onnx; "
                         ".pt, .ts: torchscript).")] = None,
    batch: Annotated[int, typer.Option(
        "--batch", help="A fixed batch size in the file. Default: 0 = a dynamic batch "
                        "(--dynamic-batch).")] = 0,
    dynamic_batch: Annotated[bool, typer.Option(
        "--dynamic-batch", help="Any batch size (the default unless --batch is "
                                "given).")] = False,
    with_decoder: Annotated[bool, typer.Option(
        "--with-decoder", help="Also output the reconstruction from the predicted class's "
                               "capsule (recon). Default: class scores and capsules "
                               "only.")] = False,
    precision: Annotated[str, typer.Option(
        "--precision", help="fp32 | bf16 | fp16: the precision the weights are stored in "
                            "(computed in fp32). Default: fp32.")] = "fp32",
    check: Annotated[int, typer.Option(
        "--check", help="Test images the exported file is checked on against the model "
                        "(0 = the whole test set). Default: 1000.")] = 1000,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace --out if it exists. Default: refuse (one line, exit "
                        "2).")] = False,
    data_root: DataRootOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object (file, metadata, check). Default: two "
                       "lines.")] = False,
):
    """Export a trained model to ONNX or TorchScript (class scores, class capsules, optionally
    the reconstruction; routing unrolled; preprocessing and class names in the file's
    metadata), checked on real test images by the file's own runtime before it is kept.

    Examples: capsctl export runs/mnist --out mnist.onnx;
    capsctl export pretrained/efficient-capsnet-mnist --format torchscript --out eff.pt --batch 1
    """
    if batch < 0:
        raise CapsctlError(f"--batch {batch}: expected 1 or more (0: dynamic)")
    if batch and dynamic_batch:
        raise CapsctlError("--batch and --dynamic-batch exclude each other: give one")
    from capsctl.export import export as run_export

    result = run_export(model, out_file, fmt, batch or None, with_decoder, precision, check,
                        data_root_text(data_root), force)
    if as_json:
        json_line({k: result[k] for k in ("out", "format", "bytes", "metadata", "check")})
    else:
        out.print(_line(result), highlight=False)


def register(app: typer.Typer) -> None:
    """Add the export command to ``app``."""
    app.command("export")(export)
