"""The engine: requests in, tokens and text out, one `step()` at a time.

    step():  schedule N+1 -> pack into a bucket -> launch it on the device
             -> wait for step N's sampled ids -> append tokens -> detokenize -> outputs of step N

`Engine.step()` below is the whole data path; the pieces live in scheduler.py (plain Python), runner.py
(bucketing and the precompiled programs), model.py (the decoder), sampler.py (on-device sampling) and
detokenizer.py (incremental text and stop strings).

Async scheduling (the default): the host schedules and launches step N+1 before it reads step N's tokens,
so its Python work overlaps the device's. A decode of a token the host has not seen yet takes it from
the device (runner.py), and a request that stops on EOS or a stop string in step N has one more token
computed in step N+1, which is discarded. `async_scheduling=False` runs each step to the end before
the next is scheduled; both give the same tokens. That overlap only holds while the host's share of a step
(reading N's tokens, outputs, scheduling and packing N+1) stays under the device's: `RequestOutputKind.
FINAL_ONLY` requests skip the per-step outputs, and `Engine.last_wait_seconds` says how long a step waited.

Speculative decoding (`speculative_config`, spec_decode.py): the scheduler adds a proposer's drafts to each decode
that has some; the step scores the last token and the drafts of such a sequence together and samples at each of
its positions with that position's key (runner.py); the drafts are kept while each equals the token sampled at its
position, and the first sampled token that differs (or the one after the last draft) ends the run. So every
appended token is the one decoding without speculation samples there, greedy or seeded. The next step's drafts
depend on this step's tokens, so a step that may carry drafts is scheduled only once the step before it is read: it is
launched as soon as that step's tokens are appended, and the host makes that step's text and outputs while the device
runs it (`_launch_early`; a request a stop string ends there has its row in flight discarded, as above). Past
`disable_by_batch_size` running requests, verifying costs more than it saves: steps then carry no drafts and run
behind the host again (async scheduling). With a draft model (method draft_model) the proposer is that model, run on the
device for all of a step's speculating rows at once while the step is scheduled; it has a KV cache of its own with
the target's page ids (its bytes count in each page's size), and every step's input also runs through it. An EAGLE
head (method eagle) works the same way on the target's features (drafts.py, eagle.py).

Start-up: load weights -> size the KV cache -> compile every bucket against the cache's shapes -> check the
largest step's temporaries fit beside it (else shrink it once, recompile) -> allocate it -> run each program
once (GPU / TPU) -> `gc.freeze()`.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import gc
import itertools
import math
import os
import sys
import threading
import time
import uuid

import jax
import numpy as np
from jax.sharding import Mesh

from jaxinfer import adaptive_buckets, autotune, compile_guard, convert, executables, multihost
from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.executables import ExecutableStore
from jaxinfer.loader import load_model, resolve_dtype, weight_bytes
from jaxinfer.eagle import load_eagle, load_eagle3
from jaxinfer.model import (KV_CACHE_8BIT, KV_CALIBRATION_TEXT, SHARDING_RULES, init_kv_cache, is_8bit, kv_cache_scales,
                            logical_sharding, tp_size)
from jaxinfer.request import CompletionOutput, Logprob, Request, RequestMetrics, RequestOutput
from jaxinfer.drafts import DraftModel
from jaxinfer.runner import LaunchedStep, ModelRunner, StepResult
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams
from jaxinfer.scheduler import ScheduledBatch, Scheduler
from jaxinfer.spec_decode import accept_greedy, ngram_propose

_GiB = 1 << 30
MAX_FAULTS_IN_A_ROW = 8  # step faults without a completed step between them: the engine gives up (raises)


def tensor_parallel_mesh(n: int, mesh: Mesh | None) -> Mesh | None:
    """The mesh of `tensor_parallel_size` n: the first n devices along the tensor-parallel axis ("tp"), or the mesh
    given (whose "tp" axis must then have n devices, unless n is 1)."""
    axis = SHARDING_RULES["kv_heads"]
    if mesh is not None:
        if n > 1 and tp_size(mesh) != n:
            raise ValueError(f"tensor_parallel_size {n}: the mesh given has {tp_size(mesh)} devices along {axis!r}")
        return mesh
    if n == 1:
        return None
    devices = jax.devices()
    if len(devices) < n:
        raise ValueError(f"tensor_parallel_size {n}: only {len(devices)} {jax.default_backend()} device(s) here")
    return Mesh(np.array(devices[:n]), (axis,))


def device_bytes(tree) -> int:
    """Bytes of arrays (a KV cache, weights; abstract or not) on one device: their shards, on a mesh."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def device_page_bytes(cfg: ModelConfig, page_size: int, kv_dtype, mesh=None) -> int:
    """Bytes of one KV page (all layers, K and V) on one device: the whole page, or on a mesh its shard (the kv
    heads are split over "tp"), so a budget of one device's memory holds tp times the pages."""
    n = 1 if mesh is None else mesh.size  # a page count any sharding of the pages axis divides
    kv = init_kv_cache(cfg, n, page_size, kv_dtype, mesh, abstract=True)
    return device_bytes((kv.k, kv.v)) // n  # an 8-bit cache's scales are not per page


