"""`capsctl export`: a trained model as one ONNX or TorchScript file that runs without capsctl,
checked against the model before it is kept.

What the file computes (``Graph``): the model's forward on a preprocessed image batch
``image`` (B, C, H, W) float32 (the dataset's test-time view: ``capsctl.predict.Preprocessing``)
returning ``scores`` (B, J): the class scores argmax predicts from (capsule lengths; EM
activations; CNN logits or sigmoid probabilities), ``capsules`` (B, J, D) (class capsule vectors
or flattened 4x4 poses; absent for the CNNs) and, with ``with_decoder``, ``recon`` (B, C*H*W),
the reconstruction from the predicted class's capsule. Routing iterations are unrolled (Python
loops traced once); the routed layer of dynamic routing runs on its torch path
(``TorchRouted``): the C kernel (``models/routing_kernel``) is a CPU speed path of capsctl's own
and never part of an export; every convolution is a plain convolution (``conv.forced``).

The file says how to feed it (``metadata``): the stored image's side and channels, the centre
crop, the normalisation, the class names, the outputs, and the parity it passed; ONNX keeps them
in ``metadata_props`` (key ``capsctl``, JSON, plus flat keys), TorchScript in the extra file
``capsctl.json``.

The check (``export``): the file is written to a temporary file beside ``out``, loaded by its own
runtime (ONNX Runtime; ``torch.jit.load``), run on real test images of the model's dataset (or
the ``slice.npz`` of a pretrained folder where the dataset is absent), and compared with the
eager model as ``capsctl eval`` runs it (fp32): the largest |difference| of the class scores must
be within ``TOLERANCE[precision]`` and every prediction the same, except where the model's own
top two scores are closer than that tolerance (a tie the rounding may break either way; counted
and reported). Only then is it renamed to ``out``; a failing file is deleted.

``--precision bf16|fp16``: the weights are stored in that precision (about half the file) and
widened to fp32 in the graph, so any runtime computes in fp32; the tolerance says how far the
rounding of the weights may move the scores.

Shape legend: N check images, B batch, C channels, H W input side, J classes, D capsule size.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from capsctl.errors import CapsctlError
from capsctl.export_runtime import CHECK_BATCH, FORMAT_TAG, META_KEY, onnx_session, parse_meta, \
    run_onnx, session_of

FORMATS = ("onnx", "torchscript")
SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript",
            ".torchscript": "torchscript"}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 5e-2}   # max |score difference| allowed
CHECK_IMAGES = 1000     # test images the check runs by default (0: the whole test set)
OPSET = 18
TS_EXTRA = "capsctl.json"
ONNX_EXTRA = "pip install 'capsctl[onnx]' (onnx, onnxruntime, onnxscript)"


# --- the graph ------------------------------------------------------------------------------------

class TorchRouted(nn.Module):
    """``RoutedCapsules`` on its torch path, with standard operators only: the votes by one
    batched product over the children, then ``dynamic._route_forward``'s passes (unrolled),
    any batch size, no autograd function, no C kernel. Holds the layer's own parameters."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, u_BIP: torch.Tensor, keep_routing: bool = False):
        from capsctl.models.routing.dynamic import _route_forward

        W_IJDP = self.layer.W_IJDP
        I, J, D, P = W_IJDP.shape
        W_IPK = W_IJDP.to(u_BIP.dtype).permute(0, 3, 1, 2).reshape(I, P, J * D)
        u_hat_IBK = torch.bmm(u_BIP.transpose(0, 1), W_IPK)
        u_hat_BJID = u_hat_IBK.reshape(I, -1, J, D).permute(1, 2, 0, 3).contiguous()
        v_BJD, _, _ = _route_forward(u_hat_BJID, self.layer.bias_JD, self.layer.iterations)
        return v_BJD, []


def torch_path(model: nn.Module) -> nn.Module:
    """``model`` with every ``RoutedCapsules`` replaced by its ``TorchRouted`` twin (the same
    parameter objects: a shallow swap on the model handed in)."""
    from capsctl.models.routing.dynamic import RoutedCapsules

    for name, child in list(model.named_children()):
        if isinstance(child, RoutedCapsules):
            setattr(model, name, TorchRouted(child))
        else:
            torch_path(child)
    return model


