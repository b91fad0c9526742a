"""On-device sampling: logits of one step -> token ids (+ logprobs), inside the jitted step.

Dimensions:
    B  sequence rows in the step (padded to the bucket)
    V  vocabulary
    S  sequence slots (max concurrent sequences); slot S is the "nowhere" row used by padding
    T  tokens in the step
    K  static max number of top logprob alternatives (may be 0)

Data flow: the host keeps `SamplingParams` per request and packs one `SamplingMetadata` per step as
numpy arrays padded to B. Per-sequence history that would be costly to resend each step (which tokens
were seen, the logit_bias row, the stop-token row) lives on device in `SamplerState`, one row per slot,
donated into the step. `set_row` fills a slot's bias/stop rows at admission; `update_history` folds
the step's input tokens into the history; `sample` turns logits into tokens.

Processing order (vLLM's):
    logprobs from the raw logits (log_softmax of the model output)
    -> logit_bias -> repetition penalty -> presence/frequency penalties -> min_tokens stop suppression
    -> greedy rows: argmax
    -> other rows: / temperature -> top-k -> top-p -> min-p -> Gumbel-max with a per-row key
       fold_in(key(seed), position), so a seeded request's text does not depend on its neighbours.

Top-k and top-p thresholds are found by bisection over the bits of float32 values rather than by
sorting the vocabulary: 31-32 passes of a compare-and-reduce over [B, V] map well onto any
accelerator, whereas a [B, V] sort is the slowest op in a typical sampler. Ties at a threshold are
kept, so the kept set is a function of the values only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from jaxinfer.sampling_params import GREEDY_TEMPERATURE


@jax.tree_util.register_dataclass
@dataclass
class SamplerState:
    """Device-resident per-slot history; donated into the step."""

    prompt_mask: jax.Array  # [S, V] bool: token appeared in the prompt
    output_counts: jax.Array  # [S, V] int32: occurrences in the output so far
    logit_bias: jax.Array  # [S, V] float32
    stop_mask: jax.Array  # [S, V] bool: EOS + stop_token_ids, masked while min_tokens not reached
    last_token: jax.Array  # [S] int32: the latest sampled token (input of the next step before the host has it)


def init_sampler_state(num_slots: int, vocab_size: int) -> SamplerState:
    shape = (num_slots, vocab_size)
    return SamplerState(
        prompt_mask=jnp.zeros(shape, jnp.bool_),
        output_counts=jnp.zeros(shape, jnp.int32),
        logit_bias=jnp.zeros(shape, jnp.float32),
        stop_mask=jnp.zeros(shape, jnp.bool_),
        last_token=jnp.zeros((num_slots,), jnp.int32),
    )


@jax.tree_util.register_dataclass
@dataclass
class SamplingMetadata:
    """Per-step sampling inputs, built on host as numpy; padding rows use slot S and neutral values."""

    temperature: jax.Array  # [B] f32; < GREEDY_TEMPERATURE => argmax
    top_k: jax.Array  # [B] i32; 0 => disabled
    top_p: jax.Array  # [B] f32; 1 => disabled
    min_p: jax.Array  # [B] f32; 0 => disabled
    seed: jax.Array  # [B] uint32
    position: jax.Array  # [B] i32; index of the output token being sampled
    repetition_penalty: jax.Array  # [B] f32
    presence_penalty: jax.Array  # [B] f32
    frequency_penalty: jax.Array  # [B] f32
    slot: jax.Array  # [B] i32; S for padding (reads clamp, writes drop)
    has_bias: jax.Array  # [B] bool
    suppress_stop: jax.Array  # [B] bool; output shorter than min_tokens
    num_logprobs: jax.Array  # [B] i32; -1 none, else top alternatives the host reads (<= K)


@jax.tree_util.register_dataclass
@dataclass
class SampleOutput:
    token_ids: jax.Array  # [B] i32
    logprobs: jax.Array  # [B] f32, raw logprob of the sampled token
    top_ids: jax.Array  # [B, K] i32
    top_logprobs: jax.Array  # [B, K] f32
    ranks: jax.Array  # [B] i32, rank of the sampled token in the raw distribution (1 = most likely); 0 if not asked


def update_history(
    state: SamplerState,
    slot_per_token: jax.Array,  # [T] i32, S for padding
    token_ids: jax.Array,  # [T] i32
    is_prompt: jax.Array,  # [T] bool
    reset_slot: jax.Array,  # [B] i32, S for padding
) -> SamplerState:
    """Fold this step's input tokens into the per-slot history. Runs at the start of each step.

    Rows in `reset_slot` (sequences whose first chunk is in this step) are cleared first, so a slot
    reused by a new request starts empty. Every generated token re-enters the next step as an input
    token, so by the time output position p is sampled all outputs < p have been counted here, and
    no extra bookkeeping of sampled ids is needed. Recomputation after preemption re-feeds prompt
    and generated tokens with the same `is_prompt` flags, so it rebuilds the same history. The tokens of a
    prefix-cache hit never enter a step: the runner's `seed_history` folds them in with this same function
    (resetting the row) before the request's first chunk, which then leaves the row alone.
    """
    num_slots = state.prompt_mask.shape[0]
    prompt_mask = state.prompt_mask.at[reset_slot].set(False, mode="drop")
    output_counts = state.output_counts.at[reset_slot].set(0, mode="drop")
    # Tokens of the other kind are routed to the out-of-bounds row S and dropped.
    prompt_slot = jnp.where(is_prompt, slot_per_token, num_slots)  # [T]
    output_slot = jnp.where(is_prompt, num_slots, slot_per_token)  # [T]
    prompt_mask = prompt_mask.at[prompt_slot, token_ids].set(True, mode="drop")
    output_counts = output_counts.at[output_slot, token_ids].add(1, mode="drop")
    return dataclasses.replace(state, prompt_mask=prompt_mask, output_counts=output_counts)


def set_row(
    state: SamplerState,
    slot: jax.Array,  # [] i32
    bias_ids: jax.Array,  # [W] i32, padded with V
    bias_vals: jax.Array,  # [W] f32
    stop_ids: jax.Array,  # [W'] i32, padded with V
    clear_slot: jax.Array | None = None,  # [] i32: the row to clear first (default: slot; out of range: none)
) -> SamplerState:
    """Install a request's logit_bias and stop rows at admission (only if it has bias or min_tokens). A stop
    set longer than W' comes in several calls, the later ones with clear_slot out of range (adding to the row)."""
    clear = slot if clear_slot is None else clear_slot
    logit_bias = state.logit_bias.at[clear].set(0.0, mode="drop")
    logit_bias = logit_bias.at[slot, bias_ids].set(bias_vals.astype(jnp.float32), mode="drop")
    stop_mask = state.stop_mask.at[clear].set(False, mode="drop")
    stop_mask = stop_mask.at[slot, stop_ids].set(True, mode="drop")
    return dataclasses.replace(state, logit_bias=logit_bias, stop_mask=stop_mask)


