"""Quantized-weight matmul on CPU: a native XLA FFI kernel (cpu_qmatmul.cc) beside its jnp reference; and
`f32matmul`, the same kernel's float32-weight sibling for steps of a few tokens.

XLA:CPU has no fast path for quantized weights: it runs int8 dots as int32 loops and dequantizes
elementwise far slower than it streams f32 weights, so any jnp formulation of a 4/8-bit matmul is several
times slower than the f32 dot. Decode is bound by weight bytes, so a kernel that reads 4 or 8 bits per
weight and unpacks in registers beats f32.

Glossary:
  T  tokens (rows of x), I input features, O output features (rows of W)
  g  group size: consecutive inputs of one row sharing a scale and a min; G = I // g groups per row

Op: y[T, O] = x[T, I] @ W^T with W[o, i] = scales[o, i // g] * q[o, i] + mins[o, i // g].
  x       [..., I] float32 (leading dims are flattened into T)
  q       bits=4: uint8 [O, I // 2], element i in byte i // 2, LOW nibble = even i, HIGH nibble = odd i
                  (values 0..15; `pack_int4` builds it);
          bits=8: int8 [O, I], values -128..127 (also holds 5/6-bit values, one per byte)
  scales  [O, G] float32
  mins    [O, G] float32, or None for none (the kernel then skips that term)
  y       [..., O] float32
g may be anything dividing I (bits=4: I even); the fast AVX2 path needs g % 16 == 0 (16, 32, ..., 256,
or per-channel g == I with I % 16 == 0), other g run portable loops.

f32matmul: y[T, O] = x[T, I] @ W, W float32 [I, O] (input-major, as the model stores its weights) or [O, I]
(`out_major`, a tied embedding as the LM head). XLA:CPU's float32 dot packs W for a few rows (a 4-token
step ~2x a 1-token one); the kernel uses each loaded weight vector for up to 4 tokens and takes further
token blocks while the rows are in cache, so a step of a few tokens reads W from memory once.

The kernel is compiled on first use with the system C++ compiler into
`$JAXINFER_CACHE_DIR/kernels` (default ~/.cache/jaxinfer/kernels), keyed by a hash of the source, the
flags and the jaxlib version; `available()` says whether that worked (and never raises).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name("cpu_qmatmul.cc")
_TARGET = "jaxinfer_cpu_qmatmul"
_SYMBOL = "JaxinferCpuQMatmul"
_F32_TARGET, _F32_SYMBOL = "jaxinfer_cpu_f32matmul", "JaxinferCpuF32Matmul"
_POOLS = {"xla": 0, "none": 1}  # threading: XLA's intra-op pool, or the calling thread alone

build_error: str = ""  # why `available()` is False, for a log line


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compile_flags() -> list[str]:
    """-O3, plus AVX2/FMA/F16C only when this CPU has them (not -march=native: the cache may be shared
    between machines, and the hash below includes these flags)."""
    flags = ["-std=c++17", "-O3", "-shared", "-fPIC", "-w"]
    if {"avx2", "fma", "f16c"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def _cache_dir() -> Path:
    root = os.environ.get("JAXINFER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxinfer")
    return Path(root) / "kernels"


def _build(cxx: str) -> Path:
    """Compile the .so unless the cache holds it. Atomic: compile to a temp file in the same folder, then
    rename, so two processes building at once both end with a complete file."""
    import jaxlib

    flags = _compile_flags()
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), jaxlib.__version__.encode(),
                                     os.path.realpath(cxx).encode()])).hexdigest()[:16]
    out_dir = _cache_dir()
    out = out_dir / f"cpu_qmatmul-{key}.so"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem, suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    try:
        cmd = [cxx, *flags, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def available() -> bool:
    """True once the kernel is compiled, loaded and registered with XLA (first call builds; cached)."""
    global build_error
    try:
        cxx = _compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler found ($CXX, g++, c++, clang++)")
        lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
        for target, symbol in ((_TARGET, _SYMBOL), (_F32_TARGET, _F32_SYMBOL)):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        return True
    except Exception as e:  # noqa: BLE001 - any failure means "use another path", with the reason kept
        build_error = f"cpu_qmatmul unavailable: {type(e).__name__}: {e}"
        return False


def _check(x, q, scales, mins, bits, group_size):
    """Shape and dtype checks, so a mistake is a ValueError here rather than an XLA runtime error."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if x.ndim < 1 or q.ndim != 2 or scales.ndim != 2:
        raise ValueError(f"want x [..., I], q [O, I/2 or I], scales [O, G]; got {x.shape}, {q.shape}, "
                         f"{scales.shape}")
    I, O = x.shape[-1], q.shape[0]
    want_q = (np.uint8, I // 2) if bits == 4 else (np.int8, I)
    if group_size <= 0 or I % group_size:
        raise ValueError(f"group_size {group_size} must divide I = {I}")
    if bits == 4 and I % 2:
        raise ValueError(f"bits=4 needs an even I, got {I}")
    if q.dtype != want_q[0] or q.shape[1] != want_q[1]:
        raise ValueError(f"bits={bits}: q must be {np.dtype(want_q[0]).name} [O, {want_q[1]}] for I = {I}, "
                         f"got {q.dtype} {q.shape}")
    G = I // group_size
    for name, a in (("scales", scales), ("mins", mins)):
        if a is not None and (a.shape != (O, G) or a.dtype != np.float32):
            raise ValueError(f"{name} must be float32 [O, G] = [{O}, {G}], got {a.dtype} {a.shape}")


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "pool", "portable"))
def qmatmul(x, q, scales, mins=None, *, bits: int, group_size: int, pool: str = "xla",
            portable: bool = False):
    """y = x @ W^T for quantized W, with the native CPU kernel (see the module docstring for the format).

    x [..., I] (cast to float32), q [O, I // 2] uint8 (bits=4) or [O, I] int8 (bits=8),
    scales [O, I // group_size] float32, mins [O, I // group_size] float32 or None -> y [..., O] float32.
    `pool`: "xla" splits rows over XLA's intra-op thread pool (the calling thread works too), "none" runs
    on the calling thread only (measured faster on this 2-core box while other processes load it; see
    benchmarks/cpu_qmatmul.py). `portable` forces the non-AVX2 loops (for tests).
    Raises ValueError on inconsistent shapes; call `available()` first (else RuntimeError).
    """
    _check(x, q, scales, mins, bits, group_size)
    if not available():
        raise RuntimeError(build_error)
    lead, I, O = x.shape[:-1], x.shape[-1], q.shape[0]
    x2 = x.reshape(-1, I).astype(jnp.float32)  # [T, I]
    has_mins = mins is not None
    mins_arg = mins if has_mins else jnp.zeros((0, 0), jnp.float32)
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x2.shape[0], O), jnp.float32),
                            vmap_method="sequential")
    y = call(x2, q, scales, mins_arg, bits=np.int64(bits), group_size=np.int64(group_size),
             has_mins=has_mins, pool=np.int64(_POOLS[pool]), portable=portable)  # [T, O]
    return y.reshape(*lead, O)