class Graph(nn.Module):
    """What the exported file computes: image (B, C, H, W) float32 -> the output tuple
    (``output_names``). With a reduced ``dtype`` the parameters are held in it and widened to
    fp32 at every use (``torch.func.functional_call``)."""

    def __init__(self, model: nn.Module, with_decoder: bool, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.with_decoder = with_decoder
        self.capsule_key = getattr(model, "capsule_key", None)
        self.reduced = dtype != torch.float32
        if self.reduced:
            for p in model.parameters():
                p.data = p.data.to(dtype)

    def output_names(self) -> list[str]:
        return ["scores"] + (["capsules"] if self.capsule_key else []) + \
            (["recon"] if self.with_decoder else [])

    def forward(self, image: torch.Tensor):
        if self.reduced and torch.jit.is_tracing():   # functional_call refuses the tracer
            out = self._widened_call(image)
        elif self.reduced:
            params = {k: p.float() for k, p in self.model.named_parameters()}
            out = torch.func.functional_call(self.model, params, (image,))
        else:
            out = self.model(image)
        result = [out["scores"].float()]
        if self.capsule_key:
            result.append(out[self.capsule_key].float())
        if self.with_decoder:
            result.append(out["recon"].float())
        return tuple(result)


    def _widened_call(self, image: torch.Tensor) -> dict:
        """The model with each parameter replaced by its fp32 widening for one call (what
        functional_call does), restored after."""
        saved = [(m, k, p) for m in self.model.modules() for k, p in m._parameters.items()
                 if p is not None]
        try:
            for m, k, p in saved:
                m._parameters[k] = p.float()
            return self.model(image)
        finally:
            for m, k, p in saved:
                m._parameters[k] = p


def graph_of(model: nn.Module, with_decoder: bool, precision: str) -> Graph:
    """A copy of ``model`` (eval mode, CPU) made exportable: ``Graph``."""
    import copy

    twin = copy.deepcopy(model).cpu().eval()
    if not with_decoder and getattr(twin, "decoder", None) is not None:
        twin.decoder = None      # not in the file (the forward then returns no recon)
    for p in twin.parameters():
        p.requires_grad_(False)
    return Graph(torch_path(twin), with_decoder, PRECISIONS[precision]).eval()


# --- writing the file -----------------------------------------------------------------------------

def require_onnx() -> None:
    """A one-line CapsctlError when onnx, onnxruntime or onnxscript is missing."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise CapsctlError(f"ONNX export needs {', '.join(missing)}: {ONNX_EXTRA}")


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines and warnings kept off the console."""
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def write_onnx(graph: Graph, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    """The torch.export-based exporter (``dynamo=True``, onnxscript): the maintained one of
    torch >= 2.9 (the TorchScript-based one is deprecated); one file, weights inside.
    ``optimize=False``: onnxscript's graph optimizer (0.7) drops the ``+ 1e-8`` under the
    square root of ``safe_norm`` and ``squash`` (capsule lengths then move by up to 1e-4, and
    a zero capsule's gradient-safe length becomes 0); ONNX Runtime optimizes the graph itself
    when it loads it."""
    from capsctl.models import conv

    shapes = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},) if dynamic else None
    with _quiet(), conv.forced("onednn"), torch.no_grad():
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=["image"],
                                    output_names=graph.output_names(), opset_version=OPSET,
                                    dynamic_shapes=shapes, optimize=False)
        program.save(str(path), external_data=False)


def write_torchscript(graph: Graph, example: torch.Tensor, path: Path, meta: dict):
    """``torch.jit.trace`` (the routing passes unrolled), saved with ``capsctl.json``."""
    from capsctl.models import conv

    with _quiet(), conv.forced("onednn"), torch.no_grad():
        traced = torch.jit.trace(graph, (example,), check_trace=False, strict=False)
        torch.jit.save(traced, str(path), _extra_files={TS_EXTRA: json.dumps(meta)})
    return traced


