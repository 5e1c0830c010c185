"""oneDNN's matmul as a JAX FFI call: the dense layers of the encoders at inference, on CPU.

jaxlib 0.10.2 runs a bf16 x bf16 -> f32 dot as a YNNPACK fusion, well under oneDNN's AMX kernels
that PyTorch uses (README, "bench.encoders"); no XLA flag changes that. `matmul.cc` (next to this
file) is an XLA FFI handler that runs a 2-D oneDNN matmul. It is compiled on first use with the
C++ compiler (`$CXX`, else g++) against the oneDNN headers and libdnnl of the `onednn` extra
(`pip install "koclip-index[onednn]"`: PyPI's onednn-cpu-gomp + onednn-devel-cpu-gomp, oneDNN 3.2
on GNU OpenMP), into `$KOCLIP_CACHE/onednn/` (default ~/.cache/koclip/onednn/), keyed by the
source, jaxlib and oneDNN. `KOCLIP_ONEDNN_ROOT` points at another oneDNN install (a folder with
include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so).

Which matmul runs is chosen by `KOCLIP_MATMUL` (read when a function is traced):
- `auto` (default): oneDNN for the compute dtypes in AUTO_DTYPES when the library builds and
  loads, JAX runs on one CPU device, and the CPU has AVX-512 (where it was measured:
  bench/results/encoders-xeon-amx-onednn.json); otherwise XLA's dot.
- `onednn`: oneDNN, or an error saying why it cannot run.
- `xla`: XLA's dot always.
Only KoCLIP's encode functions (inference) ask for it; training (`contrastive_logits`) keeps
XLA's dot. A missing library or compiler never breaks an import: `status()` says which path runs
and why.
"""
from __future__ import annotations

import contextlib
import functools
import contextvars
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("matmul.cc")
TARGET = "koclip_onednn_matmul"
TARGET_BIAS = "koclip_onednn_matmul_bias"
BACKENDS = ("auto", "onednn", "xla")
SUPPORTED = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16))
# The compute dtypes `auto` runs through oneDNN: where bench.encoders measured it faster than XLA's
# dot on this project's AVX-512 Xeon (bench/results/encoders-xeon-amx-onednn.json).
AUTO_DTYPES = ("bfloat16",)

_lock = threading.Lock()
_state: dict = {}  # filled once by load(): available, reason, library, onednn_version, root
_inference = contextvars.ContextVar("koclip_onednn_inference", default=None)


def cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("KOCLIP_CACHE") or os.path.join("~", ".cache", "koclip"))) / "onednn"


def find_root() -> Path | None:
    """The oneDNN install to build against: $KOCLIP_ONEDNN_ROOT, else this Python's prefix (where
    the onednn wheels put include/ and lib/)."""
    env = os.environ.get("KOCLIP_ONEDNN_ROOT")
    candidates = [Path(env)] if env else [Path(sys.prefix), Path(sys.base_prefix)]
    for root in candidates:
        if (root / "include" / "oneapi" / "dnnl" / "dnnl.hpp").is_file() and (root / "lib" / "libdnnl.so").exists():
            return root
    return None


def _build(root: Path, compiler: str) -> Path:
    include = jax.ffi.include_dir()
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jax.__version__.encode(), str(root).encode(), include.encode(),
                 str((root / "lib" / "libdnnl.so").resolve()).encode(), compiler.encode()):
        key.update(part)
    out = cache_dir() / f"koclip_onednn_{key.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}", f"-I{root / 'include'}",
           str(SOURCE), f"-L{root / 'lib'}", "-ldnnl", "-lgomp", f"-Wl,-rpath,{root / 'lib'}", "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-800:]}")
    os.replace(tmp, out)  # atomic: another process building the same key gets a whole file
    return out


