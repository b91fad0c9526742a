"""Continuous batching, plain Python (no jax): which requests run in the next step, and with how many tokens.

Each step: running requests first (a decode is one token; an unfinished prefill continues with its next
chunk), then waiting requests in priority / arrival order, until the token budget
(`max_num_batched_tokens`) or the sequence budget (`max_num_seqs`) is spent. A prompt longer than what is
left of the budget is split across steps (chunked prefill). When a running request needs a page and none
is free, the latest-arrived running request is preempted: its pages are freed and it is recomputed later
from its prompt and the tokens generated so far. Nothing is dropped.

Prefix caching (page_allocator.py): after each step, the pages a request has just filled are registered
under their chained hash. A request admitted from the waiting queue (new, or preempted) first takes the
cached pages of its longest cached prefix and starts computing after them. At least the last known token
must run through the model to give logits, and only full pages are shared, so the hit is capped at
(num_tokens - 1) // page_size pages: a prompt that is entirely cached and ends on a page boundary
recomputes its whole last page (into a page of its own; the cached copy is left alone). Cached pages are
only ever read, since a request writes only at positions >= its num_computed_tokens.

Requests admitted together share too: a waiting request whose next uncached page is one a running request
(admitted earlier, or earlier in this step) is still computing is not admitted yet; once that page is
computed and registered it comes from the cache. So the n children of one request, or equal prompts
arriving together, compute their common full pages once, at the price of a step or a few of waiting.

A step's tokens count as computed as soon as it is scheduled, and a token sampled on the device but not
yet read by the host is `num_pending` on its request. So the engine can schedule step N+1 while step N
runs (async scheduling): a request whose last token is pending decodes it in step N+1 (the device
supplies the id), a request that will reach max_tokens or the context with its pending token is not
scheduled again, and one that stops on EOS or a stop string is finished when its token arrives, its
already scheduled next token discarded. A preempted request with a token pending is not readmitted until
the token has arrived.

Speculative decoding (spec_decode.py; the engine then runs each step to the end before scheduling the next):
after the plain schedule, each decode that `propose` gives drafts for feeds them too, its last token and d drafts
as d + 1 tokens, with pages for all of them, while the step stays within the token budget and `max_spec_tokens`
(the largest verify bucket); prompt chunks come first, drafts take what is left. A draft is never allowed past
max_tokens or the context, and no request is preempted to make room for drafts. When the step's result arrives,
`update` appends the accepted run token by token (stop rules on each), then rolls num_computed_tokens back to
the verified tokens: rejected drafts' K/V stay in the pages, past num_computed_tokens, and are overwritten later;
only verified pages reach the prefix cache. A proposer that runs on the device (a draft model: `propose_batch`) is
called once for all of a step's decodes, after their pages are taken (it writes the drafts' K/V as it runs), with how
many drafts each may feed; a request admitted in the same step gets none (its sampler row is installed later).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from jaxinfer.page_allocator import OutOfPages, PageAllocator, page_hash
from jaxinfer.request import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request]
    num_new_tokens: list[int]  # tokens each request feeds this step
    reset: list[bool]  # the request's first chunk since (re)admission: its sampler-state row is fresh.
    # On a reset chunk, the first `start` tokens came from the prefix cache and never enter a step.
    start: list[int] = field(default_factory=list)  # position of each request's first token in this step
    sample: list[bool] = field(default_factory=list)  # the chunk reaches the sequence's end: a token is sampled
    # speculative decoding: draft tokens each request feeds after its last token ([]: none); it then samples at each
    # of its 1 + len(drafts) tokens, which take that many consecutive sampled rows of the step
    drafts: list[list[int]] = field(default_factory=list)
    num_drafts: int = 0  # sum of len(drafts)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)

    def samples(self, i: int) -> bool:
        """Does request i produce a token this step?"""
        return self.sample[i]

    @property
    def num_rows(self) -> int:
        """Sampled rows of the step: one per request, plus one per draft token."""
        return len(self.requests) + self.num_drafts

    def first_rows(self) -> list[int]:
        """Each request's first sampled row (a verifying request has 1 + len(drafts) of them)."""
        if not self.num_drafts:
            return list(range(len(self.requests)))
        rows, r = [], 0
        for d in self.drafts:
            rows.append(r)
            r += 1 + len(d)
        return rows

    def add(self, req: Request, n: int, reset: bool) -> None:
        """Take req's next n tokens into the step; they count as computed from now on."""
        self.requests.append(req)
        self.num_new_tokens.append(n)
        self.reset.append(reset)
        self.drafts.append([])
        self.start.append(req.num_computed_tokens)
        req.num_computed_tokens += n
        sample = req.num_computed_tokens == req.num_tokens + req.num_pending
        self.sample.append(sample)
        req.num_pending += sample


