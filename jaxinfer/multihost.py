"""Multi-host engines: one model over the devices of several processes (hosts), joined by `jax.distributed`.

Every process runs the same command. `initialize` joins them (before jax touches a device); each builds the same
engine over one mesh of all their devices (tensor_parallel_size = every device): the same weights loaded, the same
programs compiled, the same KV cache. Process 0 then serves: it runs the scheduler (and the HTTP server), and each
device call of a step goes through `ModelRunner._op`, which sends it (its name and host arguments) through the
coordination service's key-value store before making it. The other processes `follow`: they take the calls in
order and make them on their own devices, so every process runs each program with the same inputs and XLA's
collectives (all-reduces over the mesh) meet. Nothing else crosses hosts: sampled tokens come back to process 0 from
its own devices (the sampler's outputs are replicated).

A process that dies is reported, not fatal to the others (jax_enable_recoverability): process 0 watches the others'
heartbeats (`HostMonitor`); when one stops, the engine's `fatal_error` says which, its next step raises, and the server
goes unready and fails what was in flight (serving.AsyncEngine), even while a step waits in a collective that can no
longer complete. When process 0 dies, jax ends the others (the coordination service lives in it).
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import signal
import sys
import threading
import time

import jax
import numpy as np

logger = logging.getLogger("jaxinfer.multihost")

PREFIX = "jaxinfer/op/"  # key of the i-th device call: PREFIX + str(i)
HEARTBEAT_TIMEOUT = 10  # seconds without a heartbeat before jax's coordination service declares a process dead
KEEP_STEPS = 4  # calls of this many steps back stay in the store (a process behind by more cannot be: see send)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> bool:
    """Join the processes of a multi-host engine (`jax.distributed.initialize`), before anything uses a device.
    Values left out are read from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; with `auto`, jax's
    cluster detection supplies the rest (Cloud TPU VMs, GKE, SLURM, Open MPI). Returns False, doing nothing, when no
    value is given anywhere and not `auto` (a single process)."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _int_or_none(num_processes, env.get("JAX_NUM_PROCESSES"), "num_processes")
    process_id = _int_or_none(process_id, env.get("JAX_PROCESS_ID"), "process_id")
    if coordinator_address is None and num_processes is None and process_id is None and not auto:
        return False
    if not auto:
        missing = [n for n, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                                  ("process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"{', '.join(missing)}: a multi-host engine needs the coordinator's address (host:port "
                             "of process 0), the number of processes and this process's id (or auto detection on a "
                             "cluster that supports it)")
    if coordinator_address is not None and (":" not in coordinator_address
                                            or not coordinator_address.rsplit(":", 1)[1].isdigit()):
        raise ValueError(f"coordinator_address must be host:port, got {coordinator_address!r}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, num_processes), got {process_id} of {num_processes}")
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT)
    logger.info("process %d of %d joined (coordinator %s); devices: %d here, %d in all", jax.process_index(),
                jax.process_count(), coordinator_address, jax.local_device_count(), jax.device_count())
    return True


def _int_or_none(value, env_value, name: str) -> int | None:
    if value is None and env_value:
        try:
            value = int(env_value)
        except ValueError:
            raise ValueError(f"{name}: JAX_{name.upper()} must be an integer, got {env_value!r}") from None
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return None if value is None else int(value)


def is_multihost() -> bool:
    return jax.process_count() > 1


def is_leader() -> bool:
    """Whether this process serves (process 0); the others `follow`."""
    return jax.process_index() == 0


def _client():
    from jax._src import distributed  # the coordination service's client: jax exposes no public handle to it

    return distributed.global_state.client


def agree_min(n: int) -> int:
    """The smallest of every process's n (e.g. KV pages from each host's free memory): all must build the same."""
    if not is_multihost():
        return n
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int64(n))))


def check_engine(ecfg) -> None:
    """The engine options a multi-host engine supports (ValueError naming the option otherwise)."""
    if not is_multihost():
        return
    if ecfg.tensor_parallel_size != jax.device_count():
        raise ValueError(f"tensor_parallel_size: a multi-host engine spans every device of its {jax.process_count()} "
                         f"processes; pass tensor_parallel_size={jax.device_count()} "
                         f"(got {ecfg.tensor_parallel_size})")
    if ecfg.data_parallel_size > 1:
        raise ValueError("data_parallel_size: replicas over several processes are not supported yet; run one "
                         "multi-host engine per replica")
    if ecfg.adaptive_buckets:
        raise ValueError("adaptive_buckets: not on a multi-host engine yet (every process would have to add the same "
                         "programs between the same two steps)")