def load() -> dict:
    """Build (once per source/jaxlib/oneDNN) and register the FFI targets; never raises.

    Returns the status: {"available": bool, "reason": str, ...}."""
    with _lock:
        if _state:
            return dict(_state)
        root = find_root()
        compiler = os.environ.get("CXX") or shutil.which("g++")
        if root is None:
            _state.update(available=False, reason="oneDNN not installed (pip install 'koclip-index[onednn]', "
                                                  "or set KOCLIP_ONEDNN_ROOT)")
        elif not compiler:
            _state.update(available=False, reason="no C++ compiler (g++ or $CXX) to build the oneDNN matmul")
        else:
            try:
                library = _build(root, compiler)
                lib = ctypes.cdll.LoadLibrary(str(library))
                lib.koclip_onednn_version.restype = ctypes.c_char_p
                jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.KoclipOnednnMatmul), platform="cpu")
                jax.ffi.register_ffi_target(TARGET_BIAS, jax.ffi.pycapsule(lib.KoclipOnednnMatmulBias), platform="cpu")
                _state.update(available=True, reason="built and loaded", library=str(library), root=str(root),
                              onednn_version=lib.koclip_onednn_version().decode())
            except Exception as e:  # a failed build or load falls back to XLA's dot
                _state.update(available=False, reason=f"oneDNN matmul unusable: {type(e).__name__}: {e}")
        return dict(_state)


def setting(value: str | None = None) -> str:
    """`value`, else $KOCLIP_MATMUL, else "auto"; checked against BACKENDS."""
    value = (value or os.environ.get("KOCLIP_MATMUL") or "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"matmul setting {value!r} (KOCLIP_MATMUL or KoCLIP(matmul=...)); expected one of "
                         f"{', '.join(BACKENDS)}")
    return value


@functools.lru_cache(maxsize=None)
def cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def status(value: str | None = None) -> dict:
    """Which matmul the encoders' dense layers use at inference under the setting `value` (default:
    $KOCLIP_MATMUL, else auto), and why: {"matmul": "onednn" or "xla", "reason", "setting", and the
    library's details when it loaded}. Raises when "onednn" is asked for and cannot run."""
    setting_ = setting(value)
    if setting_ == "xla":
        return {"matmul": "xla", "setting": setting_, "reason": "matmul setting xla"}
    info = load()
    info = {k: v for k, v in info.items() if k != "available"}
    if not _state.get("available"):
        if setting_ == "onednn":
            raise RuntimeError(f"matmul setting onednn, but {info['reason']}")
        return {**info, "matmul": "xla", "setting": setting_}
    if jax.default_backend() != "cpu" or jax.local_device_count() != 1:
        why = f"JAX runs on {jax.local_device_count()} {jax.default_backend()} device(s); the oneDNN call is for one CPU device"
        if setting_ == "onednn":
            raise RuntimeError(f"matmul setting onednn, but {why}")
        return {**info, "matmul": "xla", "setting": setting_, "reason": why}
    if setting_ == "auto" and not cpu_has_avx512():
        return {**info, "matmul": "xla", "setting": setting_,
                "reason": "auto: no AVX-512 on this CPU, where XLA's dot was as fast as PyTorch's"}
    return {**info, "matmul": "onednn", "setting": setting_}


@contextlib.contextmanager
def inference(value: str | None = None):
    """Dense layers traced inside use oneDNN when status(value) says so (KoCLIP's encode functions)."""
    token = _inference.set(setting(value))
    try:
        yield
    finally:
        _inference.reset(token)


def active(dtype=None) -> bool:
    """True while tracing inside inference() with a setting that resolves to oneDNN for a dense
    layer of this compute dtype (auto: only the dtypes in AUTO_DTYPES)."""
    value = _inference.get()
    if value is None or status(value)["matmul"] != "onednn":
        return False
    return value == "onednn" or dtype is None or np.dtype(dtype).name in AUTO_DTYPES


def parts() -> int:
    """Row blocks per call: 0 = one oneDNN call on its own OpenMP threads; P > 0 = P single-threaded
    oneDNN calls on XLA's intra-op pool and the calling thread ($KOCLIP_ONEDNN_PARTS, read at trace).
    Default: one block per core of this process's CPU affinity (XLA's pool is as large), which
    bench.encoders measured faster than 0 in bfloat16 (bench/results/encoders-xeon-amx-onednn.json)."""
    value = os.environ.get("KOCLIP_ONEDNN_PARTS")
    if value:
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Activations oneDNN applies as a post-op of the bias handler: name -> (code in matmul.cc, alpha).
POST_OPS = {"gelu": (1, 0.0), "gelu_new": (2, 0.0), "gelu_pytorch_tanh": (2, 0.0), "quick_gelu": (3, 1.702),
            "relu": (4, 0.0), "tanh": (5, 0.0)}


