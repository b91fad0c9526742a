"""Counting XLA compilations, so tests can prove nothing compiles after warm-up; the persistent cache, and whether
a compile came from it.

jax reports each lowering of a jitted function through `jax.monitoring`; a lowering happens on every
in-memory cache miss, whether or not the persistent cache then saves the XLA compile. The listener is
registered once per process (jax offers no public way to remove one).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import jax

_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_CACHE_HIT, _CACHE_WRITE = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
_lock = threading.Lock()
_state = {"count": 0, "background": 0, "registered": False, "cache_events": False}
_thread = threading.local()  # jax records the persistent-cache events in the thread that compiles


def _listener(event: str, duration: float, **kwargs) -> None:
    if event == _LOWERING_EVENT:
        with _lock:  # a background compile's (adaptive buckets: compiled beside serving, on purpose) counted apart
            _state["background" if getattr(_thread, "background", False) else "count"] += 1


@contextmanager
def background():
    """Lowerings in this block, on this thread, are not counted by `count()` (`background_count()` has them)."""
    count()  # the listener registered before the first one
    _thread.background = True
    try:
        yield
    finally:
        _thread.background = False


def background_count() -> int:
    with _lock:
        return _state["background"]


def _cache_listener(event: str, **kwargs) -> None:
    if event in (_CACHE_HIT, _CACHE_WRITE):
        _thread.events = getattr(_thread, "events", ()) + (event,)


def compile_afresh(lowered, compiler_options: dict | None = None) -> tuple:
    """(lowered.compile(), fresh): fresh is True if XLA compiled it in this call (with jax's persistent cache on,
    only when jax reports writing it there), False if it was loaded from that cache or jax reported neither.
    compiler_options: XLA options for this program alone (`Lowered.compile`'s)."""
    with _lock:
        if not _state["cache_events"]:
            jax.monitoring.register_event_listener(_cache_listener)
            _state["cache_events"] = True
    _thread.events = ()
    exe = lowered.compile(compiler_options=compiler_options or None)
    if _CACHE_HIT in _thread.events:
        return exe, False
    cache_on = jax.config.jax_compilation_cache_dir is not None and jax.config.jax_enable_compilation_cache
    return exe, (_CACHE_WRITE in _thread.events) or not cache_on  # with the cache on, a fresh compile is written


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


def enable_persistent_cache(directory: str) -> bool:
    """XLA's persistent compilation cache: a warm start loads executables instead of compiling them. Only in a
    directory private to this user, with every entry signed (cache_trust); False (a warning, and the cache stays
    off) otherwise."""
    from jaxinfer import cache_trust

    if not cache_trust.sign_jax_cache(directory):
        return False
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return True
