"""Data parallelism: `data_parallel_size` M engine replicas in one process, each on devices of its own, behind one
front with the engine's interface (so `LLM`, the server and the benchmarks take either).

Replica i runs on devices i * N ... (i + 1) * N - 1, N = `tensor_parallel_size` (a mesh of its own: each replica is
also tensor parallel when N > 1). A request goes wholly to one replica (all n samples of it): the one holding the
longest cached prefix of its prompt (prefix caching), else the least loaded (fewest running and waiting requests,
then most free KV pages). `step()` steps every replica with work; each launches its next step before it waits for
the one in flight, so the replicas' devices run side by side. Pages are accounted per replica; `stats()` sums them.
The replicas are built side by side (threads), each loading and compiling for its own devices.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import uuid

import jax
import numpy as np
from jax.sharding import Mesh

from jaxinfer import compile_guard
from jaxinfer.engine import Engine
from jaxinfer.model import SHARDING_RULES
from jaxinfer.request import RequestOutput

# stats() entries that are ratios of two sums, recomputed from them rather than summed
_RATES = {"prefix_cache_hit_rate": ("prefix_cache_hits", "prefix_cache_queries"),
          "spec_acceptance_rate": ("spec_accepted_tokens", "spec_draft_tokens")}


def make_engine(model: str | None = None, **options):
    """An `Engine`, or with data_parallel_size > 1 a `DataParallelEngine` of that many replicas."""
    dp = options.get("data_parallel_size", 1)
    if isinstance(dp, (int, np.integer)) and not isinstance(dp, bool) and dp > 1:
        return DataParallelEngine(model, **options)
    return Engine(model, **options)  # checks data_parallel_size


class DataParallelEngine:
    """M replicas of `Engine` (module docstring). Attributes it does not define (cfg, tokenizer, max_model_len, ecfg,
    ...) are the first replica's: every replica has the same."""

    def __init__(self, model: str | None = None, *, mesh=None, data_parallel_size: int = 2, **options):
        M, N = data_parallel_size, options.get("tensor_parallel_size", 1)
        for name, v in (("data_parallel_size", M), ("tensor_parallel_size", N)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if mesh is not None:
            raise ValueError("data_parallel_size: each replica builds its own mesh of tensor_parallel_size devices; "
                             "pass no mesh")
        devices = jax.devices()
        if len(devices) < M * N:
            raise ValueError(f"data_parallel_size {M} x tensor_parallel_size {N} needs {M * N} devices; "
                             f"{len(devices)} {jax.default_backend()} device(s) here")
        axis = SHARDING_RULES["kv_heads"]
        # Built side by side: loading and compiling release the GIL (XLA compiles each replica's programs for its
        # own devices), so start-up takes about one replica's time where the host has the cores.
        with cf.ThreadPoolExecutor(M, thread_name_prefix="jaxinfer-replica") as pool:
            futures = [pool.submit(Engine, model, mesh=Mesh(np.array(devices[i * N:(i + 1) * N]), (axis,)), **options)
                       for i in range(M)]
            self.replicas = [f.result() for f in futures]  # the first failure is raised
        for e in self.replicas:  # ready together: a replica's compiles counted from the last one's end
            e.compiles_at_ready = compile_guard.count()
        self.data_parallel_size = M
        self._owner: dict[str, Engine] = {}  # request id -> its replica
        self._ids = itertools.count()

    def __getattr__(self, name):
        if name == "replicas":  # not built (a failed __init__)
            raise AttributeError(name)
        return getattr(self.replicas[0], name)

    # -- requests ----------------------------------------------------------------------------------------------

    def route(self, ids: list[int]) -> Engine:
        """The replica for a prompt of token ids `ids` (module docstring)."""

        def score(e: Engine):
            s = e.scheduler
            return (s.cached_prompt_tokens(ids), -(len(s.running) + len(s.waiting)), e.num_pages - s.allocator.num_used)

        return max(self.replicas, key=score)

    def add_request(self, prompt=None, params=None, *, request_id: str | None = None, priority: int = 0) -> str:
        """As `Engine.add_request`, on the replica `route` picks. Request ids are unique across replicas."""
        _, ids = self.replicas[0]._prompt_ids(prompt)
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if rid in self._owner:
            raise ValueError(f"request_id {rid!r} is already in use")
        eng = self.route(ids)
        eng.add_request(prompt, params, request_id=rid, priority=priority)
        self._owner[rid] = eng
        return rid

    def abort(self, request_id: str) -> None:
        eng = self._owner.get(request_id)
        if eng is not None:
            eng.abort(request_id)

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.replicas)

    def step(self) -> list[RequestOutput]:
        """One step of every replica with work; the outputs of all."""
        outs = []
        for e in self.replicas:
            if e.has_unfinished():
                outs += e.step()
        for o in outs:
            if o.finished:
                self._owner.pop(o.request_id, None)
        return outs

    # -- what it reports ---------------------------------------------------------------------------------------

    @property
    def num_pages(self) -> int:
        return sum(e.num_pages for e in self.replicas)

    @property
    def num_compiles_since_ready(self) -> int:
        """Compilations since the last replica became ready (the count is the process's)."""
        return min(e.num_compiles_since_ready for e in self.replicas)

    def stats(self) -> dict:
        """Every replica's `Engine.stats()` summed (lists per draft position element-wise, rates recomputed), and
        each replica's own under "replicas"."""
        per = [e.stats() for e in self.replicas]
        out = {}
        for k, v in per[0].items():
            if k in _RATES:
                continue
            if isinstance(v, list):
                out[k] = [sum(x) for x in zip(*(p[k] for p in per))]
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = sum(p[k] for p in per)
        for k, (num, den) in _RATES.items():
            if k in per[0]:
                out[k] = out[num] / out[den] if out.get(den) else 0.0
        out["replicas"] = per
        return out

    def spec_stats(self) -> dict:
        s = self.stats()
        return {k: v for k, v in s.items() if k.startswith("spec_")}
