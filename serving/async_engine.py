"""The synchronous `Engine` behind an asyncio front: one dedicated engine thread, per-request queues.

Why a thread and not `run_in_executor` + a lock: the engine must step continuously while any request is
unfinished, independently of which HTTP handler happens to be awaiting. One thread owns the engine
outright (it also builds it, so the HTTP server can answer /health and /ready with 503 while the model
loads and compiles). Its loop is:

    take every pending command (add / abort) from a thread-safe queue   <- event loop puts them there
    if the engine has unfinished work: step() and hand the step's RequestOutputs to their requests'
    asyncio.Queues in one loop.call_soon_threadsafe; otherwise block on the command queue

An abort therefore lands before the next step, so a disconnected client's pages are freed within one
engine step. A fault the engine attributes to one request ends that request alone: its stream receives a
RequestFailedError (a 500 or an SSE error event). If `step()` itself raises (a fault it could not attribute: the
device state is lost), every in-flight request receives an EngineDeadError, the server is not ready while the
engine is rebuilt from its factory (the compiled programs come from the store and cache), then serves again; if
the rebuild fails, it stays unready.

Prompts arrive here already tokenized (the server tokenizes in a thread pool), so `add_request` is cheap.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from jaxinfer.request import RequestOutput
from jaxinfer.sampling_params import SamplingParams

logger = logging.getLogger("jaxinfer.serving")


class EngineDeadError(RuntimeError):
    """The engine raised inside a step; in-flight requests fail and the server is unready until it is rebuilt."""


class RequestFailedError(RuntimeError):
    """A fault inside a step attributed to this request (or its text / logprobs failing): it alone ended."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    tokens: int = 0  # the work it may need: prompt tokens + max_tokens x n
    started: bool = False  # got its first output (no longer counted as queued)
    finished: bool = False


@dataclass
class StepStats:
    """A snapshot taken by the engine thread after each step (read by /metrics without touching the engine)."""

    running: int = 0
    waiting: int = 0
    pages_used: int = 0
    pages_total: int = 0
    preemptions: int = 0
    compiles_since_ready: int = 0
    steps: int = 0
    pages_cached: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0  # of which found there (cumulative)
    prefix_cache_hit_rate: float = 0.0
    spec_draft_tokens: int = 0  # speculative decoding: draft tokens proposed (cumulative)
    spec_accepted_tokens: int = 0  # of which accepted (cumulative)
    spec_off_steps: int = 0  # steps without drafts because more requests ran than disable_by_batch_size (cumulative)
    spec_accepted_per_position: list = field(default_factory=list)  # [(proposed, accepted)] per draft position
    extra: dict = field(default_factory=dict)


