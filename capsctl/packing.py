"""A pretrained model's reduced-precision weights (pretrained.py writes them): the classifier's
tensors in fp32 or bf16, the decoder's weight matrices as symmetric int8 (a scale per row) or
int4 (a scale per INT4_GROUP values, two values a byte), and their expansion back to fp32
that ``checkpoint.load`` applies to every file holding ``packed`` entries. Below both:
imports no capsctl module but errors.py. Torch is imported when weights are (un)packed.
"""

from __future__ import annotations

import math
from typing import Any

from capsctl.errors import CapsctlError, CheckpointError

INT4_GROUP = 32                # values sharing one int4 scale
CLASSIFIER_STORAGE = ("fp32", "bf16")
DECODER_STORAGE = ("fp32", "bf16", "int8", "int4")   # "auto": the first of these that fits
DECODER_PREFIX = "decoder."
MAX_PACKED = 1 << 28           # values one packed tensor may expand to (1 GiB as fp32)


def _quantize(t, bits: int) -> dict:
    """A float tensor as symmetric integers: int8 with one scale per row (dim 0), int4 with
    one per INT4_GROUP values (two values a byte, low nibble first)."""
    import torch

    flat = t.detach().float().reshape(-1)
    group = INT4_GROUP if bits == 4 else (flat.numel() // t.shape[0] if t.shape[0] else 1)
    group = max(group, 1)
    padded = math.ceil(flat.numel() / group) * group
    if bits == 4 and padded % 2:
        padded += group
    g = torch.nn.functional.pad(flat, (0, padded - flat.numel())).view(-1, group)
    top = 127 if bits == 8 else 7
    scale = g.abs().amax(dim=1) / top
    q = torch.round(g / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None])
    q = q.clamp(-top, top).to(torch.int8).reshape(-1)
    if bits == 4:
        u = (q + 8).to(torch.uint8)
        q = u[0::2] | (u[1::2] << 4)
    return {"bits": bits, "group": group, "shape": list(t.shape), "q": q.contiguous(),
            "scale": scale.contiguous()}


def _dequantize(name: str, e: Any, path) -> Any:
    """The float32 tensor a packed entry stands for; a one-line CheckpointError when the entry
    is not what ``_quantize`` writes."""
    import torch

    bad = f"{path}: packed weight {name!r} is malformed"
    if not isinstance(e, dict) or set(e) != {"bits", "group", "shape", "q", "scale"}:
        raise CheckpointError(f"{bad} (expected bits, group, shape, q, scale)")
    bits, group, shape, q, scale = (e[k] for k in ("bits", "group", "shape", "q", "scale"))
    if bits not in (4, 8) or type(group) is not int or not 1 <= group <= MAX_PACKED \
            or not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise CheckpointError(f"{bad} (bits, group or shape)")
    numel = math.prod(shape)
    if numel > MAX_PACKED or not isinstance(q, torch.Tensor) \
            or not isinstance(scale, torch.Tensor):
        raise CheckpointError(f"{bad} (too large, or not tensors)")
    n_groups = scale.numel()
    padded = n_groups * group
    want = (torch.int8, padded) if bits == 8 else (torch.uint8, padded // 2)
    if (q.dtype, q.numel()) != want or scale.dtype != torch.float32 or scale.dim() != 1 \
            or padded < numel or (bits == 4 and padded % 2) or padded - numel >= 2 * group:
        raise CheckpointError(f"{bad} (sizes or types do not agree)")
    if bits == 4:
        u = q.reshape(-1)
        q = torch.stack(((u & 15).to(torch.int8) - 8, (u >> 4).to(torch.int8) - 8), 1)
    values = (q.reshape(-1, group).float() * scale[:, None]).reshape(-1)
    return values[:numel].reshape(shape).contiguous()


def pack(weights: dict, classifier: str = "fp32", decoder: str = "int8") -> tuple[dict, dict]:
    """(plain tensors, packed entries) of a model's ``weights``: the classifier's floating
    tensors in ``classifier`` precision, the decoder's weight matrices quantized as
    ``decoder`` says (int8 / int4) or cast (fp32 / bf16); integer buffers and biases as
    they are (fp32)."""
    import torch

    if classifier not in CLASSIFIER_STORAGE or decoder not in DECODER_STORAGE:
        raise CapsctlError(f"storage classifier={classifier} decoder={decoder}: expected "
                           f"{'/'.join(CLASSIFIER_STORAGE)} and {'/'.join(DECODER_STORAGE)}")
    plain, packed = {}, {}
    for name, t in weights.items():
        if not t.is_floating_point():
            plain[name] = t
            continue
        kind = decoder if name.startswith(DECODER_PREFIX) else classifier
        if kind in ("int8", "int4") and t.dim() >= 2:
            packed[name] = _quantize(t, 8 if kind == "int8" else 4)
        elif kind == "bf16":
            plain[name] = t.detach().to(torch.bfloat16)
        else:
            plain[name] = t.detach().float()
    return plain, packed


def unpack(state: dict, path) -> dict:
    """``state`` (a loaded model.pt) with every weight expanded to fp32 in ``state["model"]``
    and ``packed`` removed: what ``checkpoint.load`` returns for a pretrained model."""
    import torch

    packed, weights = state.get("packed"), state.get("model")
    if not isinstance(packed, dict) or not isinstance(weights, dict):
        raise CheckpointError(f"{path}: the packed weights are not a mapping")
    overlap = set(packed) & set(weights)
    if overlap:
        raise CheckpointError(f"{path}: weight {sorted(overlap)[0]!r} is stored twice")
    expanded = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in weights.items()}
    for name, entry in packed.items():
        expanded[name] = _dequantize(str(name), entry, path)
    return {**{k: v for k, v in state.items() if k != "packed"}, "model": expanded}
