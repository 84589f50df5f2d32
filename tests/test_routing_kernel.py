"""The compiled CPU capsule-layer kernel: equal to the torch path at the paper's sizes (the
specialised D = 16, P = 8 code, blocks of examples cut short, two threads), independent of the
thread count, fp32 under bf16 autocast, memory linear in the batch, a clean fallback to the
torch path when it cannot be built; as the torch operator capsctl::routed_layer: opcheck, and
torch.compile of the layer equal to eager. (Its agreement with the loop reference at small
widths is in test_routing.py, with ``layer_path`` "kernel".)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from capsctl.models import routing_kernel
from capsctl.models.capsules import squash
from capsctl.models.routing.dynamic import RoutedCapsules, predict_and_route
from tests.test_routing import _LargestTensor, use_path


def _run_layer(u, W, bias, iterations, g, path, monkeypatch):
    """Values, couplings and gradients (u, W, bias) of the layer on one path."""
    with monkeypatch.context() as m:
        use_path(path, m)
        u = u.detach().clone().requires_grad_(True)
        W = W.detach().clone().requires_grad_(True)
        b = None if bias is None else bias.detach().clone().requires_grad_(True)
        v, cs = predict_and_route(u, W, b, iterations)
        v.backward(g)
    return [v.detach(), torch.stack(cs), u.grad, W.grad] + ([b.grad] if b is not None else [])


def _inputs(Bn, In, Jn, Dn, Pn, seed=0):
    torch.manual_seed(seed)
    u = squash(torch.randn(Bn, In, Pn))
    W = torch.randn(In, Jn, Dn, Pn) * 0.05
    bias = torch.randn(Jn, Dn) * 0.1
    return u, W, bias, torch.randn(Bn, Jn, Dn)


@pytest.mark.parametrize("iterations", [1, 3])
def test_kernel_equals_the_torch_path_at_the_paper_sizes(monkeypatch, iterations):
    """1152 children, 10 parents of 16 dims, 8-dim children (the compiled D = 16, P = 8 code),
    a batch of 21 on two threads (blocks of 8 examples cut short): the same values, couplings
    and gradients as the torch path, to 1e-5 (relative to each tensor's largest entry)."""
    torch.set_num_threads(2)
    args = _inputs(21, 1152, 10, 16, 8)
    got = _run_layer(*args[:3], iterations, args[3], "kernel", monkeypatch)
    ref = _run_layer(*args[:3], iterations, args[3], "torch", monkeypatch)
    for name, a, b in zip(["v", "c", "grad u", "grad W", "grad bias"], got, ref):
        assert a.shape == b.shape, name
        scale = b.abs().max()
        assert scale > 0, name
        assert (a - b).abs().max() <= 1e-5 * scale, name


def test_kernel_result_does_not_depend_on_the_thread_count(monkeypatch):
    """One thread or two (each then sums its own share of dL/dW): the same values and
    gradients, up to the order of a sum."""
    args = _inputs(11, 40, 3, 4, 5, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_layer(*args[:3], 3, args[3], "kernel", monkeypatch)
        torch.set_num_threads(2)
        two = _run_layer(*args[:3], 3, args[3], "kernel", monkeypatch)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_kernel_layer_runs_in_fp32_under_bf16_autocast(monkeypatch):
    """The kernel computes the layer in fp32 whatever autocast says (docs/deviations.md): under
    bf16 autocast the layer gives exactly its fp32 result."""
    use_path("kernel", monkeypatch)
    torch.manual_seed(2)
    layer = RoutedCapsules(64, 10, 8, 16, 3, init_std=0.1)
    u = squash(torch.randn(8, 64, 8))
    v32, _ = layer(u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v16, _ = layer(u)
    assert v16.dtype == torch.float32
    assert torch.equal(v16, v32)


def test_kernel_forms_no_prediction_tensor_and_memory_is_linear_in_batch(monkeypatch):
    """The kernel keeps each example's predictions in its own scratch: no torch tensor as large
    as u_hat (B x I x J x D) is formed, and the largest one (the couplings, R x B x J x I) grows
    linearly with the batch."""
    use_path("kernel", monkeypatch)
    largest = {}
    for batch in (16, 32):
        torch.manual_seed(0)
        layer = RoutedCapsules(32, 5, 3, 6, 3)
        u = squash(torch.randn(batch, 32, 3)).requires_grad_(True)
        with _LargestTensor() as mode:
            v, _ = layer(u)
            v.sum().backward()
        largest[batch] = mode.largest
        assert mode.largest < batch * 32 * 5 * 6, batch
    assert largest[32] == 2 * largest[16] == 2 * 3 * 16 * 5 * 32


def _python(code: str, env_extra: dict, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAPSCTL_CACHE": str(tmp_path / "cache"), **env_extra}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300)


_PROBE = """
    import sys, warnings, torch
    from capsctl.models import routing_kernel
    from capsctl.models.routing.dynamic import RoutedCapsules
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        layer = RoutedCapsules(20, 3, 4, 5, 3)
        u = torch.randn(2, 20, 4, requires_grad=True)
        v, _ = layer(u)
        v.sum().backward()
        layer(u)
    print(routing_kernel.status())
    print(sum("routing kernel unavailable" in str(w.message) for w in caught))
    print(f"{float(v.abs().sum()):.6f} {float(u.grad.abs().sum()):.6f}")
    print("torch._dynamo" in sys.modules)
"""


def test_without_a_compiler_the_layer_warns_once_and_uses_the_torch_path(tmp_path):
    """CC names no compiler: one warning saying why, the torch path, the same numbers as the
    kernel gives. Neither path imports torch._dynamo (about 150 MB; the operator is registered
    with torch.library.define/impl: a custom_op's eager call would import it)."""
    fallback = _python(_PROBE, {"CC": str(tmp_path / "no-such-cc")}, tmp_path)
    assert fallback.returncode == 0, fallback.stderr
    status, warned, numbers, dynamo = fallback.stdout.split("\n")[:4]
    assert status.startswith("torch (no C compiler") and warned == "1" and dynamo == "False"
    built = _python(_PROBE, {}, tmp_path)
    assert built.returncode == 0, built.stderr
    k_status, k_warned, k_numbers, k_dynamo = built.stdout.split("\n")[:4]
    assert k_status == "C kernel" and k_warned == "0" and k_dynamo == "False"
    for a, b in zip(numbers.split(), k_numbers.split()):
        assert abs(float(a) - float(b)) <= 1e-5 * abs(float(b))


def test_the_switch_turns_the_kernel_off_without_a_warning(tmp_path):
    out = _python(_PROBE, {routing_kernel.ENV_SWITCH: "0"}, tmp_path)
    assert out.returncode == 0, out.stderr
    status, warned = out.stdout.split("\n")[:2]
    assert status == f"torch ({routing_kernel.ENV_SWITCH}=0)" and warned == "0"
    assert not (tmp_path / "cache").exists()  # nothing was compiled


def test_the_compiled_kernel_is_cached_and_reused(tmp_path):
    """The first process compiles into the cache folder; the next one loads that file."""
    first = _python(_PROBE, {}, tmp_path)
    assert first.returncode == 0, first.stderr
    built = sorted((tmp_path / "cache" / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("routing_kernel-")
    stamp = built[0].stat().st_mtime_ns
    second = _python(_PROBE, {}, tmp_path)
    assert second.returncode == 0, second.stderr
    assert sorted((tmp_path / "cache" / "kernels").iterdir()) == built
    assert built[0].stat().st_mtime_ns == stamp
    assert second.stdout == first.stdout


def test_kernel_takes_a_non_contiguous_input(monkeypatch):
    """u given as a transposed view: the same result as the contiguous tensor."""
    use_path("kernel", monkeypatch)
    torch.manual_seed(4)
    layer = RoutedCapsules(24, 3, 4, 5, 3)
    u = squash(torch.randn(6, 24, 4))
    u_view = u.transpose(0, 1).contiguous().transpose(0, 1)
    assert not u_view.is_contiguous()
    torch.testing.assert_close(layer(u_view)[0], layer(u)[0], atol=0, rtol=0)


def test_the_build_without_openmp_gives_the_same_result(monkeypatch, tmp_path):
    """Compilers without OpenMP build the kernel without it (one thread): the same numbers as
    the OpenMP build."""
    assert routing_kernel.load() is not None, routing_kernel.status()
    monkeypatch.setenv("CAPSCTL_CACHE", str(tmp_path))
    path = routing_kernel._build(os.environ.get("CC") or "cc", routing_kernel.FLAGS)
    assert "-fopenmp" not in routing_kernel.FLAGS and path.parent == tmp_path / "kernels"
    args = _inputs(9, 40, 3, 4, 5, seed=5)
    with_omp = _run_layer(*args[:3], 3, args[3], "kernel", monkeypatch)
    monkeypatch.setitem(routing_kernel._state, "lib", routing_kernel._bind(path))
    without = _run_layer(*args[:3], 3, args[3], "kernel", monkeypatch)
    for a, b in zip(without, with_omp):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_the_operator_passes_opcheck():
    """Schema, autograd registration, fake tensors (the shape functions) and AOT dispatch with
    dynamic shapes, forward (with and without bias) and backward, at small sizes (3 tiles of
    children)."""
    assert routing_kernel.load() is not None, routing_kernel.status()
    torch.manual_seed(6)
    u_BVPL = squash(torch.randn(2, 3, 4, routing_kernel.VL), dim=2)
    W_VKPL = torch.randn(3, 6, 4, routing_kernel.VL) * 0.1
    bias_K = torch.randn(6) * 0.1
    forward = torch.ops.capsctl.routed_layer.default
    for bias, R in ((bias_K, 3), (None, 1)):
        args = (u_BVPL.clone().requires_grad_(True), W_VKPL.clone().requires_grad_(True),
                None if bias is None else bias.clone().requires_grad_(True), 2, R)
        torch.library.opcheck(forward, args)
    v, c, s = forward(u_BVPL, W_VKPL, bias_K, 2, 3)
    torch.library.opcheck(torch.ops.capsctl.routed_layer_backward.default,
                          (u_BVPL, W_VKPL, c, s, torch.randn_like(v)))


@pytest.mark.parametrize("fullgraph", [True, False])
def test_torch_compile_of_the_kernel_layer_equals_eager(monkeypatch, fullgraph):
    """torch.compile (inductor) of the layer, the kernel one opaque op in its graph (fullgraph:
    no graph break): the same values, couplings and gradients as eager (the bias gradient, a
    sum the compiled graph may order differently, to 1e-6)."""
    use_path("kernel", monkeypatch)
    torch.manual_seed(7)
    layer = RoutedCapsules(40, 3, 4, 5, 3, init_std=0.1, bias=True)
    u = squash(torch.randn(6, 40, 4))

    def run(fn):
        u_ = u.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        v, cs = fn(u_, True)
        (v * torch.linspace(-1, 1, 5)).sum().backward()
        return [v.detach(), *cs, u_.grad, layer.W_IJDP.grad, layer.bias_JD.grad]

    eager = run(layer)
    compiled = run(torch.compile(layer, fullgraph=fullgraph))
    for a, b in zip(compiled[:-1], eager[:-1]):
        assert torch.equal(a, b)
    torch.testing.assert_close(compiled[-1], eager[-1], atol=1e-6, rtol=1e-6)