def set_onnx_metadata(path: Path, meta: dict) -> None:
    """Write ``meta`` into the ONNX file's metadata_props: ``capsctl`` (all of it, JSON) and
    flat keys a consumer can read without parsing JSON."""
    import onnx

    proto = onnx.load(str(path))
    flat = {META_KEY: json.dumps(meta), "classes": json.dumps(meta["classes"]),
            "input_channels": str(meta["input"]["channels"]),
            "input_size": str(meta["input"]["crop"]),
            "normalisation": meta["input"]["normalisation"],
            "outputs": ",".join(meta["outputs"])}
    del proto.metadata_props[:]
    for k, v in flat.items():
        proto.metadata_props.add(key=k, value=v)
    proto.doc_string = f"capsctl export of {meta['model']} ({meta['dataset']})"
    onnx.save(proto, str(path))


# --- reading and running an exported file ---------------------------------------------------------

def run_torchscript(module, names: list[str], x_NCHW: np.ndarray, batch: int | None
                    ) -> dict[str, np.ndarray]:
    """A loaded TorchScript export on float32 inputs, as ``run_onnx``."""
    step = batch or CHECK_BATCH
    parts: dict[str, list] = {n: [] for n in names}
    with torch.no_grad():
        for s in range(0, len(x_NCHW), step):
            chunk = torch.from_numpy(np.ascontiguousarray(x_NCHW[s:s + step]))
            n = len(chunk)
            if batch and n < batch:
                chunk = torch.cat([chunk, chunk.new_zeros(batch - n, *chunk.shape[1:])])
            for name, o in zip(names, module(chunk)):
                parts[name].append(o[:n].numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def run_exported(fmt: str, path: Path, names: list[str], x_NCHW: np.ndarray,
                 batch: int | None) -> dict[str, np.ndarray]:
    """The file at ``path`` run by its own runtime (ONNX Runtime; torch.jit) on ``x``."""
    if fmt == "onnx":
        return run_onnx(session_of(path), x_NCHW, batch)
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu")
    return run_torchscript(module, names, x_NCHW, batch)


# --- the check ------------------------------------------------------------------------------------

def check_images(cfg, source_path: Path, n: int, data_root: str | None
                 ) -> tuple[np.ndarray, str]:
    """(float32 model inputs (N, C, H, W), where they came from): the first ``n`` test images
    of the model's dataset (0: all) as evaluation feeds them; where the dataset cannot be
    read, the ``slice.npz`` of a pretrained folder."""
    from capsctl.data.build import build_eval
    from capsctl.errors import DataError

    try:
        source = build_eval(cfg.data.name, "test", cfg, torch.device("cpu"), data_root)
    except (DataError, OSError) as e:
        slice_file = (source_path if source_path.is_dir() else source_path.parent) / "slice.npz"
        if slice_file.is_file():
            from capsctl.pretrained import read_slice

            x_u8, _ = read_slice(slice_file.parent)
            x_u8 = x_u8 if not n else x_u8[:n]
            return x_u8.astype(np.float32) / 255.0, f"{len(x_u8)} images of {slice_file}"
        raise CapsctlError(f"no test images of {cfg.data.name} to check the export against: "
                           f"{e}") from None
    limit = n or source.default_limit
    xs = [b["x"].float().numpy() for b in source.batches(CHECK_BATCH, limit)]
    x = np.concatenate(xs)
    whole = "the whole" if len(x) == len(source) else f"the first {len(x)} of the"
    return x, f"{whole} {cfg.data.name} test set ({len(x)} images)"


@torch.no_grad()
def reference(model: nn.Module, x_NCHW: np.ndarray, with_decoder: bool
              ) -> dict[str, np.ndarray]:
    """The eager model as ``capsctl eval`` runs it (fp32, its fastest CPU paths): the outputs
    the file must reproduce."""
    key = getattr(model, "capsule_key", None)
    parts: dict[str, list] = {"scores": [], "capsules": [], "recon": []}
    for s in range(0, len(x_NCHW), CHECK_BATCH):
        out = model(torch.from_numpy(x_NCHW[s:s + CHECK_BATCH]))
        parts["scores"].append(out["scores"].float().numpy())
        if key:
            parts["capsules"].append(out[key].float().numpy())
        if with_decoder:
            parts["recon"].append(out["recon"].float().numpy())
    return {k: np.concatenate(v) for k, v in parts.items() if v}


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tol: float) -> dict:
    """Parity of ``got`` with ``ref``: max |difference| of each output, predictions that
    differ, and of those the ones that are not near-ties of the reference (top two scores
    closer than ``tol``)."""
    diffs = {k: float(np.max(np.abs(ref[k].astype(np.float64) - got[k]))) if ref[k].size else 0.0
             for k in ref}
    pred_ref, pred_got = ref["scores"].argmax(1), got["scores"].argmax(1)
    differ = pred_ref != pred_got
    top2 = np.sort(ref["scores"], axis=1)[:, -2:] if ref["scores"].shape[1] > 1 else None
    near_tie = (top2[:, 1] - top2[:, 0] <= tol) if top2 is not None else np.zeros_like(differ)
    finite = all(np.isfinite(v).all() for v in got.values())
    bad = int((differ & ~near_tie).sum())
    return {"images": int(len(pred_ref)), "max_abs_diff": diffs, "tolerance": tol,
            "predictions_differ": int(differ.sum()), "predictions_differ_not_tie": bad,
            "passed": finite and diffs["scores"] <= tol and bad == 0}


