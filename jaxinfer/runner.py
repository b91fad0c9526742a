"""The model runner: packs a scheduled batch into a bucket and launches the precompiled step.

A batch exists in three forms, with fixed names:
  1. `ScheduledBatch` (scheduler.py): host `Request` objects and how many tokens each feeds this step.
  2. `StepInput` + `SamplingMetadata` of numpy arrays, padded to a (T, B) bucket by `ModelRunner.prepare`:
     T token rows (all sequences' new tokens concatenated, then padding), B sequence rows (then padding).
  3. The same two on device, each packed into ONE int32 buffer (one host-to-device copy each; `pack` /
     `unpack`), passed to the two precompiled programs of a step:
        forward[(T, B)]        (params, kv, sampler state, page table, input) -> logits [B, V], kv, state, table
        sampler[(B, variant)]  (logits, sampler state, metadata)     -> sampled ids (+ logprobs), state
     The cache, the sampler state and the page table are donated and come back updated. `variant`
     (sampler.variant_for) is chosen on the host per step: greedy / random / full, so a plain greedy step pays
     for an argmax only.
Buckets with T == B are decode buckets: one token per sequence, so the attention op runs its decode
kernel; every other step goes to a bucket with T > B. Padding tokens write to an out-of-bounds cache slot
(dropped) and padding rows have kv_len 0; nothing they compute is read.

B counts sequence rows (attention metadata, page-table rows) and sampled rows (`logits_indices`, the sampling
metadata) alike: one each per sequence. Speculative decoding adds sampled rows: a verifying sequence feeds its
last token and d drafts as d + 1 query tokens of the ragged path and samples at each of them, rows r .. r + d
(`ScheduledBatch.first_rows`), each with its own output position, so each row draws with the key that position
gets without speculation. Such a step needs B >= its sampled rows: it goes to a mixed bucket, a verify bucket
(V, V) where no other holds it (config.EngineConfig.verify_sizes).

The page table lives on the device, one row of max_model_len / page_size page ids per sampler slot: a step
carries only the page ids appended since the last step (at most T / page_size + B of them; more, after a long
prefix-cache hit or a re-admission, go in before the step through a small program) and each row's slot, and
its program gathers the rows it needs. So a step's host work and transfer do not grow with max_model_len
(a [B, max_model_len / page_size] table per step: 17 MB at 512 rows and a 131,072-token context).

`launch` returns at once (the device runs behind the host) and starts copying the sampled ids back; the
result is read later with `LaunchedStep.result()`. A decode whose input token was sampled by a step still
in flight gets token id -1 here: the forward program reads it from the sampler state's `last_token` row
of its sequence, so the host never waits for a step before launching the next.

A request that starts from a prefix-cache hit feeds only the tokens after the hit, so the sampler history
(prompt_mask / output_counts, which `update_history` builds from the tokens entering a step) would miss the
cached ones; `seed_history` writes them into the request's fresh sampler row before its first chunk runs,
and that chunk then does not reset the row. Penalties see the same history as without caching.

A draft model or an EAGLE head (speculative decoding, spec_decode.py) adds two kinds of programs (drafts.py): one
that runs every step's input through the proposer too (launched after the target's step), and one that proposes the
drafts of a step's speculating rows before it is scheduled. A draft model's proposal rewrites the token before the
last, so a step whose every row carries drafts leaves its draft forward out: the proposals wrote all but the last
draft, and the next proposal writes that one (when it is accepted; else it is past the accepted tokens and written
once reached). A row that runs without drafts right after such a step has that token written first (`_fill_drafts`).

Every program is compiled ahead of time (`lower().compile()`) in `compile_all`; a step only looks them up,
so nothing compiles while serving.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxinfer import compile_guard
from jaxinfer import sampler as sampling
from jaxinfer.attention import make_attention_fn
from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.executables import program_name
from jaxinfer.drafts import (DraftModel, ProposeInput, make_draft_forward_fn, make_eagle_propose_fn,
                             make_eagle_step_fn, make_propose_fn)
from jaxinfer.model import SHARDING_RULES, AttentionMetadata, KVCache, Params, compute_logits, forward
from jaxinfer.request import Request
from jaxinfer.scheduler import ScheduledBatch
from jaxinfer.step_input import StepInput, abstract, pack, set_pages, unpack


def make_forward_fn(cfg: ModelConfig, attn_fn, template: StepInput, replicated=None, aux_layers: tuple[int, ...] = (),
                    logits_sharding=None):
    """The model part of one step, as one pure function over a packed input. replicated: on a mesh, the sharding
    its hidden states leave with (whole on every device), and its logits unless `logits_sharding` is given (as the
    sampler programs take them). aux_layers (an EAGLE-3 head's): a sixth output, the residual stream entering those
    layers [T, 3D] (model.forward)."""

    def forward_step(params: Params, kv: KVCache, sstate, table, flat):
        inp = unpack(flat, template)
        table = set_pages(table, inp.new_slot, inp.new_col, inp.new_page)
        attn = dataclasses.replace(inp.attn, page_tables=jnp.take(table, inp.row_slot, axis=0))
        S = sstate.last_token.shape[0]
        # A decode input sampled by the step before (not yet seen by the host) comes from the device.
        last = jnp.take(sstate.last_token, jnp.minimum(inp.token_slot, S - 1))
        token_ids = jnp.where(inp.token_ids < 0, last, inp.token_ids)
        with jax.named_scope("history"):
            sstate = sampling.update_history(sstate, inp.token_slot, token_ids, inp.is_prompt, inp.reset_slot)
        h, kv, *aux = forward(params, cfg, token_ids, inp.positions, kv, attn, attn_fn, aux_layers)  # [T, D]
        with jax.named_scope("logits"):
            logits = compute_logits(params, cfg, h[inp.logits_indices])  # [B, V]
        if replicated is not None:
            h, aux = jax.lax.with_sharding_constraint((h, aux), replicated)
            logits = jax.lax.with_sharding_constraint(logits, logits_sharding or replicated)
        return logits, h, kv, sstate, table, *aux

    return forward_step


# XLA options for the sampler programs alone (e.g. {"xla_gpu_graph_min_graph_size": 10**6}: no CUDA graph), for
# measuring what their call costs the host between serial steps (benchmarks/spec_host_phases.py --sampler-options).
SAMPLER_COMPILER_OPTIONS: dict = {}


def compiler_options_for(key) -> dict:
    """The XLA options a program is compiled with (its key as in `ModelRunner._programs`): {} but for samplers."""
    return SAMPLER_COMPILER_OPTIONS if isinstance(key, tuple) and len(key) == 2 and key[1] in sampling.VARIANTS else {}


PROMPT_LOGPROBS_ROWS = 256  # token rows per block of the prompt-logprobs program: bounds its [rows, V] float32 temporaries
SET_PAGES_ROWS = 1024  # page-table entries per call of the program that takes what a step's input has no room for


def make_prompt_logprobs_fn(cfg: ModelConfig, max_logprobs: int, block: int = PROMPT_LOGPROBS_ROWS):
    """Logprobs of the next prompt token at every token row: (params, h [T, D], targets [T]) -> logprob [T],
    rank [T] (1 = most likely), top-K logprobs and ids [T, K]. Rows with target -1 are not read.
    Rows go through in blocks of `block`, so a 2048-token step needs [block, V] of logits at a time, not [T, V]
    (6 GB of temporaries for an 8B Llama-3 at T = 2048)."""

    def one_block(params: Params, h, targets):
        lp = jax.nn.log_softmax(compute_logits(params, cfg, h), axis=-1)  # [block, V]
        target_lp = jnp.take_along_axis(lp, jnp.maximum(targets, 0)[:, None], axis=-1)  # [block, 1]
        rank = 1 + jnp.sum(lp > target_lp, axis=-1, dtype=jnp.int32)
        if max_logprobs:
            top_lp, top_ids = jax.lax.top_k(lp, max_logprobs)
        else:
            top_lp, top_ids = jnp.zeros((h.shape[0], 0), jnp.float32), jnp.zeros((h.shape[0], 0), jnp.int32)
        return target_lp[:, 0], rank, top_lp, top_ids.astype(jnp.int32)

    def prompt_logprobs(params: Params, h, targets):
        T = h.shape[0]
        if T <= block:
            return one_block(params, h, targets)
        n = -(-T // block)
        h = jnp.pad(h, ((0, n * block - T), (0, 0))).reshape(n, block, h.shape[1])
        targets = jnp.pad(targets, (0, n * block - T), constant_values=-1).reshape(n, block)
        out = jax.lax.map(lambda xs: one_block(params, *xs), (h, targets))
        return tuple(x.reshape(n * block, *x.shape[2:])[:T] for x in out)

    return prompt_logprobs


def make_sampler_fn(variant: str, max_logprobs: int, template):
    def sample_step(logits, sstate, flat):
        return sampling.sample(logits, unpack(flat, template), sstate, variant=variant, max_logprobs=max_logprobs)

    return sample_step


@dataclass
class StepResult:
    token_ids: np.ndarray  # [B]
    logprobs: np.ndarray | None  # [B]
    top_ids: np.ndarray | None  # [B, K]
    top_logprobs: np.ndarray | None  # [B, K]
    prompt: "PromptLogprobs | None" = None  # by token row, for requests that asked for prompt logprobs
    ranks: np.ndarray | None = None  # [B] rank of each sampled token (1 = most likely)


@dataclass
class PromptLogprobs:
    """Per token row of a step: the logprob and rank of the next prompt token, and the top-K alternatives."""

    logprobs: np.ndarray  # [T]
    ranks: np.ndarray  # [T]
    top_logprobs: np.ndarray  # [T, K]
    top_ids: np.ndarray  # [T, K]


@dataclass
class LaunchedStep:
    """A step on its way through the device; `result()` waits for its sampled ids."""

    out: Any  # sampler.SampleOutput of device arrays
    want_logprobs: bool
    prompt: tuple | None = None  # device arrays of the prompt-logprobs program, when the step ran it
    bucket: tuple[int, int, bool] | None = None  # the (T, B, decode) program it ran

    def result(self) -> StepResult:
        o = self.out
        if self.want_logprobs:
            ids, lp, tid, tlp, rk = jax.device_get((o.token_ids, o.logprobs, o.top_ids, o.top_logprobs, o.ranks))
            res = StepResult(ids, lp, tid, tlp, ranks=rk)
        else:
            res = StepResult(np.asarray(o.token_ids), None, None, None)
        if self.prompt is not None:
            res.prompt = PromptLogprobs(*jax.device_get(self.prompt))
        return res


class ModelRunner:
    def __init__(self, cfg: ModelConfig, ecfg: EngineConfig, params: Params, kv: KVCache, num_pages: int, max_model_len: int,
                 draft: DraftModel | None = None):
        self.cfg, self.ecfg = cfg, ecfg
        self.draft = draft
        self._aux_layers = draft.eagle3.aux_layers if draft is not None and draft.eagle3 is not None else ()
        self.params, self.kv = params, kv
        self.num_pages = num_pages
        self.page_size = ecfg.page_size
        self.max_pages_per_seq = -(-max_model_len // ecfg.page_size)  # M
        self.num_slots = ecfg.max_num_seqs  # S
        # On a mesh (the weights carry NamedShardings), the sampler state and what the sampler programs take are
        # replicated: each device samples the same ids from the same logits.
        mesh = getattr(getattr(params.final_norm, "sharding", None), "mesh", None)
        self._replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        # The logits leave the forward program split over the vocabulary where the mesh divides it, as the lm_head
        # makes them: a greedy step's argmax then reduces on each device and exchanges one (value, id) per row instead
        # of gathering [B, V] floats; XLA's partitioner gathers them only in what needs whole rows (top-k / top-p).
        self._logits_sharding = self._replicated
        vocab_axis = SHARDING_RULES["vocab"]
        if mesh is not None and vocab_axis in mesh.shape and cfg.vocab_size % mesh.shape[vocab_axis] == 0:
            self._logits_sharding = NamedSharding(mesh, PartitionSpec(None, vocab_axis))
        self.sstate = sampling.init_sampler_state(self.num_slots, cfg.vocab_size)
        if self._replicated is not None:
            self.sstate = jax.device_put(self.sstate, self._replicated)
        self.buckets = ecfg.buckets()  # (T, B, decode); adaptive buckets are added to it (add_buckets)
        self.shape_log = None  # adaptive_buckets.ShapeLog: prompt-carrying steps' shapes, when adaptive buckets are on
        self.tokens_scheduled = self.tokens_computed = 0  # a step's tokens, and its bucket's (padding: the difference)
        self._attn_fn = make_attention_fn(cfg, ecfg.attention_impl, ecfg.attention_interpret, mesh)
        # Functions of this runner's own: jax shares lowerings (and compiles) between jits of one function, and a
        # program taken from another engine's compile cannot be told freshly compiled (see executables.py).
        self._set_row = jax.jit(functools.partial(sampling.set_row), donate_argnums=(0,))
        self._prompt_logprobs = jax.jit(make_prompt_logprobs_fn(cfg, ecfg.max_logprobs))
        self._history = jax.jit(functools.partial(sampling.update_history), donate_argnums=(0,))
        self._history_len = self.max_pages_per_seq * self.page_size  # L: a cached prefix is shorter
        # Host copy of every sampler row's page table, kept in step with the requests' page lists (append-only
        # between admission and release), so a step gathers its rows at once instead of converting each list.
        self._page_table = np.zeros((self.num_slots, self.max_pages_per_seq), np.int32)
        self._page_table_src: list[list | None] = [None] * self.num_slots  # the page list each row was copied from
        self._page_table_len = [0] * self.num_slots
        # The device's copy, which the forward programs read and update (module docstring).
        self.page_table = jnp.zeros((self.num_slots, self.max_pages_per_seq), jnp.int32)
        if self._replicated is not None:
            self.page_table = jax.device_put(self.page_table, self._replicated)
        self._set_pages = jax.jit(functools.partial(set_pages), donate_argnums=(0,))
        self._compiled_set_pages = None
        self.compiled: dict[tuple[int, int, bool], Any] = {}  # (T, B, decode) -> forward program
        self.compiled_samplers: dict[tuple[int, str], Any] = {}  # (B, variant) -> sampler program
        self.compiled_prompt_logprobs: dict[int, Any] = {}  # T -> prompt-logprobs program
        self.compiled_draft: dict[tuple[int, int, bool], Any] = {}  # (T, B, decode) -> draft model's forward
        self.compiled_propose: dict[tuple[int, str], Any] = {}  # (B, variant) -> draft model's k decode steps
        if draft is not None:
            self._draft_attn_fn = make_attention_fn(draft.cfg, ecfg.attention_impl, ecfg.attention_interpret, mesh)
        self._eagle_step = None  # an EAGLE head's inputs of the prepared step (prepare -> launch)
        self._draft_plan = (True, [])  # a draft model's (run its forward, requests to fill first) (prepare -> launch)
        self._compiled_set_row = None
        self._compiled_history = None
        self.compile_seconds = self.lower_seconds = 0.0
        self.program_seconds: dict = {}
        self.programs_loaded = 0  # from an executables.ExecutableStore
        self.channel = None  # a multi-host engine's first process: where each device call goes first (multihost.py)
        self._for_draft = None  # a step's (features, sampled ids) until its draft forward runs

    # -- ahead-of-time compilation --------------------------------------------------------------------------

    def _lower_forward(self, T: int, B: int, decode: bool, state=None):
        """state: (kv, sampler state, page table), abstract, for a lowering beside serving (their arrays are donated
        and replaced by every step); default: this runner's."""
        inp = self._empty_input(T, B)[0]
        attn_fn = functools.partial(self._attn_fn, decode=decode)
        fn = jax.jit(make_forward_fn(self.cfg, attn_fn, abstract(inp), self._replicated, self._aux_layers,
                                     self._logits_sharding),
                     donate_argnums=(1, 2, 3))
        flat = jax.ShapeDtypeStruct(pack(inp).shape, jnp.int32)
        kv, sstate, page_table = state or (self.kv, self.sstate, self.page_table)
        return fn.lower(self.params, kv, sstate, page_table, flat)

    @property
    def seq_buckets(self) -> list[int]:
        """The row counts of the buckets: one set of sampler programs each."""
        return sorted({b[1] for b in self.buckets})

    def compile_buckets(self, buckets: list[tuple[int, int, bool]], state) -> dict:
        """Compile the forward programs of new `buckets` in this thread, beside serving: with the prompt-logprobs
        program of a mixed bucket's new T, the sampler programs of a new row count; lowerings counted apart
        (compile_guard.background). Returns {key: program} for `add_buckets`. state: `abstract_state()`, taken on
        the engine's thread (a sampler program's arguments are the logits and metadata: no state of the step's)."""
        out = {}
        with compile_guard.background():
            for b in buckets:
                out[b] = self._lower_forward(*b, state=state).compile()
                T, B, decode = b
                if not decode and T not in self.compiled_prompt_logprobs and ("prompt_logprobs", T) not in out:
                    out[("prompt_logprobs", T)] = self._lower_prompt_logprobs(T).compile()
                for variant in sampling.VARIANTS if B not in self.seq_buckets else ():
                    if (B, variant) not in out:
                        out[(B, variant)] = self._lower_sampler(B, variant).compile(
                            compiler_options=compiler_options_for((B, variant)) or None)
        return out

    def _lower_prompt_logprobs(self, T: int):
        h = jax.ShapeDtypeStruct((T, self.cfg.hidden_size), jnp.dtype(self.params.final_norm.dtype),
                                 sharding=self._replicated)
        return self._prompt_logprobs.lower(self.params, h, jax.ShapeDtypeStruct((T,), jnp.int32))

    def abstract_state(self):
        """(kv, sampler state, page table) as ShapeDtypeStructs with their shardings."""
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                      (self.kv, self.sstate, self.page_table))

    def add_buckets(self, programs: dict) -> None:
        """Make compiled programs (`compile_buckets`) usable: between two steps, on the engine's thread."""
        for key, exe in programs.items():
            if key[0] == "prompt_logprobs":
                self.compiled_prompt_logprobs[key[1]] = exe
            elif len(key) == 2:  # (B, variant): a new row count's sampler program
                self.compiled_samplers[key] = exe
            else:
                self.compiled[key] = exe
        self.buckets = sorted(set(self.buckets) | {k for k in programs if len(k) == 3})

    def _lower_sampler(self, B: int, variant: str):
        md = self._empty_input(B, B)[1]
        fn = jax.jit(make_sampler_fn(variant, self.ecfg.max_logprobs, abstract(md)), donate_argnums=(1,))
        logits = jax.ShapeDtypeStruct((B, self.cfg.vocab_size), jnp.float32, sharding=self._logits_sharding)
        return fn.lower(logits, self.sstate, jax.ShapeDtypeStruct(pack(md).shape, jnp.int32))

    def _lower_draft_forward(self, T: int, B: int, decode: bool):
        d = self.draft
        inp = self._empty_input(T, B)[0]
        attn_fn = functools.partial(self._draft_attn_fn, decode=decode)
        flat = jax.ShapeDtypeStruct(pack(inp).shape, jnp.int32)
        if not d.eagle:
            fn = jax.jit(make_draft_forward_fn(d.cfg, attn_fn, abstract(inp)), donate_argnums=(1,))
            return fn.lower(d.params, d.kv, self.page_table, flat)
        fn = jax.jit(make_eagle_step_fn(d.cfg, self.cfg, attn_fn, abstract(inp), d.eagle3), donate_argnums=(2, 3))
        h = jax.ShapeDtypeStruct((T, self.cfg.hidden_size * (3 if d.eagle3 else 1)),
                                 jnp.dtype(self.params.final_norm.dtype), sharding=self._replicated)
        i32 = lambda n: jax.ShapeDtypeStruct((n,), jnp.int32)  # noqa: E731
        sampled = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=self._replicated)
        return fn.lower(d.params, self.params, d.kv, d.feats, self.page_table, flat, h, sampled, i32(T), i32(T))

    def _lower_propose(self, B: int, variant: str):
        d = self.draft
        tree = self._empty_propose_input(B)
        attn_fn = functools.partial(self._draft_attn_fn, decode=True)
        flat = jax.ShapeDtypeStruct(pack(tree).shape, jnp.int32)
        if not d.eagle:
            fns = (functools.partial(self._draft_attn_fn, decode=False), attn_fn)
            fn = jax.jit(make_propose_fn(d.cfg, fns, abstract(tree), d.num_speculative_tokens, self.page_size,
                                         self.num_pages, variant), donate_argnums=(1, 3))
            return fn.lower(d.params, d.kv, self.sstate, self.page_table, flat)
        fn = jax.jit(make_eagle_propose_fn(d.cfg, attn_fn, abstract(tree), d.num_speculative_tokens, self.page_size,
                                           self.num_pages, variant, d.eagle3, self.cfg.vocab_size),
                     donate_argnums=(2, 4))
        return fn.lower(d.params, self.params, d.kv, self.sstate, self.page_table, flat, d.feats)

    def _programs(self) -> dict:
        """Every program of the engine: key -> a function that traces and lowers it."""
        W, i32, P = self.ecfg.max_logit_bias, jnp.int32, functools.partial
        progs = {b: P(self._lower_forward, *b) for b in self.buckets}
        for B in self.seq_buckets:
            for variant in sampling.VARIANTS:
                progs[(B, variant)] = P(self._lower_sampler, B, variant)
        for T in sorted({b[0] for b in self.buckets}):
            progs[("prompt_logprobs", T)] = P(self._lower_prompt_logprobs, T)
        progs["set_row"] = P(self._set_row.lower, self.sstate, jax.ShapeDtypeStruct((), i32),
                             jax.ShapeDtypeStruct((W,), i32), jax.ShapeDtypeStruct((W,), jnp.float32),
                             jax.ShapeDtypeStruct((W,), i32), jax.ShapeDtypeStruct((), i32))
        n = SET_PAGES_ROWS
        progs["set_pages"] = P(self._set_pages.lower, self.page_table, *[jax.ShapeDtypeStruct((n,), i32)] * 3)
        if self.ecfg.enable_prefix_caching:
            L = self._history_len
            progs["history"] = P(self._history.lower, self.sstate, jax.ShapeDtypeStruct((L,), i32),
                                 jax.ShapeDtypeStruct((L,), i32), jax.ShapeDtypeStruct((L,), jnp.bool_),
                                 jax.ShapeDtypeStruct((1,), i32))
        if self.draft is not None:
            for b in self.buckets:
                progs[("draft", *b)] = P(self._lower_draft_forward, *b)
            for B in self.seq_buckets:
                for variant in sampling.VARIANTS:
                    progs[("draft_propose", B, variant)] = P(self._lower_propose, B, variant)
        return progs

    def compile_all(self, show_progress: bool = True, store=None) -> None:
        """Load what `store` (an `executables.ExecutableStore`) holds, lower the rest (Python, in order) and compile
        them in parallel (XLA releases the GIL), saving each to the store."""
        t0 = time.monotonic()
        programs = self._programs()
        threads = self.ecfg.compile_threads or min(8, os.cpu_count() or 1)
        self.program_seconds = {}  # key -> seconds its load or compile (or persistent-cache load) took in the pool

        def timed(key, fn, *args):
            t = time.monotonic()
            out = fn(*args)
            self.program_seconds[key] = time.monotonic() - t
            return out

        def build(key, low):
            exe, fresh = compile_guard.compile_afresh(low, compiler_options_for(key))
            if store is not None:
                store.save(key, exe, fresh)
            return exe

        with cf.ThreadPoolExecutor(threads) as pool:
            loaded = {}
            if store is not None:
                futures = {key: pool.submit(timed, key, store.load, key) for key in programs}
                loaded = {key: f.result() for key, f in futures.items() if f.result() is not None}
            self.programs_loaded = len(loaded)
            t1 = time.monotonic()
            todo = [k for k in programs if k not in loaded]
            lowered = {k: programs[k]() for k in tqdm(todo, desc="tracing programs", unit="program",
                                                      disable=not show_progress or not todo, leave=False)}
            self.compile_started = time.monotonic()
            self.lower_seconds = self.compile_started - t1
            with tqdm(total=len(lowered), desc="compiling programs", unit="program",
                      disable=not show_progress or not lowered) as bar:
                futures = {pool.submit(timed, key, build, key, low): key for key, low in lowered.items()}
                for fut in cf.as_completed(futures):
                    loaded[futures[fut]] = fut.result()
                    bar.set_postfix_str(program_name(futures[fut]))
                    bar.update()
        for key, exe in loaded.items():
            if key == "set_row":
                self._compiled_set_row = exe
            elif key == "set_pages":
                self._compiled_set_pages = exe
            elif key == "history":
                self._compiled_history = exe
            elif key[0] == "draft":
                self.compiled_draft[key[1:]] = exe
            elif key[0] == "draft_propose":
                self.compiled_propose[key[1:]] = exe
            elif key[0] == "prompt_logprobs":
                self.compiled_prompt_logprobs[key[1]] = exe
            elif isinstance(key[1], str):
                self.compiled_samplers[key] = exe
            else:
                self.compiled[key] = exe
        self.compile_seconds = time.monotonic() - t0

    def peak_step_bytes(self) -> int:
        """Device memory (per device) a step needs beyond its donated inputs, by XLA's memory analysis of the
        compiled programs: the forward's new outputs (logits, hidden states) stay live while the sampler and the
        prompt-logprobs program run, each program's temporaries only while it runs. Largest of each kind."""
        def largest(programs) -> tuple[int, int]:  # (temporaries, new outputs)
            temp = out = 0
            for c in programs:
                m = c.memory_analysis()
                if m is not None:
                    temp = max(temp, m.temp_size_in_bytes)
                    out = max(out, m.output_size_in_bytes - m.alias_size_in_bytes)
            return temp, out

        f_temp, f_out = largest(self.compiled.values())
        if self.draft is not None:  # the draft model's programs run between steps: their temporaries only
            f_temp = max(f_temp, largest(self.compiled_draft.values())[0], sum(largest(self.compiled_propose.values())))
        after = [sum(largest(p)) for p in (self.compiled_samplers.values(), self.compiled_prompt_logprobs.values())]
        return f_out + max(f_temp, *after)

    def warm_up(self) -> None:
        """Run every compiled program once on an all-padding input.

        A program's first run on a GPU costs far more than the next ones (the runtime loads its kernels and
        builds its launch graphs): 20-90 ms per 8B-model program on an H100, idle device time that would
        otherwise land on the first step of each bucket while serving. Padding changes nothing: its tokens
        write to the dropped cache slot and its rows use the sampler state's out-of-range row. One step's
        arrays are live at a time (each seq bucket's samplers run on the first logits of that B)."""
        S, done_b, done_t = self.num_slots, set(), set()
        for T, B, decode in self.buckets:
            inp, md = self._empty_input(T, B)
            logits, h, self.kv, self.sstate, self.page_table, *aux = self.compiled[(T, B, decode)](
                self.params, self.kv, self.sstate, self.page_table, pack(inp))
            if B not in done_b:
                done_b.add(B)
                for variant in sampling.VARIANTS:
                    _, self.sstate = self.compiled_samplers[(B, variant)](logits, self.sstate, pack(md))
            if T not in done_t and T in self.compiled_prompt_logprobs:
                done_t.add(T)
                jax.block_until_ready(self.compiled_prompt_logprobs[T](self.params, h, np.full(T, -1, np.int32)))
            jax.block_until_ready(self.sstate)
            if self.draft is not None:
                self._launch_draft((T, B, decode), pack(inp), aux[0] if aux else h, np.zeros(B, np.int32),
                                   self._eagle_empty(T))
        if self.draft is not None:
            for B, variant in self.compiled_propose:  # all padding rows: nothing written
                self._op_propose(B, variant, pack(self._empty_propose_input(B)))
        self.set_row(S, None, [])  # row S: out of range, dropped
        self._write_pages(*np.array([[S], [0], [0]], np.int32))  # row S: dropped
        if self._compiled_history is not None:
            L = self._history_len
            self._op_history(np.full(L, S, np.int32), np.zeros(L, np.int32), np.zeros(L, np.bool_),
                             np.array([S], np.int32))
        jax.block_until_ready((self.kv, self.sstate, self.page_table))

    # -- packing a batch into a bucket ----------------------------------------------------------------------

    def bucket_for(self, num_tokens: int, num_seqs: int, num_rows: int | None = None) -> tuple[int, int, bool]:
        """The smallest bucket holding the step: a decode bucket iff every sequence feeds one token. num_rows:
        sampled rows, when more than the sequences (speculative decoding's verifying sequences)."""
        decode = num_tokens == num_seqs
        rows = max(num_seqs, num_rows or 0)
        if self.shape_log is not None:
            self.shape_log.record(num_tokens, rows, decode)
        for T, B, d in self.buckets:
            if d == decode and T >= num_tokens and B >= rows:
                self.tokens_scheduled += num_tokens
                self.tokens_computed += T
                return T, B, d
        raise ValueError(f"no bucket holds {num_tokens} tokens and {rows} sequences / sampled rows "
                         f"(buckets: {self.buckets})")

    def _empty_input(self, T: int, B: int) -> tuple[StepInput, sampling.SamplingMetadata]:
        S, P, U = self.num_slots, self.num_pages, self.new_pages_capacity(T, B)
        inp = StepInput(
            token_ids=np.zeros(T, np.int32),
            positions=np.zeros(T, np.int32),
            token_slot=np.full(T, S, np.int32),
            is_prompt=np.zeros(T, np.bool_),
            reset_slot=np.full(B, S, np.int32),
            logits_indices=np.zeros(B, np.int32),
            row_slot=np.zeros(B, np.int32),
            new_slot=np.full(U, S, np.int32),
            new_col=np.zeros(U, np.int32),
            new_page=np.zeros(U, np.int32),
            attn=AttentionMetadata(
                slot_mapping=np.full(T, P * self.page_size, np.int32),
                page_tables=None,
                kv_lens=np.zeros(B, np.int32),
                cu_q_lens=np.zeros(B + 1, np.int32),
                num_seqs=np.zeros((), np.int32),
            ),
        )
        md = sampling.SamplingMetadata(
            temperature=np.zeros(B, np.float32),
            top_k=np.zeros(B, np.int32),
            top_p=np.ones(B, np.float32),
            min_p=np.zeros(B, np.float32),
            seed=np.zeros(B, np.uint32),
            position=np.zeros(B, np.int32),
            repetition_penalty=np.ones(B, np.float32),
            presence_penalty=np.zeros(B, np.float32),
            frequency_penalty=np.zeros(B, np.float32),
            slot=np.full(B, S, np.int32),
            has_bias=np.zeros(B, np.bool_),
            suppress_stop=np.zeros(B, np.bool_),
            num_logprobs=np.full(B, -1, np.int32),
        )
        return inp, md

    def _eagle_empty(self, T: int) -> tuple[np.ndarray, np.ndarray] | None:
        """An EAGLE step's (next_ids, feat_dst) for T padding rows (nothing kept); None without an EAGLE head."""
        if self.draft is None or not self.draft.eagle:
            return None
        return np.zeros(T, np.int32), np.full(T, self.draft.feats.shape[0] * self.draft.feats.shape[1], np.int32)

    def _empty_propose_input(self, B: int) -> tuple[ProposeInput, sampling.SamplingMetadata]:
        S, U = self.num_slots, B * (self.draft.num_speculative_tokens // self.page_size + 2)
        inp = ProposeInput(
            token_ids=np.zeros(B, np.int32),
            prev_ids=np.zeros(B, np.int32),
            feat_src=np.zeros(B, np.int32),
            positions=np.zeros(B, np.int32),
            row_slot=np.zeros(B, np.int32),
            num_drafts=np.zeros(B, np.int32),
            num_seqs=np.zeros((), np.int32),
            new_slot=np.full(U, S, np.int32),  # a row's last token and k drafts span at most k / page_size + 2 pages
            new_col=np.zeros(U, np.int32),
            new_page=np.zeros(U, np.int32),
        )
        return inp, self._empty_input(B, B)[1]

    def new_pages_capacity(self, T: int, B: int) -> int:
        """Page-table entries a (T, B) step's input carries: a step appends at most T / page_size + B pages
        (each sequence's new tokens may start a page part-way)."""
        return T // self.page_size + B

    def _sync_page_table(self, req: Request) -> int:
        """Bring req's row of the host page table up to date with req.pages; returns the first column written
        (the device's row needs columns [that, len(req.pages)) too)."""
        pages, slot = req.pages, req.slot
        done = self._page_table_len[slot]
        if self._page_table_src[slot] is not pages or len(pages) < done:  # a new list: (re)admitted, or another request
            self._page_table[slot] = 0  # columns past its pages are never read; cleared for the host's own reads
            self._page_table_src[slot], done = pages, 0
        self._page_table[slot, done : len(pages)] = pages[done:]  # the pages appended since the last sync
        self._page_table_len[slot] = len(pages)
        return done

    def host_page_tables(self, inp: StepInput) -> np.ndarray:
        """The [B, M] page tables of a prepared step, from the host's copy (what its program gathers on the device)."""
        return self._page_table[inp.row_slot]

    def _write_pages(self, slots: np.ndarray, cols: np.ndarray, pages: np.ndarray) -> None:
        """Set device page-table entries now (queued before the next step), SET_PAGES_ROWS per call."""
        n = SET_PAGES_ROWS
        m = -(-len(slots) // n) * n  # whole calls; the padding entries' row S is dropped
        blocks = [np.concatenate([x, np.full(m - len(x), fill, np.int32)]).reshape(-1, n)
                  for x, fill in ((slots, self.num_slots), (cols, 0), (pages, 0))]
        for s, c, p in zip(*blocks):
            self._op("set_pages", s, c, p)

    def prepare(self, batch: ScheduledBatch) -> tuple[StepInput, sampling.SamplingMetadata, tuple, np.ndarray | None]:
        """The step's input and sampling metadata padded to its bucket, the bucket, and the prompt-logprob
        targets: for each token row, the prompt token after it when its request asked for prompt logprobs
        (else -1), or None when no row needs them. The page ids the device's table lacks go in the input, or,
        beyond its room, to the device at once (`_write_pages`): a prepared step must then be launched."""
        bucket = T, B, _ = self.bucket_for(batch.num_tokens, len(batch), batch.num_rows)
        inp, s = self._empty_input(T, B)
        a = inp.attn
        targets = None
        t = 0
        r = 0  # sampled row: the sequence's row b, plus the drafts of the sequences before it
        S = self.page_size
        new_slot, new_col, new_page = [], [], []  # page-table entries the device has not seen
        eagle = self._eagle_empty(T)  # an EAGLE head's (next_ids, feat_dst), and the slots whose features it keeps
        owners = {}
        for b, (req, n, start) in enumerate(zip(batch.requests, batch.num_new_tokens, batch.start)):
            drafts = batch.drafts[b] if batch.num_drafts else None
            known = req.num_tokens
            done = self._sync_page_table(req)
            if done < len(req.pages):
                new_slot += [req.slot] * (len(req.pages) - done)
                new_col += range(done, len(req.pages))
                new_page += req.pages[done:]
            if n == 1:  # decode: plain ints, no small numpy arrays (the host's per-row cost at 512 rows)
                inp.token_ids[t] = req.token_at(start) if start < known else -1  # -1: still on the device
                inp.positions[t] = start
                inp.token_slot[t] = req.slot
                inp.is_prompt[t] = start < req.num_prompt_tokens
                a.slot_mapping[t] = req.pages[start // S] * S + start % S
            else:
                if drafts:  # verify: the last known token, then the drafts
                    inp.token_ids[t : t + n] = [req.token_at(start), *drafts]
                elif start + n > known:
                    raise AssertionError("only a one-token step may start at a token the host has not seen")
                else:
                    ids = req.prompt_token_ids if start + n <= req.num_prompt_tokens else req.prompt_token_ids + req.output_token_ids
                    inp.token_ids[t : t + n] = ids[start : start + n]
                pos = np.arange(start, start + n, dtype=np.int32)
                inp.positions[t : t + n] = pos
                inp.token_slot[t : t + n] = req.slot
                inp.is_prompt[t : t + n] = pos < req.num_prompt_tokens
                a.slot_mapping[t : t + n] = self._page_table[req.slot, pos // S] * S + pos % S
            if req.prompt_logprobs is not None and start + 1 < req.num_prompt_tokens:
                if targets is None:
                    targets = np.full(T, -1, np.int32)
                m = min(n, req.num_prompt_tokens - 1 - start)  # rows whose next token is a prompt token
                targets[t : t + m] = req.prompt_token_ids[start + 1 : start + 1 + m]
            if eagle is not None:
                owners[req.slot] = self._eagle_rows(eagle, req, t, start, n, r)
            a.kv_lens[b] = start + n
            a.cu_q_lens[b + 1] = t + n
            t += n
            inp.logits_indices[r] = t - 1
            if batch.reset[b] and start == 0:  # else seed_history has cleared and filled the row
                inp.reset_slot[b] = req.slot
            if not batch.sample[b]:
                r += 1
                continue  # a prompt chunk short of the end: neutral sampling row, its token is not read
            out_index = start + n - req.num_prompt_tokens  # index in the output of the token sampled here
            if drafts:  # the first of the verify rows: the token after the last known one
                out_index -= len(drafts)
            self._sampling_row(s, r, req, out_index)
            if drafts:
                self._verify_rows(inp, s, r, t - n, out_index, len(drafts))
                r += len(drafts)
            r += 1
        a.cu_q_lens[len(batch) + 1 :] = t
        a.num_seqs[...] = len(batch)
        inp.row_slot[: len(batch)] = [req.slot for req in batch.requests]
        if len(new_slot) <= len(inp.new_slot):
            k = len(new_slot)
            inp.new_slot[:k], inp.new_col[:k], inp.new_page[:k] = new_slot, new_col, new_page
        else:  # a long prefix-cache hit or a re-admission: ahead of the step, by the page-table program
            self._write_pages(*(np.asarray(x, np.int32) for x in (new_slot, new_col, new_page)))
        self._eagle_step = None if eagle is None else (*eagle, owners)  # taken by launch
        if self.draft is not None and not self.draft.eagle:
            self._draft_plan = self._plan_draft(batch)
        return inp, s, bucket, targets

    def _plan_draft(self, batch: ScheduledBatch) -> tuple[bool, list[Request]]:
        """A draft model's work beside the step: whether its forward runs (not when every row carries drafts: see the
        module docstring), and the rows to fill first: one-token rows without drafts whose token before the last
        may be missing from the draft cache (the last draft of a step that left its forward out, accepted)."""
        skip = batch.num_drafts and all(batch.drafts[b] for b in range(len(batch)))
        fill = []
        for b, (req, n, start) in enumerate(zip(batch.requests, batch.num_new_tokens, batch.start)):
            if n == 1 and req.draft_gap == start - 1 and not batch.drafts[b]:
                fill.append(req)
            req.draft_gap = start + len(batch.drafts[b]) if skip else -1
        return not skip, fill

    def _fill_drafts(self, reqs: list[Request]) -> None:
        """Write the draft cache's K/V of each request's token before the last (and of the last): a proposal of one
        draft, not read."""
        self._launch_propose(reqs, [1] * len(reqs))

    def _eagle_rows(self, eagle, req: Request, t: int, start: int, n: int, r: int) -> tuple[int, int]:
        """An EAGLE head's inputs for one sequence of a step (token rows t .. t + n - 1 at positions start ..,
        first sampled row r): each row's next token (known, or sampled at row r + its distance from the last known
        token: a verify row's own draw), and where the features of its last k + 1 rows are kept. Returns the slot's
        new owner, (its request id, the position of the first kept row)."""
        next_ids, feat_dst = eagle
        k1 = self.draft.num_speculative_tokens + 1
        known = req.num_tokens
        for j in range(n):
            pos = start + j
            next_ids[t + j] = req.token_at(pos + 1) if pos + 1 < known else -(r + pos - (known - 1) + 1)
        base = start + n - k1
        for j in range(max(0, base - start), n):
            feat_dst[t + j] = req.slot * k1 + start + j - base
        return req.request_id, base

    def _sampling_row(self, s: sampling.SamplingMetadata, r: int, req: Request, out_index: int) -> None:
        """Row r of the sampling metadata: req's sampling for the token at output index out_index."""
        p = req.params
        s.temperature[r] = 0.0 if p.greedy else p.temperature
        s.top_k[r] = p.top_k if p.top_k < self.cfg.vocab_size else 0  # k >= V keeps everything
        s.top_p[r] = p.top_p
        s.min_p[r] = p.min_p
        s.seed[r] = req.seed
        s.position[r] = out_index
        s.repetition_penalty[r] = p.repetition_penalty
        s.presence_penalty[r] = p.presence_penalty
        s.frequency_penalty[r] = p.frequency_penalty
        s.slot[r] = req.slot
        s.has_bias[r] = bool(p.logit_bias)
        # Nothing to mask (e.g. ignore_eos and no stop_token_ids): the row needs no suppression, and the step
        # can keep the cheap sampler variant.
        s.suppress_stop[r] = out_index < p.min_tokens and bool(req.stop_ids)
        s.num_logprobs[r] = -1 if p.logprobs is None else p.logprobs

    @staticmethod
    def _verify_rows(inp: StepInput, s: sampling.SamplingMetadata, r: int, t: int, out_index: int, d: int) -> None:
        """A verifying sequence's sampled rows r + 1 .. r + d: as row r (filled), for its token rows t + 1 .. t + d
        and output positions out_index + 1 .. out_index + d. Its requests have no penalties and are past min_tokens
        (the engine's proposer skips the others), so nothing else differs by position. The drafts also enter the
        row's penalty history (update_history) and the sampler's last_token, rejected or not: neither is read for
        such a request (no penalties; the engine runs speculation synchronously, so every input id comes from the
        host)."""
        for f in dataclasses.fields(s):
            x = getattr(s, f.name)
            x[r + 1 : r + d + 1] = x[r]
        s.position[r : r + d + 1] = np.arange(out_index, out_index + d + 1)
        inp.logits_indices[r : r + d + 1] = np.arange(t, t + d + 1)

    def eagle_feature(self, req: Request) -> int | None:
        """Where the EAGLE head's predicted feature after req's second-to-last token is kept (`feats`, flattened), or
        None when it is not (req did not run in the step that last wrote its slot's features)."""
        k1 = self.draft.num_speculative_tokens + 1
        owner, base = self.draft.feat_owner.get(req.slot, (None, 0))
        j = req.num_tokens - 2 - base
        return req.slot * k1 + j if owner == req.request_id and 0 <= j < k1 else None

    def propose_drafts(self, reqs: list[Request], limits: list[int]) -> list[list[int]]:
        """The draft model's next limits[i] tokens for each of reqs (decodes whose last token the host has; pages
        for the drafts taken), sampled as the target samples at those positions; runs now and waits for them.
        The K/V of each last token, of the token before it and of all but the last draft go into the draft cache
        (a verify step's draft forward, when it runs, writes them all again, and the last draft's)."""
        drafts = np.asarray(self._launch_propose(reqs, limits))
        return [drafts[b, :n].tolist() for b, n in enumerate(limits)]

    def _launch_propose(self, reqs: list[Request], limits: list[int]):
        """Enqueue the proposer for reqs, limits[i] drafts each; returns the drafts [B, k] on the device."""
        B = next(b for b in self.seq_buckets if b >= len(reqs))
        inp, s = self._empty_propose_input(B)
        new_slot, new_col, new_page = [], [], []
        for b, (req, n) in enumerate(zip(reqs, limits)):
            done = self._sync_page_table(req)
            if done < len(req.pages):
                new_slot += [req.slot] * (len(req.pages) - done)
                new_col += range(done, len(req.pages))
                new_page += req.pages[done:]
            last = req.num_tokens - 1
            if self.draft.eagle:  # from the kept feature of the position before the last token
                inp.feat_src[b] = self.eagle_feature(req)
                inp.positions[b], inp.row_slot[b], inp.num_drafts[b] = last - 1, req.slot, n
            else:
                inp.token_ids[b], inp.positions[b], inp.row_slot[b], inp.num_drafts[b] = (req.token_at(last), last,
                                                                                          req.slot, n)
                inp.prev_ids[b] = req.token_at(last - 1)
            self._sampling_row(s, b, req, len(req.output_token_ids))
            s.num_logprobs[b] = -1  # the target reports logprobs; the draft's are not read
        inp.num_seqs[...] = len(reqs)
        if len(new_slot) <= len(inp.new_slot):
            k = len(new_slot)
            inp.new_slot[:k], inp.new_col[:k], inp.new_page[:k] = new_slot, new_col, new_page
        else:
            self._write_pages(*(np.asarray(x, np.int32) for x in (new_slot, new_col, new_page)))
        return self._op("propose", B, sampling.variant_for(s), pack((inp, s)))

    # -- running ----------------------------------------------------------------------------------------

    def launch(self, inp: StepInput, md: sampling.SamplingMetadata, bucket: tuple[int, int, bool],
               prompt_targets: np.ndarray | None = None, nan_rows: list[int] | None = None) -> LaunchedStep:
        """Enqueue the step on the device and return at once. nan_rows (tests only: a model fault injected by
        `Engine.fault_hook`): sampled rows whose logits are replaced by NaN."""
        flat = pack(inp)
        run, fill = self._draft_plan if self.draft is not None else (False, [])
        out, prompt = self._op("step", bucket, sampling.variant_for(md), flat, pack(md), prompt_targets,
                               np.asarray(nan_rows, np.int32) if nan_rows else None, run)
        want_logprobs = bool((md.num_logprobs >= 0).any())
        copies = [out.token_ids] + ([out.logprobs, out.top_ids, out.top_logprobs, out.ranks] if want_logprobs else [])
        for x in copies + list(prompt or ()):
            x.copy_to_host_async()
        if self.draft is not None:  # the same tokens into the proposer's cache, behind the step
            eagle, self._draft_plan = None, (True, [])
            if fill:  # after the step, which sets the device's page-table entries they may need
                self._fill_drafts(fill)
            if self.draft.eagle:
                *eagle, owners = self._eagle_step
                self.draft.feat_owner.update(owners)
            if run:
                self._op("draft_forward", bucket, flat, eagle)
        return LaunchedStep(out, want_logprobs, prompt, bucket)

    # -- the device calls of serving ----------------------------------------------------------------------
    # Each goes through `_op` with host arguments only: on the first process of a multi-host engine the call is sent
    # to the others first (multihost.py), which make the same call on their devices (`replay`), in the same order.

    def _op(self, name: str, *args):
        if self.channel is not None:
            self.channel.send(name, args)
        return getattr(self, "_op_" + name)(*args)

    def replay(self, name: str, args: tuple) -> None:
        """Make a device call the first process made (multihost.follow); its results stay on the device."""
        getattr(self, "_op_" + name)(*args)

    def _op_step(self, bucket, variant, flat, flat_md, prompt_targets, nan_rows, keep_for_draft: bool):
        """The step's forward and sampler programs (and the prompt-logprobs one): (sampler output, prompt logprobs)."""
        logits, h, self.kv, self.sstate, self.page_table, *aux = self.compiled[bucket](
            self.params, self.kv, self.sstate, self.page_table, flat)
        if nan_rows is not None:
            logits = logits.at[nan_rows].set(jnp.nan)
        out, self.sstate = self.compiled_samplers[(bucket[1], variant)](logits, self.sstate, flat_md)
        prompt = None
        if prompt_targets is not None:
            prompt = self.compiled_prompt_logprobs[bucket[0]](self.params, h, prompt_targets)
        if keep_for_draft:  # what the step's draft forward reads (_op_draft_forward takes it)
            self._for_draft = (aux[0] if aux else h, out.token_ids)
        return out, prompt

    def _op_draft_forward(self, bucket, flat, eagle) -> None:
        h, sampled = self._for_draft
        self._for_draft = None
        self._launch_draft(bucket, flat, h, sampled, eagle)

    def _op_set_pages(self, slots, cols, pages) -> None:
        self.page_table = self._compiled_set_pages(self.page_table, slots, cols, pages)

    def _op_history(self, slots, ids, is_prompt, reset) -> None:
        self.sstate = self._compiled_history(self.sstate, slots, ids, is_prompt, reset)

    def _op_set_row(self, slot, bias_ids, bias_vals, stops, clear) -> None:
        self.sstate = self._compiled_set_row(self.sstate, slot, bias_ids, bias_vals, stops, clear)

    def _launch_draft(self, bucket, flat, h, sampled, eagle) -> None:
        """A step's rows through the proposer too, behind the step: a draft model's input, or an EAGLE head's pairs of
        (the target's feature, the next token) with `eagle` = (next_ids, feat_dst)."""
        d = self.draft
        prog = self.compiled_draft[bucket]
        if d.eagle:
            d.kv, d.feats = prog(d.params, self.params, d.kv, d.feats, self.page_table, flat, h, sampled, *eagle)
        else:
            d.kv = prog(d.params, d.kv, self.page_table, flat)

    def _op_propose(self, B: int, variant: str, flat):
        d = self.draft
        prog = self.compiled_propose[(B, variant)]
        if d.eagle:
            drafts, d.kv, self.page_table = prog(d.params, self.params, d.kv, self.sstate, self.page_table, flat,
                                                 d.feats)
        else:
            drafts, d.kv, self.page_table = prog(d.params, d.kv, self.sstate, self.page_table, flat)
        return drafts

    def seed_history(self, req: Request, num_cached: int) -> None:
        """Clear req's sampler row and fold in its first num_cached tokens (a prefix-cache hit),
        flagged prompt / output as a full recompute would."""
        L, n = self._history_len, num_cached
        ids, slots, is_prompt = np.zeros(L, np.int32), np.full(L, self.num_slots, np.int32), np.zeros(L, np.bool_)
        ids[:n] = [req.token_at(i) for i in range(n)]
        slots[:n] = req.slot
        is_prompt[:n] = np.arange(n) < req.num_prompt_tokens
        self._op("history", slots, ids, is_prompt, np.array([req.slot], np.int32))

    def set_row(self, slot: int, logit_bias: dict[int, float] | None, stop_ids: list[int]) -> None:
        """Install a request's logit bias and min_tokens stop set into its sampler-state row (a stop set longer than
        the program's width W goes in W ids per call, the first call clearing the row)."""
        W, V = self.ecfg.max_logit_bias, self.cfg.vocab_size
        bias_ids, bias_vals = np.full(W, V, np.int32), np.zeros(W, np.float32)
        items = list((logit_bias or {}).items())[:W]  # validated: at most W entries
        if items:
            bias_ids[: len(items)] = [k for k, _ in items]
            bias_vals[: len(items)] = [v for _, v in items]
        stop_ids = list(stop_ids)
        for n in range(0, max(len(stop_ids), 1), W):
            stops = np.full(W, V, np.int32)
            chunk = stop_ids[n : n + W]
            stops[: len(chunk)] = chunk
            clear = slot if n == 0 else self.num_slots  # later chunks add to the row
            self._op("set_row", np.int32(slot), bias_ids, bias_vals, stops, np.int32(clear))
            bias_ids = np.full(W, V, np.int32)  # the bias went in with the first chunk