class Engine:
    def __init__(self, model: str | None = None, *, mesh=None, program_dir: str | None = None, **options):
        """program_dir: where this engine's compiled programs are saved whole (default: in the compilation cache);
        `jaxinfer convert` names the converted model's own folder."""
        self.ecfg = ecfg = EngineConfig.from_options(**options)
        self._log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if ecfg.show_progress else (lambda msg: None)
        if ecfg.use_compilation_cache:
            compile_guard.enable_persistent_cache(ecfg.cache_dir())
            try:  # XLA's autotune results shipped for this GPU: fewer kernel searches while compiling
                seeded = autotune.seed(ecfg.cache_dir())
            except (OSError, ValueError) as e:  # a read-only or broken cache only costs the searches
                seeded = 0
                print(f"warning: XLA autotune results not added to the compilation cache: {e}", file=sys.stderr,
                      flush=True)
            if seeded:
                self._log(f"XLA autotune cache: {seeded} results for this GPU added from configs/autotune")
        backend = jax.default_backend()
        self.dtype = resolve_dtype(ecfg.dtype, backend)
        if ecfg.data_parallel_size > 1:
            raise ValueError(f"data_parallel_size {ecfg.data_parallel_size}: an Engine is one replica; build the "
                             "replicas with jaxinfer.LLM or jaxinfer.data_parallel.make_engine")
        multihost.check_engine(ecfg)
        mesh = tensor_parallel_mesh(ecfg.tensor_parallel_size, mesh)
        self.mesh = mesh
        t0 = time.monotonic()
        loaded = load_model(model, ecfg, self.dtype, mesh)
        self.cfg: ModelConfig = loaded.cfg
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.source
        self.quantization = loaded.quantization  # the weights' schemes, e.g. "gguf:Q4_1 x120, gguf:Q8_0 x1"
        self.weight_bytes = weight_bytes(loaded.params)
        self.weight_device_bytes = device_bytes(loaded.params)  # one device's shards
        self.load_seconds = time.monotonic() - t0
        self._program_dir, self._shipped = program_dir, (loaded.programs_dir, loaded.program_records)
        self.program_record = None  # what this engine's programs were compiled for (convert.py's index)
        self.max_model_len = min(ecfg.max_model_len or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings)
        if ecfg.max_model_len and ecfg.max_model_len > self.cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({ecfg.max_model_len}) exceeds the model's max_position_embeddings ({self.cfg.max_position_embeddings})"
            )
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids if self.tokenizer else self.cfg.eos_token_ids)

        self.spec = ecfg.speculative_config
        self.draft_model_name = None  # the draft model's checkpoint (speculative decoding's draft_model method)
        draft = self._load_draft(mesh) if self.spec is not None and self.spec.model is not None else None
        kv_dtype = self.dtype if ecfg.kv_cache_dtype == "auto" else (
            KV_CACHE_8BIT.get(ecfg.kv_cache_dtype) or np.dtype(ecfg.kv_cache_dtype))
        self.kv_scales = self._kv_scales(loaded.params, kv_dtype) if is_8bit(kv_dtype) else None
        page_bytes = device_page_bytes(self.cfg, ecfg.page_size, kv_dtype, mesh)  # one device's share of a page
        if draft is not None:  # the draft model's cache has as many pages: a page id holds both models' K/V
            if draft.eagle and is_8bit(kv_dtype):
                raise ValueError(f"kv_cache_dtype {ecfg.kv_cache_dtype!r}: an 8-bit cache is not calibrated for an "
                                 f"EAGLE head yet; use speculative method {self.spec.method} with kv_cache_dtype 'auto'")
            draft_scales = (self._kv_scales(draft.params, kv_dtype, draft.cfg) if is_8bit(kv_dtype) else None)
            page_bytes += device_page_bytes(draft.cfg, ecfg.page_size, kv_dtype, mesh)
        self.num_pages = multihost.agree_min(self._num_pages(page_bytes))  # every process of an engine the same
        # Compile against the cache's shapes before allocating it: XLA's autotuner (on a cold compilation cache)
        # needs device memory for its trial runs, which a cache filling the device would leave it without.
        # Then check that the largest step's temporaries fit beside the cache; if not, shrink it once and recompile.
        self.compile_seconds = self.lower_seconds = 0.0  # lowering: tracing the programs to StableHLO, serial
        for attempt in range(2):
            abstract_kv = init_kv_cache(self.cfg, self.num_pages, ecfg.page_size, kv_dtype, mesh, abstract=True,
                                        scales=self.kv_scales)
            if draft is not None:
                draft.kv = init_kv_cache(draft.cfg, self.num_pages, ecfg.page_size, kv_dtype, mesh, abstract=True,
                                         scales=draft_scales)
                if draft.eagle:
                    draft.feats = self._eagle_feats(draft, mesh, abstract=True)
            self.runner = ModelRunner(self.cfg, ecfg, loaded.params, abstract_kv, self.num_pages, self.max_model_len,
                                      draft)
            store = self._executable_store(loaded.params, abstract_kv, mesh, draft)
            learned = adaptive_buckets.load_learned(store.path if store else None) if ecfg.adaptive_buckets else []
            self.runner.buckets = sorted(set(self.runner.buckets) | set(learned))  # an earlier run's, compiled now
            self.runner.compile_all(ecfg.show_progress, store)
            self.compile_seconds += self.runner.compile_seconds
            self.lower_seconds += self.runner.lower_seconds
            short = self._memory_shortfall((abstract_kv, draft.kv) if draft is not None else abstract_kv)
            if short <= 0:
                break
            if attempt:
                print(f"warning: the step programs may still need {short / _GiB:.2f} GiB more device memory than the "
                      "KV cache leaves; lower memory_fraction or kv_cache_memory if a step runs out of memory",
                      file=sys.stderr, flush=True)
                break
            if ecfg.num_pages:
                raise ValueError(f"num_pages: {ecfg.num_pages} pages leave the step programs {short / _GiB:.2f} GiB "
                                 "short of device memory; ask for fewer")
            pages = self.num_pages - -(-short // page_bytes)
            print(f"note: the step programs need {short / _GiB:.2f} GiB more device memory than the KV cache leaves: "
                  f"{self.num_pages} -> {pages} pages, compiling again", file=sys.stderr, flush=True)
            self.num_pages = self._check_pages(pages, "after leaving room for the step programs; lower "
                                               "max_num_batched_tokens or max_num_seqs, or free device memory")
        per_device = f", {self.weight_device_bytes / _GiB:.2f} GiB per device" if mesh is not None else ""
        self._log(
            f"KV cache: {self.num_pages} pages x {ecfg.page_size} tokens = {self.num_pages * ecfg.page_size:,} tokens, "
            f"{self.num_pages * page_bytes / _GiB:.2f} GiB per device "
            f"({np.dtype(kv_dtype).name}{self._kv_note(kv_dtype)}); "
            f"max_model_len {self.max_model_len}, weights {np.dtype(self.dtype).name} on {backend}, "
            f"{self.weight_bytes / _GiB:.2f} GiB{per_device} "
            f"({'quantized: ' + self.quantization if self.quantization != 'none' else 'not quantized'})"
        )
        batch_proposer = dict(propose_batch=self.runner.propose_drafts, draft_len=self._draft_len) if draft else {}
        self.scheduler = Scheduler(self.num_pages, ecfg.page_size, ecfg.max_num_seqs, ecfg.token_budget, self.max_model_len,
                                   ecfg.enable_prefix_caching, propose=self._propose if self.spec and not draft else None,
                                   max_spec_tokens=max(ecfg.verify_sizes(), default=0),
                                   mixed_step_token_budget=ecfg.mixed_step_tokens(jax.default_backend()),
                                   **batch_proposer)
        # steps carry drafts only while at most this many requests run; others may run behind the host (async)
        self._max_spec_batch = self.spec.max_speculating_batch(backend) if self.spec else -1
        self.num_spec_off_steps = 0  # steps scheduled without drafts because more requests ran
        k = self.spec.num_speculative_tokens if self.spec else 0
        self._spec_proposed = [0] * k  # verify runs with a draft at position j (0: the first draft) ...
        self._spec_accepted = [0] * k  # ... and with that draft accepted
        t0 = time.monotonic()
        self.runner.kv = jax.block_until_ready(init_kv_cache(self.cfg, self.num_pages, ecfg.page_size, kv_dtype, mesh,
                                                             scales=self.kv_scales))
        if draft is not None:
            draft.kv = jax.block_until_ready(init_kv_cache(draft.cfg, self.num_pages, ecfg.page_size, kv_dtype, mesh,
                                                           scales=draft_scales))
            if draft.eagle:
                draft.feats = self._eagle_feats(draft, mesh)
        self.kv_seconds = time.monotonic() - t0
        t0 = time.monotonic()
        if ecfg.warms_up(backend):
            self.runner.warm_up()  # first runs are slow on an accelerator: not while serving
        self.warm_up_seconds = time.monotonic() - t0
        r = self.runner
        how = f"loaded {r.programs_loaded} of {len(r.program_seconds)} programs saved whole, " if r.programs_loaded else ""
        self._log(f"compiled {len(r.compiled)} buckets in {self.compile_seconds:.1f} s ({how}lowering "
                  f"{self.lower_seconds:.1f} s): {r.buckets}")
        self.compiles_at_ready = compile_guard.count()
        self._adaptive = None
        if ecfg.adaptive_buckets:
            self._adaptive = {"folder": store.path if store else None, "learned": learned, "future": None}
            self.runner.shape_log = adaptive_buckets.ShapeLog(ecfg.adaptive_window)
        self._groups: dict[str, list[Request]] = {}
        self._prompts: dict[str, str | None] = {}
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._aborted: list[str] = []
        self._inflight: tuple[ScheduledBatch, LaunchedStep] | None = None  # launched, tokens not read yet
        self._launch_fault: Exception | None = None  # raised by the next step() (_launch_early)
        self._proposed: dict[int, tuple] = {}  # id(req) -> (req, its tokens, its n-gram drafts): _drafts_likely
        # Faults inside a step (see step()): the batches a fault would hit, the requests to run alone to find its
        # cause, how many faults came without a step completing, and all of them. fault_hook(batch), if set, runs
        # before each launch: tests inject faults there (raise, sleep for a hung step, or return requests of the
        # batch whose logits become NaN this step); leave it None otherwise.
        self._at_risk: list[ScheduledBatch] = []
        self._suspects: list[Request] = []
        self._faults_in_a_row = 0
        self.num_step_faults = 0
        self.fault_hook = None
        self.last_completed: tuple[tuple[int, int, bool], int] | None = None  # (bucket, real tokens) of the last step read
        self.last_wait_seconds = 0.0  # how long the last step() waited for the device (~0: the host is the bottleneck)
        # A multi-host engine (multihost.py): process 0 sends each device call to the others and watches them; set
        # when one stopped, after which no step runs.
        self.fatal_error: str | None = None
        if multihost.is_multihost() and multihost.is_leader():
            self.runner.channel = multihost.StepChannel()
            self.runner.channel.monitor = multihost.HostMonitor(self._hosts_lost)
            self.runner.channel.monitor.start()
        self._token_text: dict[int, str] = {}
        self._rng = np.random.default_rng(ecfg.seed)
        self._ids = itertools.count()
        # What start-up built (weights, compiled programs, jax's tracing caches: millions of Python objects) lives
        # as long as the engine. Out of the collector's sight, full collections while serving scan only what
        # serving makes: without this, a 1000-request run on an H100 spent 2.3 s of 21 s in the collector, with
        # pauses of up to 192 ms while the device sat idle.
        gc.collect()
        gc.freeze()

    # -- sizing ---------------------------------------------------------------------------------------------

    def _kv_note(self, kv_dtype) -> str:
        if not self.kv_scales:
            return ""
        x = np.dtype(self.dtype).itemsize // np.dtype(kv_dtype).itemsize
        return f", scaled per layer and channel: {x}x the tokens of a {np.dtype(self.dtype).name} cache"

    def _kv_scales(self, params, kv_dtype, cfg: ModelConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
        """An 8-bit cache's scales (model.kv_cache_scales) for the target (or the draft model, cfg): int8 calibrates
        on a text through the model (random ids without a tokenizer)."""
        cfg = cfg or self.cfg
        ids = self.tokenizer.encode(KV_CALIBRATION_TEXT) if self.tokenizer else list(
            np.random.default_rng(0).integers(0, cfg.vocab_size, 96))
        return kv_cache_scales(params, cfg, kv_dtype, ids[: self.max_model_len])

    def _load_draft(self, mesh) -> DraftModel:
        """The proposer of speculative_config with a checkpoint: an EAGLE head (method eagle or eagle3, eagle.py), or
        a draft model (draft_model), loaded as the target is (any checkpoint the engine reads, `quantization` of its own);
        a draft model must share the target's tokenizer: the same vocabulary size and, where both have a tokenizer,
        the same token ids."""
        sc = self.spec
        where = f"speculative_config.model {sc.model!r}"
        if sc.method in ("eagle", "eagle3"):
            if sc.method == "eagle3":
                cfg, params, eagle3 = load_eagle3(sc.model, self.cfg, self.dtype, mesh)
            else:
                (cfg, params), eagle3 = load_eagle(sc.model, self.cfg, self.dtype, mesh), None
            if cfg.max_position_embeddings < self.max_model_len:
                raise ValueError(f"{where}: a context of {cfg.max_position_embeddings} tokens, shorter than "
                                 f"max_model_len ({self.max_model_len})")
            self.draft_model_name = sc.model
            self._log(f"{'EAGLE-3' if eagle3 else 'EAGLE'} head {sc.model}: {weight_bytes(params) / _GiB:.2f} GiB"
                      + (f", reading the target's layers {list(eagle3.aux_layers)}" if eagle3 else ""))
            return DraftModel(cfg, params, None, sc.num_speculative_tokens, eagle=True, eagle3=eagle3)
        ecfg = dataclasses.replace(self.ecfg, quantization=sc.quantization, speculative_config=None)
        try:
            d = load_model(sc.model, ecfg, self.dtype, mesh)
        except (OSError, ValueError) as e:
            raise type(e)(f"speculative_config.model: {e}") from None
        if d.cfg.vocab_size != self.cfg.vocab_size:
            raise ValueError(f"{where}: a vocabulary of {d.cfg.vocab_size} tokens, the target's has "
                             f"{self.cfg.vocab_size}; the draft model must share the target's tokenizer")
        if self.tokenizer is not None and d.tokenizer is not None and (
                self.tokenizer.hf.get_vocab() != d.tokenizer.hf.get_vocab()):
            raise ValueError(f"{where}: its tokenizer's token ids differ from the target's; the draft model must "
                             "share the target's tokenizer")
        if d.cfg.max_position_embeddings < self.max_model_len:
            raise ValueError(f"{where}: a context of {d.cfg.max_position_embeddings} tokens, shorter than "
                             f"max_model_len ({self.max_model_len})")
        self.draft_model_name = d.source
        self._log(f"draft model {d.source}: {d.cfg.num_layers} layers, {weight_bytes(d.params) / _GiB:.2f} GiB "
                  f"({'quantized: ' + d.quantization if d.quantization != 'none' else 'not quantized'})")
        return DraftModel(d.cfg, d.params, None, sc.num_speculative_tokens)

    def _eagle_feats(self, draft: DraftModel, mesh, abstract: bool = False):
        """An EAGLE head's kept features (drafts.py), [max_num_seqs + 1, k + 1, D], whole on every device."""
        shape = (self.ecfg.max_num_seqs + 1, draft.num_speculative_tokens + 1, self.cfg.hidden_size)
        sharding = logical_sharding((None, None, None), mesh)
        if abstract:
            return jax.ShapeDtypeStruct(shape, self.dtype, sharding=sharding)
        x = jax.numpy.zeros(shape, self.dtype)
        return jax.device_put(x, sharding) if sharding is not None else x

    def _executable_store(self, params, abstract_kv, mesh, draft: DraftModel | None = None) -> ExecutableStore | None:
        """Where this configuration's compiled programs are saved whole (with the compilation cache), or None. A
        draft model's config, weights and cache are part of the fingerprint (its programs are saved beside)."""
        if not self.ecfg.use_compilation_cache and self._program_dir is None and self._shipped[0] is None:
            return None
        devices = executables.devices_of(params, mesh)
        cfg = self.cfg
        if draft is not None:
            cfg, params, abstract_kv = (cfg, draft.cfg, draft.eagle3), (params, draft.params), (abstract_kv, draft.kv)
        sources = executables.source_digest()  # read once: the key and the record both name it
        key = executables.fingerprint(cfg, self.ecfg, params, abstract_kv, self.max_model_len, devices, sources)
        self.program_record = convert.program_record(key, devices, self.ecfg, sources)
        if self._program_dir is not None:
            return ExecutableStore(self._program_dir, key, devices)
        shipped_dir, records = self._shipped
        shipped = None
        if shipped_dir is not None and os.path.isdir(shipped_dir):
            shipped = ExecutableStore(shipped_dir, key, devices, read_only=True)
            if not shipped.has_programs():
                print(f"the converted model's compiled programs do not fit this engine, compiling: "
                      f"{convert.program_mismatch(records, self.program_record)}", file=sys.stderr, flush=True)
                shipped = None
        if not self.ecfg.use_compilation_cache:
            return shipped
        return ExecutableStore(self.ecfg.cache_dir(), key, devices, shipped=shipped)

    def _num_pages(self, per_page: int) -> int:
        """Pages that fit the KV budget of one device, `per_page` bytes each there (on a mesh, a page's shard)."""
        e = self.ecfg
        if e.num_pages:
            return self._check_pages(e.num_pages)
        if e.kv_cache_memory is not None:
            return self._check_pages(e.kv_cache_memory // per_page)
        stats = jax.local_devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:  # accelerator: a fraction of what the weights left
            budget = int(e.memory_fraction * stats["bytes_limit"]) - stats.get("bytes_in_use", 0) - _GiB // 2
            return self._check_pages(budget // per_page)
        per_seq = -(-self.max_model_len // e.page_size)  # CPU: every sequence at full length, at most 1 GiB
        return self._check_pages(min(_GiB // per_page, e.max_num_seqs * per_seq))

    def _check_pages(self, n: int, advice: str = "raise kv_cache_memory or lower max_model_len") -> int:
        per_seq = -(-self.max_model_len // self.ecfg.page_size)
        if n < per_seq:
            raise ValueError(
                f"the KV cache ({n} pages) cannot hold one sequence of max_model_len={self.max_model_len} "
                f"({per_seq} pages); {advice}"
            )
        return int(n)

    def _memory_shortfall(self, abstract_kv) -> int:
        """Bytes by which the largest step (XLA's memory analysis, `ModelRunner.peak_step_bytes`) would overrun
        what the KV cache leaves of a device's memory; <= 0 when it fits or the device reports no limit (CPU).
        On a mesh each device holds its shard of the cache."""
        stats = jax.local_devices()[0].memory_stats() or {}
        if "bytes_limit" not in stats:
            return 0
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0) - device_bytes(abstract_kv)
        return self.runner.peak_step_bytes() - free

    # -- requests -------------------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int] | None = None,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Queue a prompt (text, or token ids); returns the request id. Raises ValueError on bad input."""
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        else:
            params = dataclasses.replace(params)  # a copy, checked again: fields may have changed since construction
        if isinstance(priority, bool) or not isinstance(priority, (int, np.integer)):
            raise ValueError(f"priority: expected an integer, got {priority!r}")
        priority = int(priority)
        params.validate_for_model(self.cfg.vocab_size, self.ecfg.max_logprobs, self.ecfg.max_logit_bias)
        text, ids = self._prompt_ids(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens, but the model's context is {self.max_model_len} tokens")
        room = self.max_model_len - len(ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(
                f"max_tokens: this model's maximum context length is {self.max_model_len} tokens; "
                f"the prompt has {len(ids)} and {params.max_tokens} more were requested"
            )
        gid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if gid in self._groups:
            raise ValueError(f"request_id {gid!r} is already in use")
        base_seed = int(self._rng.integers(0, 2**32)) if params.seed is None else params.seed % 2**32
        children = []
        for i in range(params.n):
            seed = base_seed if i == 0 else hash((base_seed, i)) % 2**32  # n > 1: distinct, still reproducible
            children.append(Request(
                request_id=f"{gid}#{i}", prompt_token_ids=ids, params=params, seed=seed,
                max_tokens=params.max_tokens or room, eos_token_ids=self.eos_token_ids,
                priority=priority, group_id=gid, index=i,
            ))
        for r in children:
            if params.prompt_logprobs is not None and r.index == 0:  # the n children share one prompt
                r.prompt_logprobs = [None] * len(ids)
            self.scheduler.add(r)
            if self.tokenizer is not None:
                self._detok[id(r)] = IncrementalDetokenizer(
                    self.tokenizer, ids, params.skip_special_tokens, params.stop or [], params.include_stop_str_in_output,
                    params.min_tokens,
                )
        self._groups[gid] = children
        self._prompts[gid] = text
        return gid

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        if prompt is None or isinstance(prompt, (bytes, dict)) or not hasattr(prompt, "__len__"):
            raise ValueError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt: must not be empty")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt: token ids must be integers")
        bad = [int(t) for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id(s) {bad[:5]} outside the vocabulary [0, {self.cfg.vocab_size})")
        return None, [int(t) for t in ids]

    def abort(self, request_id: str) -> None:
        """Stop a request now; its pages are freed and the next step reports it with finish_reason 'abort'."""
        for r in self._groups.get(request_id, []):
            if not r.is_finished:
                self.scheduler.finish(r, "abort")
                self._aborted.append(request_id)

    def _hosts_lost(self, lost: list[int], why: str) -> None:  # HostMonitor's thread
        self.fatal_error = multihost.lost_message(lost, why)
        print(f"error: {self.fatal_error}", file=sys.stderr, flush=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted) or self._inflight is not None

    # -- the step -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the current state of every request that progressed or finished (FINAL_ONLY
        requests: only of those that finished).

        A fault inside a step (an exception while packing, running or reading it back) is attributed rather than
        fatal: the requests of the steps in flight are rolled back (recomputed later, token for token the same), and
        if more than one could have caused it, each is then run alone (`_suspects`, one step at a time, the others
        held) until the one whose step fails again finishes with finish_reason 'error'; the rest go on. Raises only
        when the device state is lost (the KV cache donated to a step that failed) or faults keep coming without
        progress: then the engine must be rebuilt (serving.AsyncEngine does)."""
        if self.fatal_error is not None:
            raise RuntimeError(self.fatal_error)
        if self._adaptive is not None:
            self._adapt()
        try:
            if self._launch_fault is not None:  # the last step's early launch of this one failed (_launch_early)
                fault, self._launch_fault = self._launch_fault, None
                raise fault
            outputs = self._step()
        except Exception as e:  # noqa: BLE001 - attributed to requests below, or re-raised
            return self._recover(e)
        self._faults_in_a_row = 0
        return outputs

    def _step(self) -> list[RequestOutput]:
        hold, isolating = None, None
        if self._suspects:
            isolating = self._suspects[0]
            hold = {id(r) for r in self.scheduler.running + self.scheduler.waiting if r is not isolating}
        speculate, overlap = self._plan()
        self._at_risk = [self._inflight[0]] if self._inflight else []
        launched = None
        if overlap or self._inflight is None:
            launched = self._launch(hold, speculate, overlap)
        if overlap or self._inflight is not None:
            done, self._inflight = self._inflight, launched
        else:
            done = launched
        if done is None:
            self.last_completed = None
            if isolating is not None:  # it could not be scheduled alone (no pages while the others hold theirs)
                self._suspects.remove(isolating)
            return self._outputs([])
        batch, step = done
        self.last_completed = (step.bucket, batch.num_tokens)
        t_wait = time.perf_counter()
        result = step.result()  # waits for this step only; the next one is already queued behind it
        self.last_wait_seconds = time.perf_counter() - t_wait
        # Its device arrays go before the next launch (_launch_early): alive, they move where the allocator places
        # the next step's buffers, and a GPU program whose buffers moved re-records its command buffer (CUDA graph)
        # before it runs, ~1 ms of idle device on an 8B model (benchmarks/RESULTS.md, speculation section).
        del done, step, launched
        for i in self._broken_logits(batch, result):
            self._fail(batch.requests[i], "the model's logits were not finite (NaN or inf) at this step")
        appended = self.scheduler.update(batch, self._sampled(batch, result))
        self._at_risk = []
        if self._inflight is None and self.ecfg.async_scheduling and not self._suspects:
            self._launch_early()  # the device runs the next step while the host makes this one's text and outputs
        self._postprocess(batch, appended, result)
        if isolating is not None and (isolating.is_finished or any(
                n and r is isolating for r, n in zip(batch.requests, appended))):
            self._suspects.remove(isolating)  # a token (or its end) alone: it was not the cause
        return self._outputs(batch.requests)

    def _adapt(self) -> None:
        """Adaptive buckets, between two steps: add the programs a background compile has finished; when a window of
        prompt-carrying or decode steps is full, propose buckets for it and start compiling them in a thread (adaptive_buckets.py).
        Steps go on with the buckets compiled so far meanwhile."""
        a, r = self._adaptive, self.runner
        fut = a["future"]
        if fut is not None and fut.done():
            a["future"] = None
            try:
                programs = fut.result()
            except Exception as e:  # noqa: BLE001 - a failed background compile costs only its buckets
                print(f"warning: adaptive buckets not compiled ({type(e).__name__}: {e}); serving goes on with the "
                      "buckets it has", file=sys.stderr, flush=True)
                a["failed"] = True  # no more tries
            else:
                r.add_buckets(programs)
                added = sorted(k for k in programs if len(k) == 3)  # (T, B, decode); the rest: their other programs
                a["learned"] += added
                adaptive_buckets.save_learned(a["folder"], a["learned"])
                self._log(f"adaptive buckets: added {added}")
        room = self.ecfg.adaptive_max_buckets - len(a["learned"])
        if a["future"] is None and room > 0 and not a.get("failed") and r.shape_log.due():
            new = adaptive_buckets.propose(r.shape_log.take(), r.buckets, room)
            if new:
                a["future"] = fut = cf.Future()
                state = r.abstract_state()

                def work():
                    try:
                        fut.set_result(r.compile_buckets(new, state))
                    except BaseException as e:  # noqa: BLE001 - handed to the engine's thread
                        fut.set_exception(e)

                # not a daemon: a process that ends while XLA compiles in it aborts (std::terminate) at exit;
                # the interpreter waits for the compile instead
                threading.Thread(target=work, name="adaptive-buckets", daemon=False).start()

    def _plan(self) -> tuple[bool, bool]:
        """(speculate, overlap) for the next step: may it carry drafts, and may it be launched before the step in
        flight is read (async scheduling). Drafts only while at most `_max_spec_batch` requests run. A step that may
        carry drafts needs every token before it (its drafts follow them), and a step that carries drafts yields a
        run of tokens per sequence that the next must follow: neither overlaps. Nor does any step with a draft model
        (its programs read every input token from the host). n-gram drafts are likely only where the tokens known now
        already end in a repeated n-gram: until then steps overlap."""
        speculate = self.spec is not None and len(self.scheduler.running) <= self._max_spec_batch
        overlap = (self.ecfg.async_scheduling and not self._suspects and self.runner.draft is None
                   and not (self._inflight is not None and self._inflight[0].num_drafts)
                   and not (speculate and self._drafts_likely()))
        return speculate, overlap

    def _launch(self, hold: set[int] | None, speculate: bool, overlap: bool) -> tuple[ScheduledBatch, LaunchedStep] | None:
        """Schedule the next step (with drafts when it may carry them and runs synchronously) and launch it; None when
        nothing is to run. Its batch is at risk from here (`_recover`)."""
        batch = self.scheduler.schedule(hold=hold, drafts=speculate and not overlap)
        self.num_spec_off_steps += self.spec is not None and not speculate
        if not len(batch):
            return None
        self._at_risk.append(batch)
        self._admit(batch)
        inp = self.runner.prepare(batch)
        poisoned = self.fault_hook(batch) if self.fault_hook is not None else None
        return batch, self.runner.launch(*inp, nan_rows=self._rows_of(batch, poisoned or ()))

    def _launch_early(self) -> None:
        """With nothing in flight after a synchronous step's tokens are appended (it carried drafts, or ran with a draft
        model), launch the next step at once rather than after this step's postprocessing (detokenizing, stop strings,
        outputs): the host does those while the device runs it. A request that a stop string (or a failure of its
        text) ends there then has a row in a step in flight, discarded when read, as under async scheduling. A fault
        while launching is raised by the next `step()`, after this one's outputs are returned."""
        try:
            self._inflight = self._launch(None, *self._plan())
        except Exception as e:  # noqa: BLE001 - attributed by the next step
            self._launch_fault = e

    def _recover(self, exc: Exception) -> list[RequestOutput]:
        """A step raised: roll back the requests of the steps in flight and attribute the fault (see `step`)."""
        at_risk = list({id(r): r for b in self._at_risk for r in b.requests if not r.is_finished}.values())
        self._at_risk, self._inflight = [], None
        self._faults_in_a_row += 1
        self.num_step_faults += 1
        state = [self.runner.kv, self.runner.sstate, self.runner.page_table]
        lost = any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state))
        if not at_risk or lost or self._faults_in_a_row > MAX_FAULTS_IN_A_ROW:
            raise exc  # nothing to attribute it to, the cache is gone, or no progress: the engine must be rebuilt
        what = f"{type(exc).__name__}: {exc}"
        for r in at_risk:  # their steps never completed: recompute them (pages freed, history rebuilt on re-admission)
            r.num_pending = 0
            if r in self.scheduler.running:
                self.scheduler.preempt(r)
        if len(at_risk) == 1:
            self._fail(at_risk[0], what)
            if at_risk[0] in self._suspects:
                self._suspects.remove(at_risk[0])
        else:
            print(f"warning: a step failed ({what}); running its {len(at_risk)} requests one at a time to find the "
                  f"cause", file=sys.stderr, flush=True)
            self._suspects += [r for r in at_risk if r not in self._suspects]
        return self._outputs(at_risk)

    def _fail(self, req: Request, what: str) -> None:
        """End req with finish_reason 'error' (its pages freed); the others go on."""
        print(f"warning: request {req.request_id} failed: {what}", file=sys.stderr, flush=True)
        req.error = what
        self.scheduler.finish(req, "error")

    @staticmethod
    def _rows_of(batch: ScheduledBatch, reqs) -> list[int]:
        """The sampled rows of these requests of the batch (a verifying request has 1 + its drafts)."""
        want = {id(r) for r in reqs}
        return [r + j for i, r in enumerate(batch.first_rows()) if id(batch.requests[i]) in want
                for j in range(1 + len(batch.drafts[i]) if batch.num_drafts else 1)]

    @staticmethod
    def _broken_logits(batch: ScheduledBatch, result: StepResult) -> list[int]:
        """Requests of the batch (by index) whose logits held a NaN or +inf at a sampled row (the sampler draws -1)."""
        ids = result.token_ids
        if ids.min() >= 0:  # the usual case: one vectorised check
            return []
        return [i for i, r in enumerate(batch.first_rows()) if batch.samples(i)
                and (ids[r : r + 1 + (len(batch.drafts[i]) if batch.num_drafts else 0)] < 0).any()]

    def _sampled(self, batch: ScheduledBatch, result: StepResult) -> list[int | list[int] | None]:
        """Per request: its sampled token (None: none this step), or for a verifying request the tokens it yields:
        its drafts while each equals the token sampled at its position, then the first sampled token that differs
        or the one after the last draft (spec_decode.accept_greedy)."""
        ids = result.token_ids
        if not batch.num_drafts:
            return [int(ids[i]) if batch.samples(i) else None for i in range(len(batch))]
        out = []
        for i, r in enumerate(batch.first_rows()):
            drafts = batch.drafts[i]
            if batch.requests[i].is_finished:  # ended while the step ran (_launch_early): its row is discarded
                out.append(None)
                continue
            if not drafts:
                out.append(int(ids[r]) if batch.samples(i) else None)
                continue
            run = accept_greedy(drafts, ids[r : r + len(drafts) + 1].tolist())
            for j in range(len(drafts)):
                self._spec_proposed[j] += 1
                self._spec_accepted[j] += j < len(run) - 1
            out.append(run)
        return out

    def _speculates(self, req: Request) -> bool:
        """No drafts for a request with repetition, presence or frequency penalties, or short of min_tokens: those
        adjust each position's logits by the tokens before it (penalty history) or by its index (stop tokens masked),
        which a verify step's rows do not see per position; such requests decode one token a step in the same
        batches."""
        p = req.params
        return not (p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                    or len(req.output_token_ids) < p.min_tokens)

    def _draft_len(self, req: Request) -> int:
        """How many tokens the draft model proposes for req's next decode (the scheduler asks; see _speculates). An
        EAGLE head proposes from the feature it predicted in req's last step: none when req was not in it."""
        if not self._speculates(req):
            return 0
        if self.runner.draft.eagle and self.runner.eagle_feature(req) is None:
            return 0
        return self.spec.num_speculative_tokens

    def _drafts_likely(self) -> bool:
        """Whether a running decode would get n-gram drafts from the tokens the host knows now (those of a step in
        flight not yet among them): the next token usually continues the match, so the next step should be
        scheduled after this one's tokens are read, with drafts. The drafts found are kept for the scheduler, which
        asks `_propose` for the same requests next when nothing is in flight."""
        self._proposed = {}
        for r in self.scheduler.running:
            if r.num_computed_tokens >= r.num_prompt_tokens:
                drafts = self._propose(r)
                self._proposed[id(r)] = (r, r.num_tokens, drafts)
                if drafts:
                    return True
        return False

    def _propose(self, req: Request) -> list[int]:
        """n-gram drafts for req's next tokens (the scheduler asks for each decode; see _speculates)."""
        sc = self.spec
        known = self._proposed.pop(id(req), None)
        if known is not None and known[0] is req and known[1] == req.num_tokens:  # found by _drafts_likely
            return known[2]
        if not self._speculates(req):
            return []
        return ngram_propose(req.prompt_token_ids + req.output_token_ids, sc.num_speculative_tokens,
                             sc.prompt_lookup_max, sc.prompt_lookup_min)

    def _admit(self, batch: ScheduledBatch) -> None:
        """Requests starting on a fresh sampler row get their logit bias / min_tokens stop set installed, and
        the tokens of their prefix-cache hit (which never enter a step) put into their penalty history."""
        for req, reset, start in zip(batch.requests, batch.reset, batch.start):
            p = req.params
            if reset and start > 0:
                self.runner.seed_history(req, start)
            if reset and (p.logit_bias or p.min_tokens > 0):
                self.runner.set_row(req.slot, p.logit_bias, req.stop_ids)

    def _postprocess(self, batch: ScheduledBatch, appended: list[int], result: StepResult) -> None:
        """Logprobs and text of the tokens each request appended this step (several for a verifying request, each
        from its own sampled row), in order; a stop string drops the tokens after the one that completes it."""
        if result.prompt is not None:
            self._prompt_logprobs(batch, result.prompt)
        rows = batch.first_rows()
        for i, (req, n) in enumerate(zip(batch.requests, appended)):
            first = len(req.output_token_ids) - n  # output index of the step's first token
            try:
                for j in range(n):
                    if self._add_token(req, req.output_token_ids[first + j], result, rows[i] + j, last=j == n - 1):
                        del req.output_token_ids[first + j + 1 :]
                        break
            except Exception as e:  # noqa: BLE001 - this request's text or logprobs: it alone fails
                self._fail(req, f"{type(e).__name__}: {e}")

    def _add_token(self, req: Request, tok: int, result: StepResult, row: int, last: bool) -> bool:
        """One appended token's logprobs (sampled row `row`) and text; True when a stop string ends req with it.
        last: the step's last token of req, the one the scheduler's stop rules (if any) ended it with."""
        if req.params.logprobs is not None:
            entry = self._logprobs(result, row, tok, req.params.logprobs)
            req.output_logprobs.append(entry)
            req.cumulative_logprob += entry[tok].logprob
        detok = self._detok.get(id(req))
        if detok is None or req.finish_reason == "abort":
            return False
        stopped_by_token = last and req.finish_reason == "stop" and isinstance(req.stop_reason, int)
        if not stopped_by_token or req.params.include_stop_str_in_output:
            detok.add([tok])
        if detok.stopped_by is not None:
            if not req.is_finished:
                self.scheduler.finish(req, "stop", detok.stopped_by)
            elif not last or req.finish_reason == "length":
                # a stop string completed before the token a stop rule ended req with (dropped), or with the token
                # that reached max_tokens (or the context): a stop, as vLLM
                req.finish_reason, req.stop_reason = "stop", detok.stopped_by
            return True
        if last and req.is_finished:
            detok.flush()
        return False

    def _logprobs(self, result: StepResult, i: int, tok: int, k: int) -> dict[int, Logprob]:
        """The sampled token's logprob, then the top-k alternatives (rank 1 = most likely)."""
        top = list(zip(result.top_ids[i][:k].tolist(), result.top_logprobs[i][:k].tolist()))
        return self._logprob_entry(tok, float(result.logprobs[i]), int(result.ranks[i]), top)

    def _logprob_entry(self, tok: int, logprob: float, rank: int | None, top: list[tuple[int, float]]) -> dict[int, Logprob]:
        """{token: its Logprob} followed by the top alternatives [(id, logprob)], most likely first."""
        out = {tok: Logprob(logprob, rank, self._decode_token(tok))}
        for j, (t, lp) in enumerate(top):
            out.setdefault(t, Logprob(float(lp), j + 1, self._decode_token(t)))
        return out

    def _prompt_logprobs(self, batch: ScheduledBatch, plp) -> None:
        """Store, per prompt position, the logprob of its token given the tokens before it (+ top-k)."""
        t = 0
        for req, n, start in zip(batch.requests, batch.num_new_tokens, batch.start):
            k = req.params.prompt_logprobs
            if k is not None and req.prompt_logprobs is not None:
                for row in range(t, t + min(n, req.num_prompt_tokens - 1 - start)):
                    pos = start + 1 + row - t  # the prompt token this row predicts
                    top = list(zip(plp.top_ids[row][:k].tolist(), plp.top_logprobs[row][:k].tolist()))
                    req.prompt_logprobs[pos] = self._logprob_entry(
                        req.prompt_token_ids[pos], float(plp.logprobs[row]), int(plp.ranks[row]), top)
            t += n

    def _decode_token(self, tok: int) -> str | None:
        """One token's text (for logprobs), decoded once per token id."""
        if self.tokenizer is None:
            return None
        text = self._token_text.get(tok)
        if text is None:
            text = self._token_text[tok] = self.tokenizer.decode([tok], skip_special_tokens=False)
        return text

    def _outputs(self, requests: list[Request]) -> list[RequestOutput]:
        # A finished request's discarded row (async scheduling) must not report a new group reusing its id.
        live = [r.group_id for r in requests if any(c is r for c in self._groups.get(r.group_id, ()))]
        gids = list(dict.fromkeys(live + self._aborted))
        self._aborted = []
        outs = []
        for gid in gids:
            children = self._groups.get(gid)
            if children is None:
                continue
            done = all(r.is_finished for r in children)
            if not done and children[0].params.output_kind is RequestOutputKind.FINAL_ONLY:
                continue
            out = self._group_output(gid, children, done)
            if out.outputs or done:  # DELTA: nothing new (a prompt chunk, a recompute) is no output
                outs.append(out)
            if done:
                del self._groups[gid]
                self._prompts.pop(gid, None)
                for r in children:
                    self._detok.pop(id(r), None)
        return outs

    def _group_output(self, gid: str, children: list[Request], done: bool) -> RequestOutput:
        """done: every child has finished. One pass over the children (a RequestOutput per running request per
        step is the host's main per-row cost in CUMULATIVE mode). DELTA: each child's output holds what it added
        since the last one, and a child with nothing new (and no finish to report) is left out."""
        delta = children[0].params.output_kind is RequestOutputKind.DELTA
        comps, scheduled, first_token, finished, generated = [], [], [], [], 0
        for r in children:
            if r.first_scheduled_time:
                scheduled.append(r.first_scheduled_time)
            if r.first_token_time:
                first_token.append(r.first_token_time)
            finished.append(r.finished_time or 0)
            generated += len(r.output_token_ids)
            detok = self._detok.get(id(r))
            want_lps = r.params.logprobs is not None
            if delta:
                n0, p0 = r.num_reported_tokens, r.num_reported_pieces
                ids = r.output_token_ids[n0:]
                pieces = detok.num_pieces if detok else 0
                if not ids and pieces == p0 and (r.finish_reported or not r.is_finished):
                    continue
                text = detok.text_since(p0) if detok else ""
                lps = r.output_logprobs[n0:] if want_lps else None
                r.num_reported_tokens, r.num_reported_pieces = len(r.output_token_ids), pieces
                r.finish_reported = r.is_finished
            else:
                ids, text = list(r.output_token_ids), detok.text if detok else ""
                lps = r.output_logprobs if want_lps else None
            comps.append(CompletionOutput(
                index=r.index, text=text, token_ids=ids, finish_reason=r.finish_reason, stop_reason=r.stop_reason,
                logprobs=lps, cumulative_logprob=r.cumulative_logprob if want_lps else None,
            ))
        first = children[0]
        metrics = RequestMetrics(
            arrival_time=first.arrival_time,
            first_scheduled_time=min(scheduled) if scheduled else None,
            first_token_time=min(first_token) if first_token else None,
            finished_time=max(finished) if done else None,
            num_prompt_tokens=first.num_prompt_tokens,
            num_generated_tokens=generated,
            longest_output=max(len(r.output_token_ids) for r in children),
        )
        prompt_lps = first.prompt_logprobs
        if delta and prompt_lps is not None:
            # Once, complete: with the output that carries the first child's first token (its whole prompt has been
            # computed and read back by then), or with its finish (an abort may come before).
            ready = not first.prompt_logprobs_reported and (first.output_token_ids or first.is_finished)
            prompt_lps = list(prompt_lps) if ready else None
            first.prompt_logprobs_reported |= bool(ready)
        return RequestOutput(gid, self._prompts.get(gid), first.prompt_token_ids, comps, done, metrics, prompt_lps,
                             error=next((r.error for r in children if r.error), None))

    # -- introspection --------------------------------------------------------------------------------------

    @property
    def num_compiles_since_ready(self) -> int:
        """Compilations in this process since this engine became ready (other engines built since count too)."""
        return compile_guard.count() - self.compiles_at_ready

    def stats(self) -> dict:
        s = self.scheduler
        return {
            "running": len(s.running), "waiting": len(s.waiting), "pages_used": s.allocator.num_used,
            "pages_total": self.num_pages, "preemptions": s.num_preemptions,
            "pages_cached": s.allocator.num_cached, "pages_evictable": s.allocator.num_evictable,
            "prefix_cache_evictions": s.allocator.num_evictions,
            "prefix_cache_queries": s.prefix_cache_queries, "prefix_cache_hits": s.prefix_cache_hits,
            "prefix_cache_hit_rate": s.prefix_cache_hit_rate,
            "step_faults": self.num_step_faults,
            # padding: tokens the steps' buckets computed beyond the tokens scheduled, as a share of the computed ones
            "padding_share": 1 - self.runner.tokens_scheduled / max(1, self.runner.tokens_computed),
            "adaptive_buckets_added": len(self._adaptive["learned"]) if self._adaptive else 0,
            **self.spec_stats(),
        }

    def spec_stats(self) -> dict:
        """Speculative decoding since start: draft tokens proposed and accepted, and per draft position (0: the
        first draft of a run) how often one was proposed, accepted, and the acceptance rate. Zeros when off."""
        proposed, accepted = sum(self._spec_proposed), sum(self._spec_accepted)
        return {
            "spec_verify_runs": self._spec_proposed[0] if self._spec_proposed else 0,
            "spec_off_steps": self.num_spec_off_steps,
            "spec_draft_tokens": proposed, "spec_accepted_tokens": accepted,
            "spec_acceptance_rate": accepted / proposed if proposed else 0.0,
            "spec_proposed_per_position": list(self._spec_proposed),
            "spec_accepted_per_position": list(self._spec_accepted),
            "spec_acceptance_per_position": [a / p if p else 0.0 for a, p in zip(self._spec_accepted, self._spec_proposed)],
        }