class StepChannel:
    """Process 0's side: each device call, pickled, under PREFIX + its index in the coordination service's store."""

    def __init__(self):
        self.client = _client()
        self.sent = 0
        self._steps: list[int] = []  # indices of the recent "step" calls
        self._deleted = 0  # calls below this index are gone from the store
        self._closed = False
        self.monitor: HostMonitor | None = None  # stopped first when closing: the others leaving is no fault then
        atexit.register(self.close)  # the followers then exit (before jax's own exit handler, which runs later)

    def send(self, name: str, args: tuple) -> None:
        if self._closed:
            raise RuntimeError("the multi-host engine was closed")
        self.client.key_value_set_bytes(PREFIX + str(self.sent), pickle.dumps((name, args), protocol=5))
        if name == "step":
            # Every process has made the calls before a step whose sampled ids process 0 has read (its forward's
            # collectives needed them all), and process 0 reads step i before launching step i + 2: the calls
            # before a step KEEP_STEPS back are read everywhere.
            self._steps.append(self.sent)
            if len(self._steps) > KEEP_STEPS:
                upto = self._steps.pop(0)
                for i in range(self._deleted, upto):
                    self.client.key_value_delete(PREFIX + str(i))
                self._deleted = upto
        self.sent += 1

    def close(self, timeout: float = 30.0) -> None:
        """Tell the other processes to stop following, and wait (up to `timeout` seconds) for them to leave the
        coordination service, which lives in this process: gone before them, it would fail their own exit."""
        if self._closed:
            return
        if self.monitor is not None:
            self.monitor.stop()
        others = list(range(1, jax.process_count()))
        try:
            self.send("stop", ())
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(i in self.client.get_live_nodes(others) for i in others):
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the service or the others may be gone already
            pass
        self._closed = True


def follow(engine, poll_seconds: float = 1.0) -> int:
    """The loop of every process but the first: make process 0's device calls, in order, on this process's devices,
    until it says stop (returns 0) or is gone (returns 1; jax usually ends this process first). SIGTERM does not
    end it: process 0, stopped by its own SIGTERM, finishes the steps in flight on every process first."""
    if is_leader():
        raise ValueError("follow: process 0 serves; the other processes follow it")
    runner, client, i, me = engine.runner, _client(), 0, jax.process_index()
    previous = None
    if threading.current_thread() is threading.main_thread():
        # A deployment stops every host with SIGTERM at once: process 0 then drains its running requests, whose steps
        # need this process's devices too, and sends "stop". So SIGTERM here does not end the loop; "stop" does.
        def on_sigterm(signum, frame):
            print(f"process {me}: SIGTERM: following process 0 until it stops", file=sys.stderr, flush=True)

        previous = signal.signal(signal.SIGTERM, on_sigterm)
    print(f"process {me} follows process 0's steps", file=sys.stderr, flush=True)
    try:
        while True:
            try:
                data = client.blocking_key_value_get_bytes(PREFIX + str(i), int(poll_seconds * 1000))
            except Exception as e:  # noqa: BLE001 - a timeout while process 0 is idle, or the service gone
                if "DEADLINE_EXCEEDED" in str(e):
                    continue
                print(f"error: process {me} lost process 0 (the coordinator): {e}", file=sys.stderr, flush=True)
                return 1
            name, args = pickle.loads(data)
            if name == "stop":
                logger.info("process 0 stopped; process %d exits", me)
                jax.distributed.shutdown()  # leave while the coordination service is up (process 0 waits for it)
                return 0
            runner.replay(name, args)
            i += 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class HostMonitor(threading.Thread):
    """Process 0's watch over the others: `on_lost(ids)` once, when the coordination service stops seeing any of them
    (a heartbeat missed for HEARTBEAT_TIMEOUT seconds, or at once when its connection drops)."""

    def __init__(self, on_lost, interval: float = 1.0):
        super().__init__(name="jaxinfer-host-monitor", daemon=True)
        self.on_lost, self.interval = on_lost, interval
        self.ids = list(range(jax.process_count()))
        self._stop = threading.Event()

    def run(self) -> None:
        client = _client()
        while not self._stop.wait(self.interval):
            try:
                live = client.get_live_nodes(self.ids)
            except Exception as e:  # noqa: BLE001 - the service itself failing is as fatal
                self.on_lost(self.ids[1:], str(e))
                return
            lost = [i for i in self.ids if i not in live]
            if lost:
                self.on_lost(lost, "no heartbeat")
                return

    def stop(self) -> None:
        self._stop.set()


def lost_message(lost: list[int], why: str) -> str:
    n = jax.process_count()
    who = ", ".join(map(str, lost))
    return (f"process{'es' if len(lost) > 1 else ''} {who} of this {n}-process engine stopped ({why}, "
            f"{time.strftime('%H:%M:%S')}); the engine cannot run without {'them' if len(lost) > 1 else 'it'}: "
            "restart every process")