class Scheduler:
    def __init__(self, num_pages: int, page_size: int, max_num_seqs: int, token_budget: int, max_model_len: int,
                 enable_prefix_caching: bool = True, propose=None, max_spec_tokens: int = 0, propose_batch=None,
                 draft_len=None, mixed_step_token_budget: int | None = None):
        """mixed_step_token_budget: the most tokens a step that carries decodes may hold (the decodes, then prompt
        chunks in what is left, at least one token), so decoding streams wait at most one such step between tokens
        while a long prompt is admitted; None: token_budget.
        propose: speculative decoding's proposer, Request -> draft token ids (None: no speculation);
        max_spec_tokens: the most tokens a step carrying drafts may hold. A proposer that runs on the device for all
        of a step's rows at once (a draft model) comes instead as propose_batch, (requests, how many drafts each)
        -> draft token ids per request, with draft_len, Request -> the drafts it may take (0: none): its pages are
        taken before it runs, since it writes the drafts' K/V."""
        self.allocator = PageAllocator(num_pages)
        self.propose = propose
        self.propose_batch = propose_batch
        self.draft_len = draft_len
        self.max_spec_tokens = max_spec_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.token_budget = token_budget
        self.mixed_step_token_budget = mixed_step_token_budget
        self.max_model_len = max_model_len
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens of requests admitted while caching is on
        self.prefix_cache_hits = 0  # of which found in the cache

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

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def _release(self, req: Request) -> None:
        self.allocator.free(req.pages)
        req.pages = []
        req.num_registered_pages = 0
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

    def preempt(self, req: Request) -> None:
        """Send a running request back to wait: its pages freed, its tokens recomputed when it is admitted again."""
        self._preempt(req)

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

    # -- prefix caching -------------------------------------------------------------------------------

    def _page_hashes(self, req: Request, num_pages: int) -> list[bytes]:
        """Hashes of req's first num_pages pages (all full of known tokens), computed once each."""
        hs, ps = req.page_hashes, self.page_size
        while len(hs) < num_pages:
            i = len(hs)
            tokens = [req.token_at(j) for j in range(i * ps, (i + 1) * ps)]
            hs.append(page_hash(hs[-1] if hs else None, tokens, req.cache_extra))
        return hs[:num_pages]

    def cached_prompt_tokens(self, ids: list[int]) -> int:
        """Tokens of the longest prefix of a prompt `ids` whose pages are cached here (nothing is taken: routing
        between engine replicas, data_parallel.py)."""
        if not self.enable_prefix_caching:
            return 0
        hs, ps = [], self.page_size
        for i in range((len(ids) - 1) // ps):
            hs.append(page_hash(hs[-1] if hs else None, ids[i * ps:(i + 1) * ps]))
        return len(self.allocator.lookup(hs)) * ps

    def _uses_cache(self, req: Request) -> bool:
        """Prompt logprobs need logits at every prompt position, so the request collecting them (the first of its
        n children) computes its whole prompt; its siblings then take its pages from the cache."""
        return self.enable_prefix_caching and req.prompt_logprobs is None

    def _cached_prefix(self, req: Request) -> list[int]:
        """Pages of req's longest cached prefix, leaving at least its last known token to compute."""
        if not self._uses_cache(req):
            return []
        return self.allocator.lookup(self._page_hashes(req, (req.num_tokens - 1) // self.page_size))

    def _register_pages(self, req: Request) -> None:
        """Offer the pages req has filled with known tokens and computed to the prefix cache."""
        full = min(req.num_computed_tokens, req.num_tokens) // self.page_size
        if not self.enable_prefix_caching or full <= req.num_registered_pages:
            return
        hashes = self._page_hashes(req, full)
        for i in range(req.num_registered_pages, full):
            self.allocator.cache_page(req.pages[i], hashes[i])
        req.num_registered_pages = full

    def _add_pending(self, req: Request, pending: set[bytes]) -> None:
        """Add the hashes of req's full pages of known tokens that it has not yet registered."""
        full = req.num_tokens // self.page_size
        if full > req.num_registered_pages:
            pending.update(self._page_hashes(req, full)[req.num_registered_pages:])

    def _pending_pages(self) -> set[bytes]:
        """Hashes of the full pages running requests are still computing (registered once computed)."""
        pending: set[bytes] = set()
        if self.enable_prefix_caching:
            for r in self.running:
                self._add_pending(r, pending)
        return pending

    def _waits_for_pending(self, req: Request, hit: list[int], pending: set[bytes]) -> bool:
        """Does req's next page past its cache hit match a page a running request is computing? Then req
        waits: admitted a step or a few later, it takes that page from the cache instead of computing it
        again (n > 1 children, equal prompts arriving together). Hashes are chained, so a match means the
        whole prefix up to that page is equal."""
        if not self._uses_cache(req) or not pending:
            return False
        want = (req.num_tokens - 1) // self.page_size
        return len(hit) < want and self._page_hashes(req, want)[len(hit)] in pending

    # -- the decision ----------------------------------------------------------------------------------

    def schedule(self, hold: set[int] | None = None, drafts: bool = True) -> ScheduledBatch:
        """The next step. hold: ids (`id()`) of requests to leave out of it (they keep their pages and place).
        drafts: False for a step without speculative drafts (the engine turns speculation off past a batch size)."""
        hold = hold or ()
        batch = ScheduledBatch([], [], [])
        budget = self.token_budget
        now = time.monotonic()
        # Prompt tokens this step may take: with decodes in it, what mixed_step_token_budget leaves them.
        prompt_room = budget
        if self.mixed_step_token_budget is not None:
            decodes = sum(r.num_tokens + r.num_pending - r.num_computed_tokens == 1 and id(r) not in hold
                          for r in self.running)
            if decodes:
                prompt_room = max(1, self.mixed_step_token_budget - decodes)

        # 1. Running requests, oldest first; the youngest gives way when pages run out.
        self.running.sort(key=lambda r: (r.priority, r.arrival_time))
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if id(req) in hold:
                i += 1
                continue
            if req.num_pending and (len(req.output_token_ids) + req.num_pending >= req.max_tokens
                                    or req.num_tokens + req.num_pending >= self.max_model_len):
                i += 1  # its pending token ends it ('length' when the token arrives)
                continue
            n = min(req.num_tokens + req.num_pending - req.num_computed_tokens, budget)
            prompt = n > 1  # a prompt chunk (or a preempted request's recompute)
            if prompt:
                if prompt_room <= 0:
                    i += 1
                    continue
                n = min(n, prompt_room)
            while not self._grow(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break  # req preempted itself: nothing younger is left to schedule
            batch.add(req, n, reset=False)
            budget -= n
            prompt_room -= n if prompt else 0
            i += 1

        # 2. Waiting requests, by priority then arrival, while budget, sequence slots and pages last.
        # One whose next uncached page is being computed by a running request waits for it (_waits_for_pending).
        self.waiting.sort(key=lambda r: (r.priority, r.arrival_time))
        pending = self._pending_pages() if self.waiting else set()
        w = 0
        while w < len(self.waiting) and min(budget, prompt_room) > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[w]
            if req.num_pending or id(req) in hold:  # num_pending: preempted while its last token was on the device
                w += 1
                continue
            hit = self._cached_prefix(req)
            if self._waits_for_pending(req, hit, pending):
                w += 1
                continue
            computed = len(hit) * self.page_size
            n = min(req.num_tokens - computed, budget, prompt_room)
            # Taking the hit pages removes the unreferenced ones from what can be allocated.
            available = self.allocator.num_free - sum(self.allocator.ref_counts[p] == 0 for p in hit)
            if self._pages_for(computed + n) - len(hit) > available:
                break
            self.allocator.share(hit)
            req.pages, req.num_computed_tokens, req.num_registered_pages = hit, computed, len(hit)
            if not self._grow(req, computed + n):
                raise AssertionError("pages counted as available could not be allocated")
            if self._uses_cache(req):
                self.prefix_cache_queries += req.num_tokens
                self.prefix_cache_hits += computed
            if req.first_scheduled_time is None:
                req.num_cached_tokens = computed
            self.waiting.pop(w)
            req.status = Status.RUNNING
            req.slot = self._free_slots.pop()
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.running.append(req)
            batch.add(req, n, reset=True)
            budget -= n
            prompt_room -= n
            self._add_pending(req, pending)
        if drafts and self.propose_batch is not None:
            self._add_draft_batch(batch)
        elif drafts and self.propose is not None:
            self._add_drafts(batch)
        return batch

    def _draft_limit(self, batch: ScheduledBatch, i: int, room: int) -> int:
        """How many drafts request i of the step may feed (0: none): only a decode of a token the host has seen,
        within `room`, and none past max_tokens or the context (the step yields at most drafts + 1 tokens)."""
        req = batch.requests[i]
        if batch.num_new_tokens[i] != 1 or not batch.sample[i] or batch.start[i] != req.num_tokens - 1:
            return 0  # a prompt chunk, or (async scheduling) a token the host has not seen
        return max(0, min(room, req.max_tokens - len(req.output_token_ids) - 1, self.max_model_len - req.num_tokens - 1))

    def _take_drafts(self, batch: ScheduledBatch, i: int, drafts: list[int]) -> None:
        req = batch.requests[i]
        batch.drafts[i] = drafts
        batch.num_drafts += len(drafts)
        batch.num_new_tokens[i] += len(drafts)
        req.num_computed_tokens += len(drafts)

    def _add_draft_batch(self, batch: ScheduledBatch) -> None:
        """`_add_drafts` for a batch proposer: each decode's number of drafts (`draft_len`, within the budget as
        there) and its pages first, then one `propose_batch` call for all of them."""
        room = min(self.token_budget, self.max_spec_tokens) - batch.num_tokens
        rows, limits = [], []
        for i, req in enumerate(batch.requests):
            if room <= 0:
                break
            if batch.reset[i]:  # admitted this step: its sampler row (logit bias) is installed after scheduling
                continue
            limit = min(self._draft_limit(batch, i, room), self.draft_len(req))
            if limit > 0 and not self._grow(req, req.num_computed_tokens + limit):
                limit = min(limit, len(req.pages) * self.page_size - req.num_computed_tokens)
            if limit > 0:
                rows.append(i)
                limits.append(limit)
                room -= limit
        if rows:
            proposed = self.propose_batch([batch.requests[i] for i in rows], limits)
            for i, limit, drafts in zip(rows, limits, proposed):
                if drafts:
                    self._take_drafts(batch, i, list(drafts[:limit]))

    def _add_drafts(self, batch: ScheduledBatch) -> None:
        """Speculative decoding: extend each decode of the step (its last known token, sampled) by the drafts
        `propose` gives it, within what is left of the token budget and `max_spec_tokens`, short of max_tokens and
        the context. Pages for the drafts come from free pages only (else from the room left in its last page)."""
        room = min(self.token_budget, self.max_spec_tokens) - batch.num_tokens
        for i, req in enumerate(batch.requests):
            if room <= 0:
                break
            limit = self._draft_limit(batch, i, room)
            drafts = list(self.propose(req)[:limit]) if limit > 0 else []
            if drafts and not self._grow(req, req.num_computed_tokens + len(drafts)):
                drafts = drafts[: len(req.pages) * self.page_size - req.num_computed_tokens]
            if drafts:
                self._take_drafts(batch, i, drafts)
                room -= len(drafts)

    def update(self, batch: ScheduledBatch, sampled: list[int | list[int] | None]) -> list[int]:
        """Append each request's sampled token of a finished step (None: no token this step; a list: the tokens a
        verifying request yields, its accepted drafts and the target's next token, in order).

        Applies the token-level stop rules (EOS, stop_token_ids, max_tokens, context length) to each token, dropping
        what follows a stop; stop strings are the engine's business (they need text). Returns, per request, how many
        tokens were appended: a request that was aborted, or stopped by the step before, drops them.
        """
        appended = []
        now = time.monotonic()
        for req, tok in zip(batch.requests, sampled):
            if req.is_finished or tok is None:  # finished: aborted, or stopped by the step before (past its end)
                appended.append(0)
                if tok is None and not req.is_finished:
                    self._register_pages(req)
                continue
            req.num_pending -= 1
            if req.first_token_time is None:
                req.first_token_time = now
            if isinstance(tok, list):  # a verify step
                n, stop = self._append_run(req, tok)
                # Rejected drafts: their K/V (past the last token) is overwritten later; num_computed_tokens holds
                # only verified tokens, so no page with a rejected draft's K/V is offered to the prefix cache.
                req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)
            else:
                req.output_token_ids.append(tok)
                n, stop = 1, self._stop_rule(req, tok)
            appended.append(n)
            self._register_pages(req)
            if stop is not None:
                self.finish(req, *stop)
        return appended

    def _append_run(self, req: Request, tokens: list[int]) -> tuple[int, tuple | None]:
        """Append tokens until one ends the request; (tokens appended, the stop rule that ended it or None)."""
        for n, tok in enumerate(tokens, 1):
            req.output_token_ids.append(tok)
            stop = self._stop_rule(req, tok)
            if stop is not None:
                return n, stop
        return len(tokens), None

    def _stop_rule(self, req: Request, tok: int) -> tuple | None:
        """(reason, stop_reason) when the just-appended tok ends req, else None."""
        p = req.params
        if not p.ignore_eos and tok in req.eos_token_ids and len(req.output_token_ids) > p.min_tokens - 1:
            return "stop", tok
        if p.stop_token_ids and tok in p.stop_token_ids and len(req.output_token_ids) > p.min_tokens - 1:
            return "stop", tok
        if len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return "length", None
        return None
