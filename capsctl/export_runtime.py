"""Reading and running a file `capsctl export` wrote, without torch: its metadata and ONNX
Runtime (``capsctl predict MODEL.onnx``, the export's own check). numpy only; onnxruntime is
imported when a file is opened (the optional extra ``capsctl[onnx]``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from capsctl.errors import CapsctlError

META_KEY = "capsctl"                 # ONNX metadata_props key of the JSON metadata
FORMAT_TAG = "capsctl-export/1"      # its "format"
CHECK_BATCH = 100                    # images per run of a dynamic-batch file


def session_of(path: str | Path):
    """An onnxruntime InferenceSession of ``path`` on the CPU (quiet)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_session(path: str | Path):
    """(onnxruntime InferenceSession, metadata) of an exported .onnx file; one-line errors for
    a missing onnxruntime and for a file that is not a capsctl export."""
    try:
        import onnxruntime  # noqa: F401  (the optional extra)
    except ImportError:
        raise CapsctlError(f"{path}: running an .onnx model needs onnxruntime: "
                           "pip install 'capsctl[onnx]'") from None
    path = Path(path)
    if not path.is_file():
        raise CapsctlError(f"{path}: no such file")
    try:
        session = session_of(path)
    except Exception as e:  # onnxruntime's own exception types: a broken or foreign file
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CapsctlError(f"{path}: not a readable ONNX model ({first})") from None
    raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    return session, parse_meta(raw, path)


def parse_meta(raw: str | None, path) -> dict:
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_TAG:
        raise CapsctlError(f"{path}: not a capsctl export (its metadata has no '{META_KEY}' "
                           f"entry of {FORMAT_TAG}); export models with capsctl export")
    return meta


def run_onnx(session, x_NCHW: np.ndarray, batch: int | None, step: int | None = None
             ) -> dict[str, np.ndarray]:
    """The session on float32 inputs, in batches of ``step`` (a fixed-batch file: chunks of
    its ``batch``, the last padded with zeros): {output name: (N, ...)}."""
    names = [o.name for o in session.get_outputs()]
    step = batch or step or CHECK_BATCH
    parts: dict[str, list] = {n: [] for n in names}
    for s in range(0, len(x_NCHW), step):
        chunk = x_NCHW[s:s + step]
        n = len(chunk)
        if batch and n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
        outs = session.run(names, {"image": np.ascontiguousarray(chunk, dtype=np.float32)})
        for name, o in zip(names, outs):
            parts[name].append(o[:n])
    return {k: np.concatenate(v) for k, v in parts.items()}


