"""XLA's autotune results, shipped for known GPUs and copied into the compilation cache at start-up.

On a GPU, XLA's compiler picks a kernel (cuBLAS or a Triton tiling) for every matmul fusion, and for some
other fusions, by compiling and timing candidates: on a fresh machine a large part of the start-up (the
H100 preset's 14 Llama-3.1-8B programs on a fresh H100: 42.2 s of compilation, 24.5 s with the results at hand).
jax keeps XLA's choices in a per-fusion folder of the persistent compilation cache
(`xla_gpu_per_fusion_autotune_cache_dir`), which helps only the second start on a machine. So:

- `bundle()` packs that folder into one JSON file, tagged with the jaxlib and GPU that made it;
  configs/autotune/*.json ships such bundles for the presets' GPUs (benchmarks/gemm_autotune.py makes
  them, optionally with XLA's exhaustive tiling search).
- At start-up `seed()` copies the bundles made by this jaxlib for this GPU into the folder; fusions it
  covers compile without a search, the others are searched as before.

XLA keys each result by the GPU's description, the fusion's canonical HLO and its autotuner version, so a
result is only read for the very fusion it was measured on; a bundle is only seeded under the jaxlib that
made it (XLA leaves version checks of the folder to its user).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

import jax

from jaxinfer.config import CONFIGS_DIR

FOLDER = "xla_gpu_per_fusion_autotune_cache_dir"  # jax's name for it inside the compilation cache directory


def _jaxlib_version() -> str:
    import jaxlib

    return jaxlib.__version__


def cache_folder(cache_dir: str | os.PathLike) -> Path | None:
    """The per-fusion autotune folder jax gives XLA under `cache_dir`, or None when jax is told not to."""
    flags = jax.config.jax_persistent_cache_enable_xla_caches or ""
    if flags != "all" and FOLDER not in flags:
        return None
    return Path(cache_dir) / FOLDER


def bundle(cache_dir: str | os.PathLike, note: str = "") -> dict:
    """The autotune results under `cache_dir` as one JSON-able dict, tagged with this jaxlib and GPU."""
    folder = cache_folder(cache_dir)
    if folder is None or not folder.is_dir():
        raise ValueError(f"cache_dir: no XLA autotune results under {cache_dir} (start an engine with that "
                         "cache on the GPU first)")
    results = {p.relative_to(folder).as_posix(): base64.b64encode(p.read_bytes()).decode()
               for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}
    return {"jaxlib": _jaxlib_version(), "device_kind": jax.local_devices()[0].device_kind, "note": note,
            "results": results}


def seed(cache_dir: str | os.PathLike, bundles_dir: str | os.PathLike | None = None,
         device_kinds: set[str] | None = None) -> int:
    """Copy the shipped autotune results made by this jaxlib for this GPU (or for `device_kinds`) into
    `cache_dir`'s autotune folder, leaving the files already there alone; returns how many were written."""
    folder = cache_folder(cache_dir)
    if folder is None or (device_kinds is None and jax.default_backend() != "gpu"):
        return 0
    kinds = device_kinds if device_kinds is not None else {d.device_kind for d in jax.local_devices()}
    written = 0
    for path in sorted(Path(bundles_dir or CONFIGS_DIR / "autotune").glob("*.json")):
        b = json.loads(path.read_text())
        if b.get("jaxlib") != _jaxlib_version() or b.get("device_kind") not in kinds:
            continue
        for name, data in b["results"].items():
            rel = Path(name)
            if rel.is_absolute() or ".." in rel.parts:  # only ever below the folder
                continue
            dest = folder / rel
            if dest.is_file():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".seed")  # rename: readers never see half a file
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64decode(data))
            os.replace(tmp, dest)
            written += 1
    return written
