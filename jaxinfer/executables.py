"""Compiled programs kept on disk whole, so that a warm start neither traces nor lowers them.

jax's persistent compilation cache saves XLA's compile, but jax still traces each program to a jaxpr and lowers it
to StableHLO to compute the cache key: for the H100 Llama-3.1-8B preset's 61 programs, 8-12 s of serial Python, most
of a warm start. This store keys the programs of one engine instead by a fingerprint of what their lowering reads:
jaxinfer's and pallas_kernels' source files (and the shipped XLA autotune bundles, which pick their kernels), the
Python, jax and jaxlib versions, the devices, XLA's flags and jax's config, the model and engine configs, and the
shapes, dtypes and shardings of the weights and the KV cache, and the current values of the module-level settings
that choose a program's form (`PROGRAM_SETTINGS`: a benchmark that sets one gets its own programs). Each program is
one file, written with `jax.experimental.serialize_executable` (the executable and its argument trees). Any change
to those inputs gives a new fingerprint, so a stale program is never loaded, and jax checks each call's argument
tree, shapes and dtypes against the loaded program as well. A file that fails to load is dropped with a warning and
its program compiled again. On CPU only programs XLA compiled in this process are saved (XLA:CPU re-serialises one it
loaded from jax's cache without its code).

Layout: <compilation cache dir>/executables/p<process index>-<fingerprint>/<program>.jxe. The files are pickles (as
jax's format is), so the store is used only in a directory private to this user, and each file is signed with the
directory's key and checked before it is unpickled (cache_trust): a file this store did not write is never loaded.
A start that saves a new configuration
deletes all but its process's KEEP most recently used configurations' folders (each load marks its folder used);
any folder can also be deleted by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import jax
from jax.experimental import serialize_executable

from jaxinfer import cache_trust
from jaxinfer.config import CONFIGS_DIR

FOLDER = "executables"
SUFFIX = ".jxe"
KEEP = 8  # configurations kept (an 8B model's programs: ~30 MB)
_FORMAT = 2  # bump when the file layout changes (2: signed files)


# Module-level settings that decide which form a program takes (kernel or XLA per step size, tile configs, compiler
# options). Their defaults are in the sources; a caller that changes one at run time must not load programs lowered
# with another value.
PROGRAM_SETTINGS = {
    "jaxinfer.quant": ("GPU_KERNEL_MAX_TOKENS", "GPU_KERNEL_MIN_TOKENS_4BIT", "HOPPER_INT8_MIN_TOKENS",
                       "HOPPER_INT8_MAX_TOKENS"),
    "jaxinfer.model": ("SHARDING_RULES", "CPU_F32_KERNEL_MAX_TOKENS", "HOPPER_GROUPED_MIN_ROWS",
                       "MOE_GATHER_MAX_PAIRS_PER_EXPERT", "MOE_GATHER_MAX_BYTES"),
    "jaxinfer.runner": ("SAMPLER_COMPILER_OPTIONS", "PROMPT_LOGPROBS_ROWS", "SET_PAGES_ROWS"),
    "pallas_kernels.grouped_matmul_hopper": ("CONFIG",),
    "pallas_kernels.int8_matmul_hopper": ("CONFIG",),
}


def program_settings() -> list:
    """[(module, name, repr of its current value)] for every entry of PROGRAM_SETTINGS."""
    import importlib

    return [(m, n, repr(getattr(importlib.import_module(m), n)))
            for m, names in PROGRAM_SETTINGS.items() for n in names]


def _source_roots() -> list[Path]:
    import pallas_kernels

    return [Path(__file__).resolve().parent, Path(pallas_kernels.__file__).resolve().parent]


def source_digest() -> str:
    """Hex digest of jaxinfer's and pallas_kernels' sources and the shipped XLA autotune bundles (which pick kernels:
    new ones, programs rebuilt)."""
    h = hashlib.sha256()
    for root, pattern in ([(r, p) for r in _source_roots() for p in ("*.py", "*.cc")]
                          + [(CONFIGS_DIR / "autotune", "*.json")]):
        for path in sorted(root.rglob(pattern)):
            h.update(f"{root.name}/{path.relative_to(root).as_posix()}".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def fingerprint(cfg, ecfg, params, abstract_kv, max_model_len: int, devices, sources: str | None = None) -> str:
    """Hex digest of everything the engine's programs are lowered from (see the module docstring). sources:
    `source_digest()`, if the caller has it already."""
    import jaxlib

    h = hashlib.sha256(f"jaxinfer-executables-{_FORMAT}".encode())
    h.update((sources or source_digest()).encode())
    dev = devices[0]
    env = (sys.version_info[:3], jax.__version__, jaxlib.__version__, dev.client.platform,
           dev.client.platform_version, [(d.id, d.process_index, d.device_kind) for d in devices],
           jax.process_index(), jax.process_count(), os.environ.get("XLA_FLAGS"), os.environ.get("LIBTPU_INIT_ARGS"),
           sorted((k, v) for k, v in jax.config.values.items()
                  if "compilation_cache" not in k and "persistent_cache" not in k))
    # Options that do not reach a program (progress bars, thread counts, where the cache lives) stay out of the key.
    ecfg = dataclasses.replace(ecfg, show_progress=False, compile_threads=0, compilation_cache_dir=None,
                               use_compilation_cache=True)

    def avals(tree):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return str(treedef), [(x.shape, str(x.dtype), repr(getattr(x, "sharding", None))) for x in leaves]

    for part in (env, repr(cfg), repr(ecfg), avals(params), avals(abstract_kv), max_model_len, program_settings()):
        h.update(repr(part).encode())
    return h.hexdigest()[:40]


def devices_of(params, mesh) -> list:
    """The devices an engine's programs run on, in their compiled order: the mesh's, or the weights' one device."""
    if mesh is not None:
        return list(mesh.devices.flat)
    for leaf in jax.tree_util.tree_leaves(params):
        if isinstance(leaf, jax.Array):
            return sorted(leaf.sharding.device_set, key=lambda d: d.id)
    return [jax.devices()[0]]