def apply_penalties(
    logits: jax.Array,  # [B, V] f32
    prompt_mask: jax.Array,  # [B, V] bool
    output_counts: jax.Array,  # [B, V] i32
    repetition_penalty: jax.Array,  # [B] f32
    presence_penalty: jax.Array,  # [B] f32
    frequency_penalty: jax.Array,  # [B] f32
) -> jax.Array:
    """Repetition (HF/vLLM: prompt + output tokens) then presence/frequency (OpenAI: output only).

    Neutral values (1, 0, 0) leave a row bit-identical, which keeps rows batch-invariant.
    """
    seen = prompt_mask | (output_counts > 0)  # [B, V]
    rep = repetition_penalty[:, None]  # [B, 1]
    # Dividing positive and multiplying negative logits both push the token down.
    penalised = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalised, logits)
    counts = output_counts.astype(jnp.float32)  # [B, V]
    return (
        logits
        - frequency_penalty[:, None] * counts
        - presence_penalty[:, None] * (output_counts > 0).astype(jnp.float32)
    )


def _sortable_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (the usual sign-flip trick); -0.0 maps with +0.0."""
    x = jnp.where(x == 0, jnp.float32(0), x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    # Negative floats order backwards in their magnitude bits, so flip them all; positives go above.
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def apply_top_k(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Mask (to -inf) everything below the k-th largest value per row; k <= 0 or >= V keeps all.

    logits [B, V] f32, top_k [B] i32. The threshold is the exact k-th largest value, built bit by
    bit from the top: the largest t with count(key >= t) >= k.
    """
    vocab = logits.shape[-1]
    k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)  # [B]
    keys = _sortable_bits(logits)  # [B, V]

    def add_bit(i, threshold):  # threshold [B] u32
        candidate = threshold | (jnp.uint32(1) << (jnp.uint32(31) - i.astype(jnp.uint32)))
        count = jnp.sum(keys >= candidate[:, None], axis=-1, dtype=jnp.int32)  # [B]
        return jnp.where(count >= k, candidate, threshold)

    threshold = lax.fori_loop(0, 32, add_bit, jnp.zeros(logits.shape[:1], jnp.uint32))
    return jnp.where(keys >= threshold[:, None], logits, -jnp.inf)