def dequantize_reference(q, scales, mins=None, *, bits: int, group_size: int):
    """W [O, I] float32 from the packed form (plain jnp)."""
    if bits == 4:
        q = jnp.stack([q & 15, q >> 4], axis=-1).reshape(q.shape[0], -1)  # [O, I]: low nibble first
    O, I = q.shape
    w = q.astype(jnp.float32).reshape(O, I // group_size, group_size) * scales[..., None]  # [O, G, g]
    if mins is not None:
        w = w + mins[..., None]
    return w.reshape(O, I)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def qmatmul_reference(x, q, scales, mins=None, *, bits: int, group_size: int):
    """The oracle for `qmatmul`: dequantize W to float32 and take one f32 matmul (same shapes)."""
    _check(x, q, scales, mins, bits, group_size)
    w = dequantize_reference(q, scales, mins, bits=bits, group_size=group_size)  # [O, I]
    return jnp.einsum("...i,oi->...o", x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)


def _check_f32(x, w, out_major):
    if x.ndim < 1 or w.ndim != 2 or w.dtype != np.float32:
        raise ValueError(f"want x [..., I] and float32 w [I, O] or [O, I]; got {x.shape}, {w.dtype} {w.shape}")
    I = w.shape[1] if out_major else w.shape[0]
    if x.shape[-1] != I:
        raise ValueError(f"x [..., {x.shape[-1]}] does not match w {w.shape} ({'[O, I]' if out_major else '[I, O]'})")


@functools.partial(jax.jit, static_argnames=("out_major", "pool", "portable"))
def f32matmul(x, w, *, out_major: bool = False, pool: str = "xla", portable: bool = False):
    """y = x @ W for float32 W with the native CPU kernel, for steps of a few tokens.

    x [..., I] (cast to float32), w [I, O] float32, or [O, I] with `out_major` -> y [..., O] float32.
    `pool` and `portable` as in `qmatmul`. Raises ValueError on inconsistent shapes; call `available()` first.
    """
    _check_f32(x, w, out_major)
    if not available():
        raise RuntimeError(build_error)
    lead, I = x.shape[:-1], x.shape[-1]
    O = w.shape[0] if out_major else w.shape[1]
    x2 = x.reshape(-1, I).astype(jnp.float32)  # [T, I]
    call = jax.ffi.ffi_call(_F32_TARGET, jax.ShapeDtypeStruct((x2.shape[0], O), jnp.float32),
                            vmap_method="sequential")
    y = call(x2, w, out_major=out_major, pool=np.int64(_POOLS[pool]), portable=portable)  # [T, O]
    return y.reshape(*lead, O)


@functools.partial(jax.jit, static_argnames=("out_major",))
def f32matmul_reference(x, w, *, out_major: bool = False):
    """The oracle for `f32matmul`: one jnp matmul at full float32 precision (same shapes)."""
    _check_f32(x, w, out_major)
    eq = "...i,oi->...o" if out_major else "...i,io->...o"
    return jnp.einsum(eq, x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)


def pack_int4(q) -> np.ndarray:
    """uint8 values 0..15 [O, I] (I even) -> [O, I // 2], element 2k in the low nibble of byte k."""
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] % 2 or q.min(initial=0) < 0 or q.max(initial=0) > 15:
        raise ValueError(f"pack_int4 wants values 0..15 of shape [O, even I], got {q.dtype} {q.shape}")
    q = q.astype(np.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)