def program_name(key) -> str:
    """A file name for a runner's program key: (512, 64, False) -> '512-64-False', 'set_row' -> 'set_row'."""
    return "-".join(map(str, key)) if isinstance(key, tuple) else str(key)


class ExecutableStore:
    """The saved programs of one engine configuration (one fingerprint)."""

    def __init__(self, cache_dir: str, fingerprint: str, devices, shipped: "ExecutableStore | None" = None,
                 read_only: bool = False):
        # One folder per process of a multi-host job (a shared cache directory): each prunes only its own.
        self._prefix = f"p{jax.process_index()}-"
        self.path = Path(cache_dir) / FOLDER / (self._prefix + fingerprint)
        self.devices = list(devices)  # the devices the programs run on, in their compiled order
        self._key = cache_trust.signing_key(cache_dir)  # None: the directory is not private; nothing saved or loaded
        self._write_failed = self._used = self._pruned = False
        if self.devices[0].platform == "cpu":  # programs calling the native CPU kernel need its FFI target
            from pallas_kernels import cpu_qmatmul  # registered before they load (tracing would have done it)

            cpu_qmatmul.available()
        self.shipped = shipped  # read-only: a converted model's programs (convert.py), tried after this store's
        self.read_only = read_only

    @property
    def _replacing(self) -> str:
        return "" if self.read_only else " and replacing the file"

    def has_programs(self) -> bool:
        return self._key is not None and self.path.is_dir() and any(self.path.glob("*" + SUFFIX))

    def load(self, key):
        """The compiled program saved under `key` (here, else in the shipped store), or None (not saved, or
        unreadable: dropped with a warning)."""
        own = self._load(key)
        return own if own is not None or self.shipped is None else self.shipped._load(key)

    def _load(self, key):
        if self._key is None:
            return None
        path = self.path / (program_name(key) + SUFFIX)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            warnings.warn(f"saved program {path.name} not read ({e}); compiling it", stacklevel=2)
            return None
        blob = cache_trust.verify(self._key, path.name, data)
        if blob is None:  # not written by this store (or damaged): never unpickled
            warnings.warn(f"saved program {path} could not be loaded (its signature does not match this cache's key); "
                          f"compiling it{self._replacing}", stacklevel=2)
            if not self.read_only:
                path.unlink(missing_ok=True)
            return None
        try:
            exe, in_tree, out_tree = pickle.loads(blob)
            loaded = serialize_executable.deserialize_and_load(exe, in_tree, out_tree, execution_devices=self.devices)
        except Exception as e:  # a truncated or foreign file must not stop the engine: compile instead
            warnings.warn(f"saved program {path} could not be loaded ({type(e).__name__}: {e}); compiling it"
                          f"{self._replacing}", stacklevel=2)
            if not self.read_only:
                path.unlink(missing_ok=True)
            return None
        if not self._used and not self.read_only:  # most recently used first when old configurations are pruned
            self._used = True
            try:
                os.utime(self.path)
            except OSError:
                pass
        return loaded

    def save(self, key, compiled, fresh: bool = True) -> None:
        """Write a compiled program (atomically: a reader sees the old file, the whole new one, or none).

        fresh: XLA compiled it in this process. An executable XLA:CPU loaded from jax's persistent cache serialises
        without its machine code (it fails at its first run, "Function ... not found"), so off GPUs only fresh
        compiles are saved; a GPU executable serialises the same either way.
        """
        if self._key is None or self.read_only or self._write_failed or not (fresh or self.devices[0].platform in ("gpu", "cuda", "rocm")):
            return
        try:
            name = program_name(key) + SUFFIX
            blob = cache_trust.sign(self._key, name, pickle.dumps(serialize_executable.serialize(compiled),
                                                                  protocol=pickle.HIGHEST_PROTOCOL))
            self.path.mkdir(parents=True, exist_ok=True)
            if not self._pruned:
                self._pruned = True
                self._prune()
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.replace(tmp, self.path / name)
            except BaseException:
                os.unlink(tmp)
                raise
        except (OSError, ValueError, NotImplementedError) as e:  # read-only cache, or a program jax cannot serialise
            self._write_failed = True
            warnings.warn(f"compiled programs not saved to {self.path} ({type(e).__name__}: {e}); the next start "
                          "will lower them again", stacklevel=2)

    def _prune(self) -> None:
        """Delete this process's folders of all but the KEEP most recently used configurations (this one counts as
        used); other processes' folders in a shared directory are theirs to prune."""
        os.utime(self.path)
        folders = sorted((p for p in self.path.parent.iterdir() if p.is_dir() and p.name.startswith(self._prefix)),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for old in folders[KEEP:]:
            if old != self.path:
                shutil.rmtree(old, ignore_errors=True)