class AsyncEngine:
    """Owns an Engine in one thread. `start()` from a running event loop; `generate()` yields RequestOutputs."""

    def __init__(self, engine_factory: Callable[[], object], step_timeout: float | None = None):
        """step_timeout: seconds a step may run before the watchdog fails the requests in flight (an
        EngineDeadError each, the step's requests aborted) and marks the server unready until the step returns;
        None: no watchdog."""
        self._factory = engine_factory
        self.step_timeout = step_timeout
        self.stalled = False  # a step has run past step_timeout and not returned yet
        self._step_started: float | None = None
        self.engine = None
        self.stats = StepStats()
        self.error: BaseException | None = None
        self.num_rebuilds = 0  # times the engine was rebuilt after a fault it could not attribute
        self.rebuilding = False  # between such a fault and the new engine being ready
        self.on_output: Callable[[RequestOutput], None] | None = None  # metrics hook, called on the event loop
        self._cmds: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = False
        self._fatal = False  # the engine reported a fatal error (_lost)
        self._lost_lock = threading.Lock()

    # -- lifecycle (event loop side) ------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="jaxinfer-engine", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch, name="jaxinfer-watchdog", daemon=True).start()

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self.error is None and not self.stalled

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def num_queued(self) -> int:
        """Requests submitted that have not produced their first output yet."""
        return sum(not s.started for s in self._streams.values())

    @property
    def num_queued_tokens(self) -> int:
        """The tokens those requests may need (prompt + max_tokens x n each)."""
        return sum(s.tokens for s in self._streams.values() if not s.started)

    async def wait_ready(self) -> None:
        while not self._ready.is_set() and self.error is None:
            await asyncio.sleep(0.05)
        if self.error is not None:
            raise self.error

    async def stop(self) -> None:
        self._stop = True
        self._cmds.put(("wake",))
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    # -- requests (event loop side) ---------------------------------------------------------------------------

    async def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                  q: asyncio.Queue | None = None, priority: int = 0) -> asyncio.Queue:
        """Submit a request; raises ValueError (bad input) or EngineDeadError. Outputs arrive on the queue."""
        if self.error is not None:
            raise EngineDeadError(f"the engine failed: {self.error}")
        q = q if q is not None else asyncio.Queue()
        self._streams[request_id] = _Stream(q, len(prompt_ids) + (params.max_tokens or 0) * max(1, params.n))
        fut = self._loop.create_future()
        self._cmds.put(("add", request_id, prompt_ids, params, priority, fut))
        try:
            await fut
        except BaseException:
            self._streams.pop(request_id, None)
            self._cmds.put(("abort", request_id))  # cancelled while queued: the engine may still add it
            raise
        return q

    def abort(self, request_id: str) -> None:
        """Abort now (idempotent); safe to call for finished or unknown ids."""
        if request_id in self._streams:
            self._cmds.put(("abort", request_id))

    def release(self, request_id: str) -> None:
        """Forget a request's stream; abort it first if it has not finished."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.finished:
            self._cmds.put(("abort", request_id))

    async def generate(self, requests: list[tuple[str, list[int], SamplingParams]], priority: int = 0,
                       on_idle: Callable[[], Awaitable[None]] | None = None):
        """Async iterator over the RequestOutputs of several requests (of their params' output_kind: the server asks
        for DELTA), interleaved as they come.
        `priority`: the scheduler runs lower values first (FCFS among equals).
        `on_idle`: awaited whenever every output delivered so far has been yielded, before waiting for more (the
        server writes the SSE chunks it has gathered then: one write for all of a request's outputs that were
        waiting, when the event loop fell behind the engine).

        Closing it early (client gone, handler cancelled) aborts whatever has not finished.
        """
        q: asyncio.Queue = asyncio.Queue()
        added = []
        try:
            for rid, ids, params in requests:
                await self.add(rid, ids, params, q, priority)
                added.append(rid)
            remaining = set(added)
            while remaining:
                if on_idle is not None and q.empty():
                    await on_idle()
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    remaining.discard(out.request_id)
        finally:
            for rid in added:
                self.release(rid)

    # -- the engine thread ----------------------------------------------------------------------------------

    def _deliver(self, request_id: str, item) -> None:  # runs on the event loop
        stream = self._streams.get(request_id)
        if stream is None:
            return
        stream.started = True
        if isinstance(item, RequestFailedError):
            stream.finished = True
        if isinstance(item, RequestOutput):
            stream.finished = item.finished
            if self.on_output is not None:
                self.on_output(item)
        stream.queue.put_nowait(item)

    def _deliver_all(self, items: list) -> None:  # runs on the event loop: one step's outputs, in order
        for request_id, item in items:
            try:
                self._deliver(request_id, item)
            except Exception:  # noqa: BLE001 - (the metrics hook) the other streams of the step still get theirs
                logger.exception("delivering an output of request %s failed", request_id)

    def _resolve(self, fut: asyncio.Future, exc: BaseException | None) -> None:  # runs on the event loop
        if fut.done():
            return
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    def _run(self) -> None:
        try:
            self.engine = self._factory()
        except BaseException as e:  # noqa: BLE001 - reported through /ready and the log
            logger.exception("engine failed to start")
            self.error = e
            return
        self._snapshot()
        self._ready.set()
        while not self._stop:
            fault = self._serve(self.engine, self._loop)
            if fault is None:
                return
            fatal = getattr(self.engine, "fatal_error", None)
            if fatal is not None:  # a process of a multi-host engine is gone: nothing to rebuild here
                self._lost(fatal)
                return
            # The engine could not attribute a fault: fail what was in flight, rebuild, serve again.
            self.error = EngineDeadError(f"the engine failed during a step: {fault}")
            self.rebuilding = True  # before anyone hears of the fault: /ready and /health say so from here on
            self._ready.clear()
            for rid in list(self._streams):
                self._loop.call_soon_threadsafe(self._deliver, rid, self.error)
            self._drain_adds()
            self.engine = None  # its device memory goes before the new engine takes its own
            gc.unfreeze()  # the engine froze what start-up built (engine.py): let the collector reach it
            gc.collect()
            t0 = time.monotonic()
            try:
                self.engine = self._factory()
            except BaseException:  # noqa: BLE001 - stays unready; reported through /ready and the log
                logger.exception("engine rebuild failed")
                self.rebuilding = False
                return
            self.num_rebuilds += 1
            logger.warning("engine rebuilt in %.1f s after a step fault; serving again", time.monotonic() - t0)
            self.error = None
            self.rebuilding = False
            self._snapshot()
            self._ready.set()

    def _serve(self, engine, loop) -> str | None:
        """Step while there is work, until stopped (None) or a step raises (what it raised)."""
        while not self._stop:
            try:
                cmd = self._cmds.get(block=not engine.has_unfinished(), timeout=None)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                self._command(engine, cmd)
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    cmd = None
            if self._stop or not engine.has_unfinished():
                continue
            try:
                self._step_started = time.monotonic()
                outputs = engine.step()
            except Exception as e:  # noqa: BLE001 - any fault the engine could not attribute: rebuild it
                logger.exception("engine step failed")
                return type(e).__name__
            finally:
                self._step_started = None
            if self.stalled:
                logger.warning("the stalled step returned after all; ready again")
                self.stalled = False
            self._snapshot()
            items = []
            for out in outputs:
                if out.error is not None:  # this request alone failed: its stream gets the error (its kind only:
                    # exception texts may hold paths; the full one is in the log)
                    logger.warning("request %s failed: %s", out.request_id, out.error)
                    items.append((out.request_id, RequestFailedError(
                        f"the request failed during a step ({out.error.split(':', 1)[0]})")))
                    continue
                for c in out.outputs:  # the engine keeps appending to this list; hand over a copy
                    if c.logprobs is not None:
                        c.logprobs = list(c.logprobs)
                if out.prompt_logprobs is not None:  # entries are rewritten if the request is recomputed
                    out.prompt_logprobs = list(out.prompt_logprobs)
                items.append((out.request_id, out))
            if items:  # the whole step in one hand-off: one wake-up of the event loop (a self-pipe write) per step,
                # not one per request
                loop.call_soon_threadsafe(self._deliver_all, items)
        return None

    def _lost(self, fatal: str) -> None:
        """The engine reported a fault it cannot come back from (`Engine.fatal_error`: a process of a multi-host
        engine stopped): unready for good, what is in flight fails. Either thread may get here first."""
        with self._lost_lock:
            if self._fatal:
                return
            self._fatal = True
            self.error = EngineDeadError(f"the engine cannot go on: {fatal}")
        self._ready.clear()
        rids = list(self._streams)
        logger.error("%s; failing the %d requests in flight and staying unready", fatal, len(rids))
        for rid in rids:
            self._loop.call_soon_threadsafe(self._deliver, rid, self.error)
        self._drain_adds()

    def _watch(self) -> None:
        """The watchdog (its own thread): a step running past step_timeout fails what is in flight; an engine that
        reports a fatal error (`Engine.fatal_error`) makes the server unready even while a step hangs."""
        while not self._stop:
            time.sleep(0.5 if self.step_timeout is None else min(0.5, self.step_timeout / 4))
            fatal = getattr(self.engine, "fatal_error", None)
            if fatal is not None and not self._fatal:
                self._lost(fatal)
            if self.step_timeout is None:
                continue
            started = self._step_started
            if started is None or self.stalled or time.monotonic() - started < self.step_timeout:
                continue
            self.stalled = True
            rids = list(self._streams)
            logger.error("an engine step has not returned for %.0f s (--step-timeout); failing the %d requests in "
                         "flight: %s", time.monotonic() - started, len(rids), ", ".join(rids[:50]))
            err = EngineDeadError(f"an engine step did not return within {self.step_timeout:g} s")
            for rid in rids:
                self._loop.call_soon_threadsafe(self._deliver, rid, err)
                self._cmds.put(("abort", rid))  # taken when the step returns: their pages freed

    def _command(self, engine, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, ids, params, priority, fut = cmd
            try:
                engine.add_request(ids, params, request_id=rid, priority=priority)
                exc = None
            except Exception as e:  # noqa: BLE001 - ValueError: bad input; anything else: still this request's
                exc = e
            self._loop.call_soon_threadsafe(self._resolve, fut, exc)
        elif kind == "abort":
            engine.abort(cmd[1])

    def _drain_adds(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                self._loop.call_soon_threadsafe(self._resolve, cmd[-1], self.error)

    def _snapshot(self) -> None:
        e = self.engine
        s = e.stats()
        self.stats = StepStats(
            running=s["running"], waiting=s["waiting"], pages_used=s["pages_used"], pages_total=s["pages_total"],
            preemptions=s.get("preemptions", 0), compiles_since_ready=e.num_compiles_since_ready,
            steps=self.stats.steps + 1, pages_cached=s.get("pages_cached", 0),
            prefix_cache_queries=s.get("prefix_cache_queries", 0), prefix_cache_hits=s.get("prefix_cache_hits", 0),
            prefix_cache_hit_rate=s.get("prefix_cache_hit_rate", 0.0),
            spec_draft_tokens=s.get("spec_draft_tokens", 0), spec_accepted_tokens=s.get("spec_accepted_tokens", 0),
            spec_off_steps=s.get("spec_off_steps", 0),
            spec_accepted_per_position=list(zip(s.get("spec_proposed_per_position", []),
                                                s.get("spec_accepted_per_position", []))),
        )
        self.stats.extra["time"] = time.monotonic()
