"""The routed capsule layer against a plain reference with explicit loops over the capsules i
and j: values, couplings and gradients - on both of its CPU paths, the compiled kernel
(``layer_path`` "kernel") and the torch path (parent-major u_hat in one autograd function; what
CUDA runs, and the CPU's fallback). Tests of the torch path's own machinery (chunks, bf16
products, memory) take the ``torch_path`` fixture."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from capsctl.models import routing_kernel
from capsctl.models.capsules import squash
from capsctl.models.routing.dynamic import RoutedCapsules, route

B, I, J, P, D = 3, 7, 4, 5, 6


def use_path(name: str, monkeypatch) -> None:
    """Route the CPU capsule layer through the kernel (which must have built) or torch."""
    if name == "torch":
        monkeypatch.setattr(routing_kernel, "enabled", lambda: False)
    else:
        assert routing_kernel.load() is not None, (
            f"the CPU capsule-layer kernel did not build: {routing_kernel.status()}")


@pytest.fixture(params=["kernel", "torch"])
def layer_path(request, monkeypatch):
    use_path(request.param, monkeypatch)
    return request.param


@pytest.fixture
def torch_path(monkeypatch):
    use_path("torch", monkeypatch)


def reference(u_BIP, W_IJDP, iterations, bias_JD=None):
    """Procedure 1 written the obvious way: a loop for every child i and parent j."""
    Bn, In, _ = u_BIP.shape
    Jn = W_IJDP.shape[1]
    u_hat = [[[W_IJDP[i, j] @ u_BIP[b, i] for j in range(Jn)] for i in range(In)]
             for b in range(Bn)]
    vs, couplings = [], []
    for b in range(Bn):
        logits = [[torch.zeros(()) for _ in range(Jn)] for _ in range(In)]
        cs_b = []
        for r in range(iterations):
            c = [torch.softmax(torch.stack(logits[i]), 0) for i in range(In)]
            cs_b.append(torch.stack(c))
            v = []
            for j in range(Jn):
                s = sum(c[i][j] * u_hat[b][i][j] for i in range(In))
                if bias_JD is not None:
                    s = s + bias_JD[j]
                v.append(squash(s))
            if r < iterations - 1:
                logits = [[logits[i][j] + u_hat[b][i][j] @ v[j] for j in range(Jn)]
                          for i in range(In)]
        vs.append(torch.stack(v))
        couplings.append(torch.stack(cs_b))
    return torch.stack(vs), torch.stack(couplings, 1)  # (B, J, D), (R, B, I, J)


def _layer(iterations=3, bias=False, seed=0):
    torch.manual_seed(seed)
    layer = RoutedCapsules(I, J, P, D, iterations, init_std=0.5, bias=bias)
    if bias:
        with torch.no_grad():
            layer.bias_JD.normal_(0, 0.3)
    u = squash(torch.randn(B, I, P) * 2).detach().requires_grad_(True)
    return layer, u


def _assert_layer_equals_reference(layer, u, iterations, bias):
    """The layer's vectors, couplings of every pass and gradients (u, W, bias) against the
    loop reference, to 1e-5 in fp32; the gradients must not be trivially zero."""
    v, couplings = layer(u, keep_routing=True)
    params = [u, layer.W_IJDP] + ([layer.bias_JD] if bias else [])
    g_fast = torch.autograd.grad((v * torch.linspace(-1, 1, D)).sum(), params)

    v_ref, c_ref = reference(u, layer.W_IJDP, iterations, layer.bias_JD)
    g_ref = torch.autograd.grad((v_ref * torch.linspace(-1, 1, D)).sum(), params)

    assert v.dtype == torch.float32 and v.shape == (B, J, D)
    torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)
    assert len(couplings) == iterations
    for r in range(iterations):
        assert couplings[r].shape == (B, I, J)
        torch.testing.assert_close(couplings[r], c_ref[r], atol=1e-5, rtol=1e-5)
    for g, gr in zip(g_fast, g_ref):
        assert gr.abs().max() > 1e-4  # the gradient is not trivially zero
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("iterations,bias", [(1, False), (2, True), (3, False), (3, True),
                                             (4, False)])
def test_fast_routing_equals_the_loop_reference(layer_path, iterations, bias):
    layer, u = _layer(iterations, bias)
    _assert_layer_equals_reference(layer, u, iterations, bias)


def test_predictions_keep_the_child_major_view():
    layer, u = _layer()
    u_hat = layer.predictions(u)
    assert u_hat.shape == (B, I, J, D)
    for b, i, j in [(0, 0, 0), (2, 6, 3), (1, 3, 2)]:
        torch.testing.assert_close(u_hat[b, i, j], layer.W_IJDP[i, j] @ u[b, i])
    # differentiable: gradients of u and W as the einsum's
    ref = torch.einsum("bip,ijdp->bijd", u, layer.W_IJDP)
    w = torch.linspace(-1, 1, u_hat.numel()).view_as(u_hat)
    for g, gr in zip(torch.autograd.grad((u_hat * w).sum(), (u, layer.W_IJDP)),
                     torch.autograd.grad((ref * w).sum(), (u, layer.W_IJDP))):
        assert gr.abs().max() > 1e-4
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


def test_public_route_on_child_major_input_matches_the_layer(layer_path):
    layer, u = _layer(bias=True)
    v_layer, c_layer = layer(u, keep_routing=True)
    v, cs = route(layer.predictions(u), 3, layer.bias_JD, keep=True)
    torch.testing.assert_close(v, v_layer)
    torch.testing.assert_close(cs[2], c_layer[2])
    assert route(layer.predictions(u), 3, layer.bias_JD)[1] == []


def test_routing_gradient_passes_gradcheck_in_float64():
    torch.manual_seed(1)
    u_hat = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)  # (B, I, J, D)
    bias = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda uh, bb: route(uh, 3, bb)[0], (u_hat, bias))


def test_bf16_autocast_is_close_to_fp32(torch_path):
    """Torch path: bf16 products (8-bit mantissa) against fp32: capsule vectors within 0.03
    absolute (lengths are below 1), gradients within 5% of the largest fp32 gradient entry."""
    torch.manual_seed(2)
    layer = RoutedCapsules(64, 10, 8, 16, 3, init_std=0.1)
    u = squash(torch.randn(8, 64, 8)).detach().requires_grad_(True)
    out = {}
    for precision in ("fp32", "bf16"):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with ctx:
            v, _ = layer(u)
        assert v.dtype == torch.float32
        g = torch.autograd.grad(v.pow(2).sum(), (u, layer.W_IJDP))
        out[precision] = (v.detach(), g)
    v32, g32 = out["fp32"]
    v16, g16 = out["bf16"]
    assert (v16 - v32).abs().max() < 0.03
    assert (v16 - v32).abs().max() > 0  # bf16 really ran
    for a, b in zip(g16, g32):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() <= 0.05 * b.abs().max()


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in (result if isinstance(result, (tuple, list)) else (result,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


def test_no_tensor_of_size_B_I_J_D_P_and_memory_linear_in_batch(torch_path):
    """Torch path: forward + backward never form a B x I x J x D x P tensor: the largest one is
    u_hat."""
    largest = {}
    for batch in (4, 8):
        torch.manual_seed(0)
        layer = RoutedCapsules(12, 5, 3, 6, 3)       # W: 12 * 5 * 6 * 3 < u_hat at B >= 4
        u = squash(torch.randn(batch, 12, 3)).requires_grad_(True)
        with _LargestTensor() as mode:
            v, _ = layer(u)
            v.sum().backward()
        largest[batch] = mode.largest
        assert mode.largest == batch * 12 * 5 * 6          # u_hat (B, J, I, D) and its gradient
        assert mode.largest < batch * 12 * 5 * 6 * 3
    assert largest[8] == 2 * largest[4]


def _per_example_chunks(monkeypatch, examples: int, I_=I, J_=J, D_=D):
    """Make PredictAndRoute cut the batch into chunks of ``examples`` (fp32)."""
    import capsctl.models.routing.dynamic as caps
    monkeypatch.setattr(caps, "CHUNK_BYTES", examples * J_ * I_ * D_ * 4)


@pytest.mark.parametrize("examples", [1, 2])
def test_batch_chunked_layer_equals_the_loop_reference(torch_path, monkeypatch, examples):
    """Chunks of 1 or 2 examples over a batch of 3 (the last chunk shorter): the same values,
    couplings and gradients as the reference, u_hat recomputed in the backward."""
    _per_example_chunks(monkeypatch, examples)
    layer, u = _layer(3, bias=True)
    _assert_layer_equals_reference(layer, u, 3, bias=True)


def test_batch_chunked_layer_passes_gradcheck_in_float64(monkeypatch):
    import capsctl.models.routing.dynamic as caps
    monkeypatch.setattr(caps, "CHUNK_BYTES", 2 * 2 * 5 * 4 * 8)  # 2 examples of float64
    torch.manual_seed(3)
    u = torch.randn(5, 5, 3, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert caps.batch_chunk(2, 5, 4, torch.float64) == 2
    assert torch.autograd.gradcheck(
        lambda u_, W_, b_: caps.PredictAndRoute.apply(u_, W_, b_, 3, torch.float64)[0],
        (u, W, bias))


def test_layer_memory_is_flat_in_batch_size_beyond_one_chunk(torch_path, monkeypatch):
    """With chunks of 4 examples, forward + backward at batch 8 and 16 have the same largest
    tensor: one chunk's u_hat (4 x J x I x D) - neither u_hat nor its gradient is ever formed
    for the whole batch."""
    Ic, Jc, Dc, Pc = 12, 5, 6, 3
    _per_example_chunks(monkeypatch, 4, Ic, Jc, Dc)
    chunk = 4 * Jc * Ic * Dc
    for batch in (8, 16):
        torch.manual_seed(0)
        layer = RoutedCapsules(Ic, Jc, Pc, Dc, 3)
        assert layer.W_IJDP.numel() < chunk
        u = squash(torch.randn(batch, Ic, Pc)).requires_grad_(True)
        with _LargestTensor() as mode:
            v, _ = layer(u)
            v.sum().backward()
        assert mode.largest == chunk, batch


def test_the_cuda_plan_whole_batch_and_kept_u_hat_equals_the_reference(torch_path,
                                                                       monkeypatch):
    """On CUDA the layer routes the whole batch as one chunk and keeps u_hat for the backward
    (no recompute); that branch, run here on the CPU, gives the reference's values and
    gradients."""
    import capsctl.models.routing.dynamic as caps
    monkeypatch.setattr(caps, "chunk_plan", lambda device, B_, *rest: (B_, True))
    layer, u = _layer(3, bias=True)
    _assert_layer_equals_reference(layer, u, 3, bias=True)