def _call(x2, w, bias, out_dtype, act: str | None = None):
    info = load()  # registers the FFI targets on first use
    if not info["available"]:
        raise RuntimeError(info["reason"])
    out = jax.ShapeDtypeStruct((x2.shape[0], w.shape[1]), out_dtype)
    if bias is None:
        return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x2, w, parts=np.int64(parts()))
    code, alpha = POST_OPS[act] if act else (0, 0.0)
    return jax.ffi.ffi_call(TARGET_BIAS, out, vmap_method="sequential")(
        x2, w, bias, parts=np.int64(parts()), activation=np.int64(code), alpha=np.float32(alpha))


@jax.custom_vjp
def _matmul_2d(x2, w):
    return _call(x2, w, None, x2.dtype)


def _fwd(x2, w):
    return _matmul_2d(x2, w), (x2, w)


def _bwd(res, g):  # gradients through XLA's dots, so a differentiated encoder still works
    x2, w = res
    dx = jax.lax.dot(g, w.T, preferred_element_type=jnp.float32).astype(x2.dtype)
    dw = jax.lax.dot(x2.T, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_matmul_2d.defvjp(_fwd, _bwd)


def matmul(x, w):
    """x [..., K] @ w [K, N] -> [..., N] in x's dtype (float32 or bfloat16; float32 accumulation)
    through oneDNN; RuntimeError when it cannot be built (see status())."""
    if x.dtype != w.dtype or np.dtype(x.dtype) not in SUPPORTED or w.ndim != 2:
        raise TypeError(f"oneDNN matmul takes float32 or bfloat16 [..., K] x [K, N] of one dtype, "
                        f"got {x.dtype}{list(x.shape)} x {w.dtype}{list(w.shape)}")
    lead = x.shape[:-1]
    y = _matmul_2d(x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*lead, w.shape[1])


def matmul_bias(x, w, b, out_dtype=None, act: str | None = None):
    """act(x [M, K] @ w [K, N] + b [N]) -> [M, N] (out_dtype, default x's): bias and activation (a
    name in POST_OPS) applied in float32 inside oneDNN. No gradient: for tests."""
    return _call(x, w, b, out_dtype or x.dtype, act)


def _dense_act_reference(x, w, b, fn):
    """fn(x @ w + b) through XLA, float32 accumulation, one rounding: what the fused call computes."""
    y = jnp.matmul(x, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)
    return fn(y).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dense_act_2d(x2, w, b, act, fn):
    return _call(x2, w, b, x2.dtype, act)


def _dense_act_fwd(x2, w, b, act, fn):
    return _dense_act_2d(x2, w, b, act, fn), (x2, w, b)


def _dense_act_bwd(act, fn, res, g):  # through XLA: recompute the layer and differentiate that
    _, vjp = jax.vjp(lambda *a: _dense_act_reference(*a, fn), *res)
    return vjp(g)


_dense_act_2d.defvjp(_dense_act_fwd, _dense_act_bwd)


def dense_activation(x, w, b, act: str, fn):
    """act(x [..., K] @ w [K, N] + b [N]) in x's dtype, one oneDNN call (float32 accumulation, bias
    and activation on the accumulator, one rounding). `act` names the post-op (POST_OPS), `fn` is
    the same activation in JAX (koclip.modeling.layers.activation(act)) for the gradient."""
    if x.dtype != w.dtype or x.dtype != b.dtype or np.dtype(x.dtype) not in SUPPORTED or w.ndim != 2:
        raise TypeError(f"oneDNN dense takes float32 or bfloat16 x, w, b of one dtype, got {x.dtype}, {w.dtype}, {b.dtype}")
    lead = x.shape[:-1]
    y = _dense_act_2d(x.reshape(-1, x.shape[-1]), w, b, act, fn)
    return y.reshape(*lead, w.shape[1])