# --- export ---------------------------------------------------------------------------------------

def format_of(fmt: str | None, out: Path) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise CapsctlError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        return fmt
    found = SUFFIXES.get(out.suffix.lower())
    if found is None:
        raise CapsctlError(f"--out {out}: give --format onnx or torchscript (the suffix "
                           f"{out.suffix or '(none)'} does not say which)")
    return found


def check_target(out: Path, force: bool) -> None:
    """A one-line CapsctlError when ``out`` cannot be written or exists (without ``force``)."""
    if out.is_dir():
        raise CapsctlError(f"--out {out}: is a folder; give a file name")
    if os.path.lexists(out) and not force:
        raise CapsctlError(f"--out {out}: exists; pass --force to replace it, or choose another "
                           "name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CapsctlError(f"--out {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CapsctlError(f"--out {out}: cannot write into {parent} (permission denied)")


def metadata(cfg, model, names: list[str], view, graph: Graph, precision: str,
             batch: int | None, source: Path) -> dict:
    from capsctl import __version__
    from capsctl.data.registry import NORMALISATIONS
    from capsctl.predict import SCORE_NAMES

    routing = getattr(getattr(cfg.model, "routing", None), "name", None)
    crop = view.crop
    return {
        "format": FORMAT_TAG, "capsctl": __version__, "torch": torch.__version__,
        "model": cfg.model.name, "routing": routing, "dataset": cfg.data.name,
        "source": Path(source).name, "classes": names, "precision": precision,
        "batch": batch or "dynamic",
        "input": {"name": "image", "shape": [batch or "batch", view.channels, crop, crop],
                  "dtype": "float32", "channels": view.channels, "side": view.side,
                  "crop": crop, "normalisation": view.normalisation,
                  "normalisation_text": NORMALISATIONS[view.normalisation],
                  "steps": [f"decode to {view.channels} channel(s) (grey: L; colour: RGB)",
                            f"resize the centre square to {view.side}x{view.side} (bilinear, "
                            "antialiased)",
                            f"centre crop {crop}x{crop}",
                            NORMALISATIONS[view.normalisation],
                            f"float32 (B, {view.channels}, {crop}, {crop})"]},
        "outputs": graph.output_names(),
        "score_name": SCORE_NAMES.get(getattr(model, "capsule_key", None), "score"),
    }


def export(source, out, fmt: str | None = None, batch: int | None = None,
           with_decoder: bool = False, precision: str = "fp32", check: int = CHECK_IMAGES,
           data_root: str | None = None, force: bool = False,
           log: Callable[[str], None] = lambda s: None) -> dict:
    """Export the model of ``source`` (a checkpoint, run folder or pretrained folder) to
    ``out``, checked (see the module's docstring). Returns {"out", "format", "metadata",
    "check", "seconds"}; a failed check is a one-line CapsctlError and leaves no file."""
    from capsctl.checkpoint import load_model
    from capsctl.classes import class_names_of
    from capsctl.predict import preprocessing_of

    out = Path(out)
    fmt = format_of(fmt, out)
    if precision not in PRECISIONS:
        raise CapsctlError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if batch is not None and batch < 1:
        raise CapsctlError(f"--batch {batch}: expected 1 or more")
    if check < 0:
        raise CapsctlError(f"--check {check}: expected 0 (the whole test set) or more")
    check_target(out, force)
    if fmt == "onnx":
        require_onnx()
    t0 = time.perf_counter()
    model, cfg, state = load_model(source, torch.device("cpu"))
    if with_decoder and not model.has_decoder:
        raise CapsctlError(f"--with-decoder: the {cfg.model.name} model of {source} has no "
                           "decoder")
    names = class_names_of(cfg, state, data_root)
    view = preprocessing_of(cfg)
    x, where = check_images(cfg, Path(source), check, data_root)
    graph = graph_of(model, with_decoder, precision)
    meta = metadata(cfg, model, names, view, graph, precision, batch, Path(source))
    example = torch.from_numpy(x[:batch or 2].copy())
    if len(example) < (batch or 2):
        example = torch.cat([example, example.new_zeros((batch or 2) - len(example),
                                                        *example.shape[1:])])
    log(f"reference: the eager model on {where}")
    ref = reference(model, x, with_decoder)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        result = _write_and_check(graph, example, tmp, fmt, meta, x, ref, batch, precision,
                                  where, log)
        _sync(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"out": str(out), "format": fmt, "metadata": meta, "check": result,
            "bytes": out.stat().st_size, "seconds": time.perf_counter() - t0}


def _write_and_check(graph, example, tmp: Path, fmt: str, meta: dict, x, ref, batch, precision,
                     where: str, log) -> dict:
    """Write the file at ``tmp``, run it by its runtime on ``x``, compare with ``ref``; record
    the check in its metadata when it passes, else raise."""
    log(f"exporting {fmt} ({precision}, batch {batch or 'dynamic'})")
    try:
        if fmt == "onnx":
            write_onnx(graph, example, tmp, batch is None)
            set_onnx_metadata(tmp, meta)
        else:
            traced = write_torchscript(graph, example, tmp, meta)
    except CapsctlError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CapsctlError(f"the {fmt} exporter failed for this model ({type(e).__name__}: "
                           f"{first}); nothing was written") from None
    log(f"checking: the exported file in {'ONNX Runtime' if fmt == 'onnx' else 'torch.jit'} "
        f"on {where}")
    got = run_exported(fmt, tmp, graph.output_names(), x, batch)
    result = {"on": where, **compare(ref, got, TOLERANCE[precision])}
    if not result["passed"]:
        d = result["max_abs_diff"]
        raise CapsctlError(
            f"the exported model does not compute what the model does on {where}: max |score "
            f"difference| {d['scores']:.3g} (tolerance {result['tolerance']:g}), "
            f"{result['predictions_differ_not_tie']} prediction(s) differ; no file was left")
    meta["check"] = result
    if fmt == "onnx":
        set_onnx_metadata(tmp, meta)
    else:
        with _quiet():
            torch.jit.save(traced, str(tmp), _extra_files={TS_EXTRA: json.dumps(meta)})
    return result


def _sync(path: Path) -> None:
    """Flush ``path`` to disk and give it a new file's permissions (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def read_torchscript(path: str | Path):
    """(module, metadata) of an exported TorchScript file."""
    extra = {TS_EXTRA: ""}
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, parse_meta(extra[TS_EXTRA], path)
