"""Counting XLA compilations, so tests can prove nothing compiles after warm-up; the persistent cache.

jax reports each lowering of a jitted function through `jax.monitoring`; a lowering happens on every
in-memory cache miss, whether or not the persistent cache then saves the XLA compile. The listener is
registered once per process (jax offers no public way to remove one).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import jax

_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_lock = threading.Lock()
_state = {"count": 0, "registered": False}


def _listener(event: str, duration: float, **kwargs) -> None:
    if event == _LOWERING_EVENT:
        with _lock:
            _state["count"] += 1


def count() -> int:
    """Lowerings (compilations or persistent-cache loads) so far in this process."""
    with _lock:
        if not _state["registered"]:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _state["registered"] = True
        return _state["count"]


@contextmanager
def forbid_compiles():
    """Raise AssertionError if anything is compiled inside the block."""
    before = count()
    yield
    after = count()
    if after != before:
        raise AssertionError(f"{after - before} compilation(s) happened where none may")


def enable_persistent_cache(directory: str) -> None:
    """XLA's persistent compilation cache: a warm start loads executables instead of compiling them."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
