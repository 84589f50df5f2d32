"""The CPU capsule-layer kernel (``routing_kernel.c``): compiled on first use, loaded with ctypes,
registered as the torch operator ``torch.ops.capsctl.routed_layer`` (autograd, fake tensors).

On a CPU, the routed capsule layer (predictions u_hat = W u and routing by agreement, forward
and backward) runs in this C kernel: per example, its predictions stay in the core's L2 cache
across all routing passes and every pass walks them once (agreement, softmax and weighted sum
fused), none of which torch's batched products can do. See docs/performance.md.

The source is compiled once per machine with the system's C compiler (``$CC``, else ``cc``;
``-O3 -march=native``, with OpenMP when the compiler has it: the kernel then runs on torch's own
OpenMP threads, ``torch.get_num_threads()`` of them) into a cache folder (``$CAPSCTL_CACHE``,
else ``$XDG_CACHE_HOME/capsctl`` or ``~/.cache/capsctl``, then the temp folder; the file name is
a hash of the source, the flags, the compiler and the CPU's feature flags; written atomically).
Where that fails (no compiler, not Linux or macOS, nowhere to write), or with
``CAPSCTL_ROUTING_KERNEL=0``, ``load()`` returns None and the layer uses its torch path, with
one warning that says why. Both paths compute the same function; the tests hold them to each
other and to a plain loop reference.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from capsctl.paths import cache_root

SOURCE = Path(__file__).with_name("routing_kernel.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-std=c11", "-fPIC",
         "-shared"]
# OpenMP: the kernel then shares torch's thread pool (same runtime); without it, one thread
OPENMP = ["-fopenmp"]
ENV_SWITCH = "CAPSCTL_ROUTING_KERNEL"  # "0": always the torch path
VL = 16    # floats per vector in the kernel: the children axis is padded to a multiple
MAX_R = 64  # routing passes the kernel takes

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None, "why": the reason when None


@contextlib.contextmanager
def switched(on: bool):
    """The kernel switched on or off (``ENV_SWITCH``) for the block, then as it was: for FLOP
    counting (the counter cannot see inside the kernel) and the latency table."""
    old = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_SWITCH, None)
        else:
            os.environ[ENV_SWITCH] = old


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    return cache_root() / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compile(cc: str) -> Path:
    """Build (or find) the library: with OpenMP where the compiler has it, else without."""
    errors = []
    for flags in (FLAGS + OPENMP, FLAGS):
        try:
            return _build(cc, flags)
        except RuntimeError as e:
            errors.append(str(e))
    raise RuntimeError(errors[-1])


def _build(cc: str, flags: list[str]) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=60).stdout.splitlines()[:1]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), cc, *version,
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"capsctl-kernels-{os.getuid()}"):
        target = folder / f"routing_kernel-{key}{suffix}"
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=suffix)
            os.close(fd)
        except OSError:
            continue
        try:
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {(done.stderr or done.stdout).strip()[:300]}")
            os.replace(tmp, target)  # atomic: another process may be compiling the same file
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("no writable folder for the compiled kernel")


def _bind(path: Path):
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.capsctl_layer_forward.argtypes = [p, p, i, i, i, i, i, i, p, i, p, p, p]
    lib.capsctl_layer_backward.argtypes = [p, p, i, i, i, i, i, i, i, p, p, p, p, p, p]
    lib.capsctl_layer_forward.restype = lib.capsctl_layer_backward.restype = i
    return lib


def load():
    """The loaded kernel library, or None: switched off, or it could not be built (then the
    torch path is used, with one warning that says why; the outcome is kept for the process).
    Once the outcome is kept, a lock-free dict read (which torch.compile traces without a
    graph break)."""
    if not enabled():
        return None
    if "lib" not in _state:
        _load_once()
    return _state["lib"]


def _load_once() -> None:
    """Build and bind the library, or find out why not; sets _state["why"], then ["lib"]."""
    with _lock:
        if "lib" in _state:
            return
        lib, why = None, None
        cc = os.environ.get("CC") or "cc"
        if os.name != "posix":
            why = "only built on Linux and macOS"
        elif shutil.which(cc) is None:
            why = f"no C compiler ({cc}) found"
        else:
            try:
                lib = _bind(_compile(cc))
            except Exception as e:  # any failure: fall back to the torch path
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        if lib is None:
            warnings.warn(f"capsctl: CPU routing kernel unavailable ({why}); "
                          "using the slower torch routing", RuntimeWarning, stacklevel=3)
        _state["why"] = why
        _state["lib"] = lib  # last: a reader without the lock sees "lib" only when complete


def status() -> str:
    """Which capsule layer a CPU runs, for reports: 'C kernel' or 'torch (why)'."""
    if not enabled():
        return f"torch ({ENV_SWITCH}=0)"
    return "C kernel" if load() is not None else f"torch ({_state['why']})"


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("capsule layer kernel: out of memory for its scratch buffers")


def _threads(B: int) -> int:
    return max(1, min(torch.get_num_threads(), B))


def _library():
    """The loaded library; RuntimeError when the kernel is switched off or could not be built
    (the layer checks ``load()`` first: this is for direct calls of the operators)."""
    lib = load()
    if lib is None:
        raise RuntimeError(f"the CPU capsule-layer kernel is not available: {status()}")
    return lib


# The kernel as two torch operators, capsctl::routed_layer and its backward, so that autograd,
# fake tensors and torch.compile see one opaque op per direction (compile traces around it; the
# layout copies before it are plain torch ops). Defined with torch.library.define and
# torch.library.impl rather than torch.library.custom_op: a custom_op's kernel is wrapped in
# torch._disable_dynamo, whose first eager call imports torch._dynamo (about 150 MB of resident
# memory, 1.5 s), which the trainer otherwise never loads (see capsctl/optim.py).
torch.library.define(
    "capsctl::routed_layer",
    "(Tensor u_BVPL, Tensor W_VKPL, Tensor? bias_K, int J, int iterations)"
    " -> (Tensor v_BJD, Tensor c_RBJI, Tensor s_RBJD)")
torch.library.define(
    "capsctl::routed_layer_backward",
    "(Tensor u_BVPL, Tensor W_VKPL, Tensor c_RBJI, Tensor s_RBJD, Tensor g_v_BJD)"
    " -> (Tensor g_u_BVPL, Tensor g_W_VKPL, Tensor g_s_RBJD)")


@torch.library.impl("capsctl::routed_layer", "cpu")
def _forward(u_BVPL: torch.Tensor, W_VKPL: torch.Tensor, bias_K: torch.Tensor | None, J: int,
             iterations: int):
    """v (B, J, D), couplings c (R, B, J, I) and pre-squash sums s (R, B, J, D) of the layer,
    from u and W in the tiled layouts (contiguous fp32; I = V * VL children, K = J * D)."""
    lib = _library()
    B, V, P, _ = u_BVPL.shape
    I, D = V * VL, W_VKPL.shape[1] // J
    v = u_BVPL.new_empty(B, J, D)
    c = u_BVPL.new_empty(iterations, B, J, I)
    s = u_BVPL.new_empty(iterations, B, J, D)
    _check(lib.capsctl_layer_forward(_ptr(u_BVPL), _ptr(W_VKPL), B, I, J, D, P, iterations,
                                     _ptr(bias_K), _threads(B), _ptr(v), _ptr(c), _ptr(s)))
    return v, c, s


@torch.library.register_fake("capsctl::routed_layer")
def _forward_shapes(u_BVPL, W_VKPL, bias_K, J, iterations):
    B, V, _, L = u_BVPL.shape
    D = W_VKPL.shape[1] // J
    return (u_BVPL.new_empty(B, J, D), u_BVPL.new_empty(iterations, B, J, V * L),
            u_BVPL.new_empty(iterations, B, J, D))


@torch.library.impl("capsctl::routed_layer_backward", "cpu")
def _backward(u_BVPL: torch.Tensor, W_VKPL: torch.Tensor, c_RBJI: torch.Tensor,
              s_RBJD: torch.Tensor, g_v_BJD: torch.Tensor):
    """(dL/du (B, V, P, VL), dL/dW (V, K, P, VL), dL/ds (R, B, J, D)) from dL/dv: the gradients
    in the same tiled layouts as u and W."""
    lib = _library()
    B, V, P, _ = u_BVPL.shape
    R, _, J, _ = c_RBJI.shape
    K = W_VKPL.shape[1]
    n = _threads(B)
    g_u = torch.empty_like(u_BVPL)
    g_Ws = W_VKPL.new_zeros(n, *W_VKPL.shape)  # one per thread, summed below
    g_s = s_RBJD.new_empty(s_RBJD.shape)
    g_v = g_v_BJD.contiguous()
    _check(lib.capsctl_layer_backward(_ptr(u_BVPL), _ptr(W_VKPL), B, V * VL, J, K // J, P, R, n,
                                      _ptr(c_RBJI), _ptr(s_RBJD), _ptr(g_v), _ptr(g_u),
                                      _ptr(g_Ws), _ptr(g_s)))
    return g_u, (g_Ws[0] if n == 1 else g_Ws.sum(0)), g_s


@torch.library.register_fake("capsctl::routed_layer_backward")
def _backward_shapes(u_BVPL, W_VKPL, c_RBJI, s_RBJD, g_v_BJD):
    return torch.empty_like(u_BVPL), torch.empty_like(W_VKPL), torch.empty_like(s_RBJD)


def _keep_for_backward(ctx, inputs, output) -> None:
    u_BVPL, W_VKPL, bias_K, _, _ = inputs
    _, c_RBJI, s_RBJD = output
    ctx.save_for_backward(u_BVPL, W_VKPL, c_RBJI, s_RBJD)
    ctx.with_bias = bias_K is not None
    ctx.mark_non_differentiable(c_RBJI, s_RBJD)


def _gradients(ctx, g_v_BJD, _g_c, _g_s):
    """(dL/du, dL/dW, dL/dbias or None, None, None) in the op's argument order."""
    g_u, g_W, g_s_RBJD = torch.ops.capsctl.routed_layer_backward(*ctx.saved_tensors, g_v_BJD)
    return g_u, g_W, (g_s_RBJD.sum((0, 1)).flatten() if ctx.with_bias else None), None, None


torch.library.register_autograd("capsctl::routed_layer", _gradients,
                                setup_context=_keep_for_backward)
