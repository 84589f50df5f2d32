"""Dynamic routing: routing by agreement (``dynamic``, Sabour, Frosst & Hinton 2017, Procedure 1)
and its first pass alone (``uniform``), the ``RoutedCapsules`` layer; ``dynamic`` with
``leaky: true`` is ``leaky.LeakyRoutedCapsules`` instead (batched torch, no C kernel).

Shape legend (suffixes on tensor names):
  B batch   I child (input) capsules   J parent (output) capsules
  P child capsule dimension   D parent capsule dimension
  N blocks B * J (one per example and parent)   b a chunk of examples   c a chunk of children
  K the 2r - 1 terms of the routing backward (x_NKI, y_NKD); J * D in the prediction products
    (W_IPK, u_hat_cBK, g_IbK) and in the kernel's layouts
  V tiles of L = routing_kernel.VL children (the kernel's layouts: u_BVPL, W_VKPL)
  R routing passes (c_RBJI, s_RBJD)

A whole routed layer, predictions and routing iterations, is one function (``predict_and_route``)
with two implementations. On a CPU (fp32 u and W) it is the compiled C kernel of ``routing_kernel``,
the torch operator ``capsctl::routed_layer`` (one opaque op to autograd and torch.compile): per
example, the predictions stay in the L2 cache across all passes, each pass is one fused walk over
them, nothing of u_hat's size is kept. Elsewhere (CUDA, a CPU without a C compiler) the torch path,
one autograd function (``PredictAndRoute``): the prediction vectors u_hat_j|i = W_ij u_i are made by
one batched matrix product over the children and stored parent-major, (B, J, I, D): for every
(example, parent) the I x D block of predictions is contiguous, so both routing contractions - s_j =
sum_i c_ij u_hat_j|i and the agreement u_hat_j|i . v_j - are batched matrix-vector products that
stream u_hat once each; on a CPU it works through the batch in cache-sized chunks of examples, keeps
neither u_hat nor its gradient for the whole batch (the backward recomputes each chunk's u_hat and
expands its gradient from 2r - 1 outer-product terms a chunk at a time), so its memory is flat in
the batch size beyond one chunk. Nothing of size B x I x J x D x P is ever formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capsctl.models import routing_kernel
from capsctl.models.capsules import squash
from capsctl.models.routing.leaky import LeakyRoutedCapsules
from capsctl.models.routing.votes import agree, combine, wide


def _squash_grad(s_BJD: torch.Tensor, g_v_BJD: torch.Tensor) -> torch.Tensor:
    """d squash(s) / d s applied to ``g_v`` (small tensors: autograd on the squash itself)."""
    with torch.enable_grad():
        s = s_BJD.detach().requires_grad_(True)
        (g_s,) = torch.autograd.grad(squash(s), s, g_v_BJD)
    return g_s


def _route_forward(u_hat_BJID: torch.Tensor, bias_JD, iterations: int):
    """The routing passes: returns v (B, J, D) fp32, the coupling c (B, J, I) and the
    pre-squash s (B, J, D) of every pass (what the backward needs)."""
    B, J, I, D = u_hat_BJID.shape
    uh_NID = u_hat_BJID.view(B * J, I, D)  # N = B * J blocks of I x D predictions
    b_BJI = None
    cs, ss = [], []
    for r in range(iterations):
        if b_BJI is None:  # b = 0: uniform coupling
            c_BJI = wide(u_hat_BJID.new_full((B, J, I), 1.0 / J))
        else:
            c_BJI = torch.softmax(b_BJI, dim=1)          # over the parents j
        s_BJD = combine(c_BJI.view(B * J, I), uh_NID).view(B, J, D)
        if bias_JD is not None:
            s_BJD = s_BJD + wide(bias_JD)
        v_BJD = squash(s_BJD)
        cs.append(c_BJI)
        ss.append(s_BJD)
        if r < iterations - 1:
            agreement_BJI = agree(uh_NID, v_BJD.view(B * J, D)).view(B, J, I)
            b_BJI = agreement_BJI if b_BJI is None else b_BJI + agreement_BJI
    return v_BJD, cs, ss


def _route_backward(u_hat_BJID: torch.Tensor, cs, ss, g_v_BJD: torch.Tensor, with_bias: bool):
    """The gradient of the routing passes, as K = 2r - 1 outer-product terms: returns
    (x_NKI, y_NKD, g_bias_JD or None) with dL/du_hat[n, i, :] = sum_k x[n, k, i] y[n, k, :]
    (N = B * J). Walks the passes in reverse, reading u_hat once per contraction."""
    R = len(cs)
    B, J, I, D = u_hat_BJID.shape
    N, K = B * J, 2 * R - 1
    uh_NID = u_hat_BJID.view(N, I, D)
    x_NKI = u_hat_BJID.new_empty(N, K, I)
    y_NKD = u_hat_BJID.new_empty(N, K, D)
    g_v_BJD = wide(g_v_BJD)
    g_bias_JD = None
    g_b_next = None  # dL/db of the following pass (b_{r+1} = b_r + agreement_r)
    k = 0
    for r in range(R - 1, -1, -1):
        if r < R - 1:  # agreement_r = u_hat . v_r went into b_{r+1}
            g_v_BJD = combine(g_b_next.view(N, I), uh_NID).view(B, J, D)
            x_NKI[:, k].copy_(g_b_next.view(N, I))
            y_NKD[:, k].copy_(squash(ss[r]).view(N, D))
            k += 1
        g_s_BJD = _squash_grad(ss[r], g_v_BJD)
        if with_bias:
            g_bias_JD = g_s_BJD.sum(0) if g_bias_JD is None else g_bias_JD + g_s_BJD.sum(0)
        c_BJI = cs[r]
        x_NKI[:, k].copy_(c_BJI.view(N, I))
        y_NKD[:, k].copy_(g_s_BJD.view(N, D))
        k += 1
        if r > 0:  # c_0 = softmax(0) is a constant
            g_c_BJI = agree(uh_NID, g_s_BJD.view(N, D)).view(B, J, I)
            g_b_BJI = c_BJI * (g_c_BJI - (c_BJI * g_c_BJI).sum(1, keepdim=True))
            g_b_next = g_b_BJI if g_b_next is None else g_b_next + g_b_BJI
    return x_NKI, y_NKD, g_bias_JD


def route(u_hat_BIJD: torch.Tensor, iterations: int, bias_JD: torch.Tensor | None = None,
          keep: bool = False):
    """Routing by agreement (Sabour et al. 2017, Procedure 1), per example, on given predictions.

    b_ij starts at zero for every example; each of ``iterations`` passes takes the coupling
    c_ij = softmax_j(b_ij) over the parents, s_j = sum_i c_ij u_hat_j|i, v_j = squash(s_j); all but
    the last pass then add the agreement u_hat_j|i . v_j to b_ij. Takes u_hat (B, I, J, D);
    returns v (B, J, D) in fp32 and, when ``keep``, the coupling c (B, I, J) of each pass
    (detached). Gradients flow through every pass by plain autograd: the layer's own passes
    (``RoutedCapsules``) are the same ``_route_forward`` with a hand-written backward.
    """
    v_BJD, cs, _ = _route_forward(u_hat_BIJD.transpose(1, 2).contiguous(), bias_JD, iterations)
    return v_BJD, ([c_BJI.detach().transpose(1, 2) for c_BJI in cs] if keep else [])


CHUNK = 128  # children per chunk when u_hat changes layout (8 MB at batch 100, fp32)


def _prepare(u_BIP: torch.Tensor, W_IJDP: torch.Tensor, dtype: torch.dtype):
    """The child-major operands of the prediction product: u (I, B, P), W (I, P, J*D)."""
    I, J, D, P = W_IJDP.shape
    u_IBP = u_BIP.transpose(0, 1).to(dtype).contiguous()
    W_IPK = W_IJDP.to(dtype).permute(0, 3, 1, 2).reshape(I, P, J * D).contiguous()
    return u_IBP, W_IPK


def _predict(u_IBP: torch.Tensor, W_IPK: torch.Tensor, J: int, chunk: int | None = CHUNK):
    """u_hat (B, J, I, D): one batched product (B x P) @ (P x J*D) per child gives the
    child-major layout, which is moved into the parent-major tensor ``chunk`` children at a
    time (None: all at once), so the only temporary is one chunk. Plain autograd ops:
    differentiable as they stand (``RoutedCapsules.predictions``); ``PredictAndRoute`` calls
    it inside its forward and writes its own backward."""
    I, B, _ = u_IBP.shape
    D = W_IPK.shape[2] // J
    chunk = chunk or I
    u_hat_BJID = u_IBP.new_empty(B, J, I, D)
    for i0 in range(0, I, chunk):
        i1 = min(i0 + chunk, I)
        u_hat_cBK = torch.bmm(u_IBP[i0:i1], W_IPK[i0:i1])
        u_hat_BJID[:, :, i0:i1].copy_(u_hat_cBK.view(i1 - i0, B, J, D).permute(1, 2, 0, 3))
    return u_hat_BJID


CHUNK_BYTES = 8 << 20  # u_hat of one batch chunk in PredictAndRoute: fits a CPU's L3 cache


def batch_chunk(J: int, I: int, D: int, dtype: torch.dtype) -> int:
    """Examples per chunk so that the chunk's u_hat (chunk, J, I, D) is about CHUNK_BYTES."""
    per_example = J * I * D * torch.empty((), dtype=dtype).element_size()
    return max(1, CHUNK_BYTES // per_example)


def chunk_plan(device: torch.device, B: int, J: int, I: int, D: int,
               dtype: torch.dtype) -> tuple[int, bool]:
    """(examples per chunk, keep u_hat for the backward): CPU: cache-sized chunks, recompute;
    elsewhere (CUDA): the whole batch at once, kept."""
    if device.type == "cpu":
        return batch_chunk(J, I, D, dtype), False
    return B, True


def _kernel_applies(u_BIP: torch.Tensor, W_IJDP: torch.Tensor, bias_JD, iterations: int) -> bool:
    """The compiled CPU kernel takes fp32 CPU tensors (any autocast: it computes in fp32), when
    it is switched on and built."""
    return (u_BIP.device.type == "cpu" and u_BIP.dtype == W_IJDP.dtype == torch.float32
            and (bias_JD is None or bias_JD.dtype == torch.float32)
            and 1 <= iterations <= routing_kernel.MAX_R and routing_kernel.load() is not None)


def _kernel_layouts(u_BIP: torch.Tensor, W_IJDP: torch.Tensor):
    """u^T and W in the kernel's tiled layouts, children cut into V tiles of VL (padded with
    children whose u and W are zero: they predict zero and change nothing): u (B, V, P, VL) and
    W (V, J*D, P, VL), contiguous copies (autograd maps their gradients back)."""
    I, J, D, P = W_IJDP.shape
    B, VL = u_BIP.shape[0], routing_kernel.VL
    pad = -I % VL
    V = (I + pad) // VL
    if pad:  # (F.pad would copy even when there is nothing to pad)
        u_BIP = F.pad(u_BIP, (0, 0, 0, pad))
        W_IJDP = F.pad(W_IJDP, (0, 0, 0, 0, 0, 0, 0, pad))
    u_BVPL = u_BIP.reshape(B, V, VL, P).transpose(2, 3)
    W_VKPL = W_IJDP.reshape(V, VL, J * D, P).permute(0, 2, 3, 1)
    return u_BVPL.contiguous(), W_VKPL.contiguous()


def _kernel_layer(u_BIP: torch.Tensor, W_IJDP: torch.Tensor, bias_JD, iterations: int):
    """The layer in the compiled kernel (``torch.ops.capsctl.routed_layer``, forward and
    backward, fp32): returns v (B, J, D) and the coupling c (B, J, I) of every pass."""
    I, J = W_IJDP.shape[:2]
    u_BVPL, W_VKPL = _kernel_layouts(u_BIP, W_IJDP)
    bias_K = None if bias_JD is None else bias_JD.reshape(-1)
    v_BJD, c_RBJI, _ = torch.ops.capsctl.routed_layer(u_BVPL, W_VKPL, bias_K, J, iterations)
    return v_BJD, [c_RBJI[r, :, :, :I] for r in range(iterations)]


class PredictAndRoute(torch.autograd.Function):
    """The routed capsule layer's torch path (CUDA, fp64, a CPU without the compiled kernel):
    predictions u_hat = W u, then routing by agreement, as one autograd function.

    apply(u_BIP, W_IJDP, bias_JD or None, iterations, dtype) -> (v_BJD, c_BJI of every pass):
    products over u_hat in ``dtype`` (autocast's); logits, softmax and squash in fp32.

    On a CPU, routing being per example, the layer runs a chunk of examples at a time
    (``batch_chunk``: u_hat of a chunk is about 8 MB), so every pass over u_hat reads a chunk
    that sits in the cache instead of main memory, and neither u_hat nor its gradient ever
    exists for more than one chunk: the forward does not keep u_hat, the backward recomputes
    each chunk's (one cheap product, P = 8 multiply-adds per element; measured: no slower than
    keeping it) before walking the passes back. The layer's memory is then flat in the batch
    size beyond one chunk. On CUDA the whole batch is one chunk and u_hat is kept. The same
    values as ``route(layer.predictions(u))`` up to the order of the sums over the batch in W's
    gradient.
    """

    @staticmethod
    def forward(ctx, u_BIP, W_IJDP, bias_JD, iterations: int, dtype):
        I, J, D, _ = W_IJDP.shape
        B = u_BIP.shape[0]
        step, keep = chunk_plan(u_BIP.device, B, J, I, D, dtype)
        vs, kept = [], []
        cs, ss = [[] for _ in range(iterations)], [[] for _ in range(iterations)]
        with torch.autocast(u_BIP.device.type, enabled=False):
            u_IBP, W_IPK = _prepare(u_BIP, W_IJDP, dtype)
            for b0 in range(0, B, step):
                u_hat_bJID = _predict(u_IBP[:, b0:b0 + step], W_IPK, J, None)
                v_bJD, cs_b, ss_b = _route_forward(u_hat_bJID, bias_JD, iterations)
                if keep:
                    kept.append(u_hat_bJID)
                del u_hat_bJID
                vs.append(v_bJD)
                for r in range(iterations):
                    cs[r].append(cs_b[r])
                    ss[r].append(ss_b[r])
        cat = (lambda ts: ts[0]) if len(vs) == 1 else (lambda ts: torch.cat(ts))
        v_BJD, cs, ss = cat(vs), [cat(c) for c in cs], [cat(x) for x in ss]
        ctx.save_for_backward(u_IBP, W_IPK, *cs, *ss, *kept)
        ctx.mark_non_differentiable(*cs)  # the couplings are outputs only
        ctx.iterations, ctx.step, ctx.J = iterations, step, J
        ctx.dtypes = (u_BIP.dtype, W_IJDP.dtype)
        ctx.bias_dtype = bias_JD.dtype if bias_JD is not None else None
        return (v_BJD, *cs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_v_BJD, *_g_c):
        R, step, J = ctx.iterations, ctx.step, ctx.J
        u_IBP, W_IPK, *saved = ctx.saved_tensors
        cs, ss, kept = saved[:R], saved[R:2 * R], saved[2 * R:]
        I, B, P = u_IBP.shape
        D = W_IPK.shape[2] // J
        need_u, need_W = ctx.needs_input_grad[:2]
        g_u_IBP = torch.empty_like(u_IBP) if need_u else None
        g_W_IPK = torch.zeros_like(W_IPK) if need_W else None
        g_bias_JD = None
        for b0 in range(0, B, step):
            b1 = min(b0 + step, B)
            u_c = u_IBP[:, b0:b1]
            u_hat_bJID = kept[b0 // step] if kept else _predict(u_c, W_IPK, J, None)
            x_NKI, y_NKD, g_bias_b = _route_backward(
                u_hat_bJID, [c[b0:b1] for c in cs], [x[b0:b1] for x in ss], g_v_BJD[b0:b1],
                ctx.bias_dtype is not None)
            del u_hat_bJID
            if g_bias_b is not None:
                g_bias_JD = g_bias_b if g_bias_JD is None else g_bias_JD + g_bias_b
            # dL/du_hat of the chunk, sum_k x_k (outer) y_k, then child-major (I, b, J*D)
            g_IbK = torch.einsum("nki,nkd->ind", x_NKI, y_NKD).reshape(I, b1 - b0, J * D)
            if need_u:
                g_u_IBP[:, b0:b1] = torch.bmm(g_IbK, W_IPK.transpose(1, 2))
            if need_W:
                g_W_IPK.baddbmm_(u_c.transpose(1, 2), g_IbK)
        g_u = g_u_IBP.transpose(0, 1).to(ctx.dtypes[0]) if need_u else None
        g_W = (g_W_IPK.view(I, P, J, D).permute(0, 2, 3, 1).to(ctx.dtypes[1]).contiguous()
               if need_W else None)
        if g_bias_JD is not None:
            g_bias_JD = g_bias_JD.to(ctx.bias_dtype)
        return g_u, g_W, g_bias_JD, None, None


def _product_dtype(u_BIP: torch.Tensor) -> torch.dtype:
    """The dtype of the prediction products (a matmul): autocast's when it is on, else u's."""
    if torch.is_autocast_enabled(u_BIP.device.type):
        return torch.get_autocast_dtype(u_BIP.device.type)
    return u_BIP.dtype


def predict_and_route(u_BIP: torch.Tensor, W_IJDP: torch.Tensor, bias_JD, iterations: int):
    """A whole routed capsule layer: predictions u_hat = W u, then routing by agreement.
    Returns v (B, J, D) fp32 and the coupling c (B, J, I) of every pass (not differentiable).

    On a CPU with fp32 u and W, the compiled kernel (``routing_kernel``) does the whole layer,
    forward and backward, in fp32 - under bf16 autocast too (the layer is memory-bound there;
    bf16 would not make it faster). Elsewhere (CUDA, fp64, no compiler) the torch path,
    ``PredictAndRoute``."""
    if _kernel_applies(u_BIP, W_IJDP, bias_JD, iterations):
        return _kernel_layer(u_BIP, W_IJDP, bias_JD, iterations)
    v_BJD, *cs = PredictAndRoute.apply(u_BIP, W_IJDP, bias_JD, iterations,
                                       _product_dtype(u_BIP))
    return v_BJD, cs


class RoutedCapsules(nn.Module):
    """Fully connected capsule layer: u_hat_j|i = W_ij u_i for every (child, parent), then
    routing by agreement."""

    def __init__(self, in_caps: int, out_caps: int, in_dim: int, out_dim: int, iterations: int,
                 init_std: float = 0.01, bias: bool = False):
        super().__init__()
        self.iterations = iterations
        self.W_IJDP = nn.Parameter(torch.randn(in_caps, out_caps, out_dim, in_dim) * init_std)
        self.bias_JD = nn.Parameter(torch.zeros(out_caps, out_dim)) if bias else None

    def predictions(self, u_BIP: torch.Tensor) -> torch.Tensor:
        """u_hat (B, I, J, D): u_hat[b, i, j] = W_ij u_i, differentiable (for inspection and the
        public ``route``; the layer's forward never forms it for the whole batch). A transposed
        view of a parent-major tensor (call ``.contiguous()`` if you need this layout in
        memory)."""
        J = self.W_IJDP.shape[1]
        u_IBP, W_IPK = _prepare(u_BIP, self.W_IJDP, _product_dtype(u_BIP))
        return _predict(u_IBP, W_IPK, J).transpose(1, 2)

    def forward(self, u_BIP: torch.Tensor, keep_routing: bool = False):
        """v (B, J, D) fp32 and, when ``keep_routing``, the couplings (B, I, J) of every pass."""
        v_BJD, cs = predict_and_route(u_BIP, self.W_IJDP, self.bias_JD, self.iterations)
        return v_BJD, ([c_BJI.transpose(1, 2) for c_BJI in cs] if keep_routing else [])


def build_dynamic(in_caps: int, out_caps: int, in_dim: int, out_dim: int, init_std: float,
                  opts) -> nn.Module:
    """Procedure 1 with ``opts.iterations`` passes (the paper: 3): ``RoutedCapsules``, or
    ``LeakyRoutedCapsules`` (the same parameters) when ``opts.leaky``."""
    layer = LeakyRoutedCapsules if opts.leaky else RoutedCapsules
    return layer(in_caps, out_caps, in_dim, out_dim, opts.iterations, init_std, opts.class_bias)


def build_uniform(in_caps: int, out_caps: int, in_dim: int, out_dim: int, init_std: float,
                  opts) -> RoutedCapsules:
    """No routing: one pass at the uniform coupling b_ij = 0 -> c_ij = softmax_j(0) = 1/J
    (Procedure 1 line 4 with no update): s_j = (1/J) sum_i u_hat_j|i, v_j = squash(s_j)."""
    return RoutedCapsules(in_caps, out_caps, in_dim, out_dim, 1, init_std, opts.class_bias)