def apply_top_p(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep the smallest top set of tokens whose probability mass is >= top_p (ties kept).

    logits [B, V] f32, top_p [B] f32 (>= 1 keeps all). The threshold is the largest probability
    tau with sum(p[p >= tau]) >= top_p, found over the int32 bits of the non-negative probabilities
    (order-preserving as they are), one bit per pass from bit 30 down.
    """
    probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
    bits = lax.bitcast_convert_type(probs, jnp.int32)  # [B, V]
    target = top_p[:, None]  # [B, 1]

    def add_bit(i, threshold):  # threshold [B] i32
        candidate = threshold | (jnp.int32(1) << (jnp.int32(30) - i))
        kept = jnp.where(bits >= candidate[:, None], probs, 0.0)
        mass = jnp.sum(kept, axis=-1, keepdims=True)  # [B, 1]
        return jnp.where(mass[:, 0] >= target[:, 0], candidate, threshold)

    threshold = lax.fori_loop(0, 31, add_bit, jnp.zeros(logits.shape[:1], jnp.int32))
    # The float32 total can fall just short of 1.0, so top_p >= 1 must not depend on the mass test.
    keep = (bits >= threshold[:, None]) | (target >= 1.0)
    return jnp.where(keep, logits, -jnp.inf)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Keep tokens with p >= min_p * max(p); logits [B, V] f32, min_p [B] f32 (0 keeps all)."""
    # p / max(p) needs no normalisation, and the argmax always has ratio 1 so is always kept.
    ratio = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [B, V]
    return jnp.where(ratio >= min_p[:, None], logits, -jnp.inf)


def _gumbel_noise(seed: jax.Array, position: jax.Array, vocab: int) -> jax.Array:
    """[B, V] noise that depends only on (seed, position) of each row, never on the batch."""

    def row(s, p):
        key = jax.random.fold_in(jax.random.key(s), p)
        return jax.random.gumbel(key, (vocab,), jnp.float32)

    return jax.vmap(row)(seed, position)


VARIANTS = ("greedy", "random", "full")


def variant_for(md: SamplingMetadata) -> str:
    """The cheapest sampler variant that serves every row of a step (host side, on the numpy metadata).

    greedy  argmax only
    random  greedy rows argmax, the others temperature + Gumbel-max
    full    every feature: logprobs, logit bias, penalties, min_tokens, top-k / top-p / min-p
    A row gets the same token from every variant that serves it (the extra passes of `full` leave a row
    that does not use them bit-identical), so the choice never changes a request's output.
    """
    sampled = md.temperature >= GREEDY_TEMPERATURE
    if (
        (md.num_logprobs >= 0).any() or md.has_bias.any() or md.suppress_stop.any()
        or (md.repetition_penalty != 1.0).any() or (md.presence_penalty != 0.0).any()
        or (md.frequency_penalty != 0.0).any()
        or (sampled & ((md.top_k > 0) | (md.top_p < 1.0) | (md.min_p > 0.0))).any()
    ):
        return "full"
    return "random" if sampled.any() else "greedy"


def sample(
    logits: jax.Array,  # [B, V]
    md: SamplingMetadata,
    state: SamplerState,
    *,
    variant: str,
    max_logprobs: int,
) -> tuple[SampleOutput, SamplerState]:
    """Sample one token per row; the tokens are also kept in `state.last_token` for the next step.

    `variant` (see `variant_for`) and `max_logprobs` (K, the width of the top-K outputs) are static. No
    branch depends on device values: a `lax.cond` on XLA:GPU copies its predicate to the host, which
    would stall the host until the step is done and forbid running ahead of the device.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    batch, vocab = logits.shape
    full = variant == "full"
    x = logits.astype(jnp.float32)
    greedy = md.temperature < GREEDY_TEMPERATURE  # [B]

    if full:
        with jax.named_scope("raw_logprobs"):
            # vLLM's default: report logprobs of the model's distribution, not of the processed one.
            raw_logprobs = jax.nn.log_softmax(x, axis=-1)  # [B, V]
        with jax.named_scope("logit_bias"):
            bias = jnp.take(state.logit_bias, md.slot, axis=0, mode="clip")  # [B, V]
            x = jnp.where(md.has_bias[:, None], x + bias, x)
        with jax.named_scope("penalties"):
            prompt_mask = jnp.take(state.prompt_mask, md.slot, axis=0, mode="clip")  # [B, V]
            output_counts = jnp.take(state.output_counts, md.slot, axis=0, mode="clip")  # [B, V]
            x = apply_penalties(x, prompt_mask, output_counts,
                                md.repetition_penalty, md.presence_penalty, md.frequency_penalty)
        with jax.named_scope("min_tokens"):
            stop = jnp.take(state.stop_mask, md.slot, axis=0, mode="clip")  # [B, V]
            x = jnp.where(md.suppress_stop[:, None] & stop, -jnp.inf, x)

    token_ids = jnp.argmax(x, axis=-1).astype(jnp.int32)  # [B] greedy rows
    if variant != "greedy":
        y = x / jnp.where(greedy, 1.0, md.temperature)[:, None]  # [B, V]
        if full:
            with jax.named_scope("top_k"):
                y = apply_top_k(y, jnp.where(greedy, 0, md.top_k))
            with jax.named_scope("top_p"):
                y = apply_top_p(y, jnp.where(greedy, 1.0, md.top_p))
            with jax.named_scope("min_p"):
                y = apply_min_p(y, jnp.where(greedy, 0.0, md.min_p))
        with jax.named_scope("gumbel_max"):
            # argmax(y + Gumbel) is an exact draw from softmax(y); -inf tokens can never win.
            noise = _gumbel_noise(md.seed.astype(jnp.uint32), md.position, vocab)  # [B, V]
            drawn = jnp.argmax(y + noise, axis=-1).astype(jnp.int32)  # [B]
        token_ids = jnp.where(greedy, token_ids, drawn)

    k = max_logprobs
    if full:
        token_logprobs = jnp.take_along_axis(raw_logprobs, token_ids[:, None], axis=-1)[:, 0]  # [B]
        ranks = 1 + jnp.sum(raw_logprobs > token_logprobs[:, None], axis=-1, dtype=jnp.int32)
        with jax.named_scope("top_logprobs"):
            if k:
                top_logprobs, top_ids = lax.top_k(raw_logprobs, k)
                top_ids = top_ids.astype(jnp.int32)
            else:
                top_logprobs, top_ids = jnp.zeros((batch, 0), jnp.float32), jnp.zeros((batch, 0), jnp.int32)
    else:  # nobody asked: the host does not read them
        token_logprobs = jnp.zeros((batch,), jnp.float32)
        ranks = jnp.zeros((batch,), jnp.int32)
        top_logprobs, top_ids = jnp.zeros((batch, k), jnp.float32), jnp.zeros((batch, k), jnp.int32)

    # A row whose logits hold a NaN or +inf (a numerical fault of the model) samples -1: the host ends that request
    # with an error rather than emit a token drawn from garbage.
    broken = jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1)  # [B]
    token_ids = jnp.where(broken, -1, token_ids)
    state = dataclasses.replace(state, last_token=state.last_token.at[md.slot].set(token_ids, mode="drop"))
    return SampleOutput(token_ids, token_logprobs, top_ids, top_logprobs, ranks), state
