"""Continuous batching, plain Python (no jax): which requests run in the next step, and with how many tokens.

Each step: running requests first (a decode is one token; an unfinished prefill continues with its next
chunk), then waiting requests in priority / arrival order, until the token budget
(`max_num_batched_tokens`) or the sequence budget (`max_num_seqs`) is spent. A prompt longer than what is
left of the budget is split across steps (chunked prefill). When a running request needs a page and none
is free, the latest-arrived running request is preempted: its pages are freed and it is recomputed later
from its prompt and the tokens generated so far. Nothing is dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from jaxinfer.page_allocator import OutOfPages, PageAllocator
from jaxinfer.request import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request]
    num_new_tokens: list[int]  # tokens each request feeds this step
    reset: list[bool]  # the request's first chunk since (re)admission: its sampler-state row is fresh

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)

    def samples(self, i: int) -> bool:
        """Does request i produce a token this step (its chunk reaches the end of its known tokens)?"""
        r = self.requests[i]
        return r.num_computed_tokens + self.num_new_tokens[i] == r.num_tokens


class Scheduler:
    def __init__(self, num_pages: int, page_size: int, max_num_seqs: int, token_budget: int, max_model_len: int):
        self.allocator = PageAllocator(num_pages)
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.token_budget = token_budget
        self.max_model_len = max_model_len
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0

    # -- bookkeeping -----------------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        need = self._pages_for(req.num_prompt_tokens + 1)
        if need > self.allocator.num_pages:
            raise ValueError(
                f"prompt of {req.num_prompt_tokens} tokens needs {need} KV pages but the cache has only "
                f"{self.allocator.num_pages}; raise the KV cache memory or shorten the prompt"
            )
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _release(self, req: Request) -> None:
        self.allocator.free(req.pages)
        req.pages = []
        if req.slot is not None:
            self._free_slots.append(req.slot)
            req.slot = None

    def finish(self, req: Request, reason: str, stop_reason=None) -> None:
        """End a request (stop, length or abort): its pages and slot are freed at once."""
        if req.is_finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.status = Status.FINISHED
        req.finish_reason, req.stop_reason = reason, stop_reason
        req.finished_time = time.monotonic()

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = Status.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, req)

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make req's pages cover num_tokens; False if the pages are not there."""
        need = self._pages_for(num_tokens) - len(req.pages)
        if need <= 0:
            return True
        try:
            req.pages += self.allocator.allocate(need)
            return True
        except OutOfPages:
            return False

    # -- the decision ----------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [], [])
        budget = self.token_budget
        now = time.monotonic()

        # 1. Running requests, oldest first; the youngest gives way when pages run out.
        self.running.sort(key=lambda r: (r.priority, r.arrival_time))
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self._grow(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break  # req preempted itself: nothing younger is left to schedule
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            batch.reset.append(False)
            budget -= n
            i += 1

        # 2. Waiting requests, by priority then arrival, while budget, sequence slots and pages last.
        self.waiting.sort(key=lambda r: (r.priority, r.arrival_time))
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._grow(req, req.num_computed_tokens + n):
                break
            self.waiting.pop(0)
            req.status = Status.RUNNING
            req.slot = self._free_slots.pop()
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            batch.reset.append(True)
            budget -= n
        return batch

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Request]:
        """Advance each scheduled request by its chunk and append its sampled token (None: no token this step).

        Applies the token-level stop rules (EOS, stop_token_ids, max_tokens, context length) and returns the
        requests that finished. Stop strings are the engine's business (they need text).
        """
        finished = []
        now = time.monotonic()
        for req, n, tok in zip(batch.requests, batch.num_new_tokens, sampled):
            if req.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens += n
            if tok is None:
                continue
            req.output_token_ids.append(tok)
            if req.first_token_time is None:
                req.first_token_time = now
            p = req.params
            if not p.ignore_eos and tok in req.eos_token_ids and len(req.output_token_ids) > p.min_tokens - 1:
                self.finish(req, "stop", tok)
            elif p.stop_token_ids and tok in p.stop_token_ids and len(req.output_token_ids) > p.min_tokens - 1:
                self.finish(req, "stop", tok)
            elif len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= self.max_model_len:
                self.finish(req, "length")
            if req.is_finished:
                finished.append(req)
        return finished
