"""Tests for SamplingParams validation and the on-device sampler (CPU).

Every jitted function is wrapped once at module level and called with a few fixed shapes, so the
whole file compiles a handful of programs. Statistical checks use a chi-square goodness-of-fit test
and require p > 1e-4 (fixed seeds, so a pass is reproducible rather than lucky).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.sampler import (
    SamplingMetadata,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    init_sampler_state,
    sample,
    set_row,
    update_history,
    variant_for,
)
from jaxinfer.sampling_params import SamplingParams

K = 4  # max_logprobs for every sample() call below
_sample_jit = jax.jit(sample, static_argnames=("variant", "max_logprobs"))


def _sample(logits, md, state, *, max_logprobs, variant="full"):
    return _sample_jit(logits, md, state, variant=variant, max_logprobs=max_logprobs)[0]


_update = jax.jit(update_history)
_set_row = jax.jit(set_row)
_top_k = jax.jit(apply_top_k)
_top_p = jax.jit(apply_top_p)
_min_p = jax.jit(apply_min_p)
_penalties = jax.jit(apply_penalties)


def make_md(batch: int, num_slots: int = 4, **overrides) -> SamplingMetadata:
    """Neutral metadata (plain sampling at T=1, no state use), with per-field overrides."""
    fields = dict(
        temperature=np.ones(batch, np.float32),
        top_k=np.zeros(batch, np.int32),
        top_p=np.ones(batch, np.float32),
        min_p=np.zeros(batch, np.float32),
        seed=np.arange(batch, dtype=np.uint32),
        position=np.zeros(batch, np.int32),
        repetition_penalty=np.ones(batch, np.float32),
        presence_penalty=np.zeros(batch, np.float32),
        frequency_penalty=np.zeros(batch, np.float32),
        slot=np.full(batch, num_slots, np.int32),
        has_bias=np.zeros(batch, bool),
        suppress_stop=np.zeros(batch, bool),
        num_logprobs=np.full(batch, -1, np.int32),
    )
    for name, value in overrides.items():
        fields[name] = np.broadcast_to(np.asarray(value, dtype=fields[name].dtype), (batch,)).copy()
    return SamplingMetadata(**fields)


# ---------------------------------------------------------------------------------------------
# SamplingParams


def test_defaults_are_valid():
    p = SamplingParams()
    assert p.n == 1 and p.temperature == 1.0 and p.top_k == 0 and p.max_tokens == 16
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None
    assert not p.greedy
    p.validate_for_model(vocab_size=100, max_logprobs=20, max_logit_bias=300)


def test_normalisation():
    p = SamplingParams(
        top_k=-1, stop="###", logit_bias={"50256": -100, 7: 2.5}, temperature=0, max_tokens=None, seed=-5
    )
    assert p.top_k == 0
    assert p.stop == ["###"]
    assert p.logit_bias == {50256: -100.0, 7: 2.5}
    assert p.greedy and SamplingParams(temperature=1e-6).greedy
    assert p.seed == -5 and p.max_tokens is None
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert SamplingParams(stop_token_ids=(2, 3)).stop_token_ids == [2, 3]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=1000.0), "temperature"),
        (dict(temperature="1"), "temperature"),
        (dict(temperature=True), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=2.0), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3.0), "frequency_penalty"),
        (dict(frequency_penalty=float("-inf")), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(repetition_penalty=1e39), "repetition_penalty"),  # inf in the sampler's float32
        (dict(repetition_penalty=1e-39), "repetition_penalty"),  # 0 / subnormal in float32
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(max_tokens=False), "max_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=20, max_tokens=10), "min_tokens"),
        (dict(n=0), "n"),
        (dict(n=True), "n"),
        (dict(logprobs=-1), "logprobs"),
        (dict(seed=1.5), "seed"),
        (dict(seed=True), "seed"),
        (dict(logit_bias={"abc": 1.0}), "logit_bias"),
        (dict(logit_bias={-4: 1.0}), "logit_bias"),
        (dict(logit_bias={5: 101.0}), "logit_bias"),
        (dict(logit_bias={5: float("nan")}), "logit_bias"),
        (dict(logit_bias={5: True}), "logit_bias"),
        (dict(logit_bias=[1, 2]), "logit_bias"),
        (dict(stop=[""]), "stop"),
        (dict(stop=["ok", 3]), "stop"),
        (dict(stop=5), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(stop_token_ids=[True]), "stop_token_ids"),
        (dict(ignore_eos="yes"), "ignore_eos"),
    ],
)
def test_invalid_params_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(logit_bias={100: 1.0}), "logit_bias"),
        (dict(logit_bias={i: 1.0 for i in range(11)}), "logit_bias"),
        (dict(stop_token_ids=[3, 100]), "stop_token_ids"),
        (dict(logprobs=21), "logprobs"),
    ],
)
def test_validate_for_model(kwargs, name):
    params = SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=name):
        params.validate_for_model(vocab_size=100, max_logprobs=20, max_logit_bias=10)


def test_validate_for_model_accepts_edges():
    SamplingParams(logit_bias={99: 1.0}, stop_token_ids=[0, 99], logprobs=20).validate_for_model(
        vocab_size=100, max_logprobs=20, max_logit_bias=10
    )


# ---------------------------------------------------------------------------------------------
# Threshold filters against sort-based numpy references


def _tied_logits(rng, batch, vocab):
    # Half-unit steps make many exact ties; some entries are already masked.
    x = np.round(rng.normal(0, 2, (batch, vocab)) * 2) / 2
    x[rng.random((batch, vocab)) < 0.15] = -np.inf
    x[0] = -np.inf  # a row with a single live token
    x[0, 5] = 1.0
    return x.astype(np.float32)


def test_top_k_matches_sort_reference():
    rng = np.random.default_rng(0)
    batch, vocab = 64, 48
    x = _tied_logits(rng, batch, vocab)
    k = rng.integers(-1, vocab + 3, batch).astype(np.int32)
    k[:4] = [1, 0, vocab, 2]
    got = np.asarray(_top_k(x, k))
    for r in range(batch):
        if k[r] <= 0 or k[r] >= vocab:
            want = x[r]
        else:
            kth = np.sort(x[r])[::-1][k[r] - 1]
            want = np.where(x[r] >= kth, x[r], -np.inf)
        np.testing.assert_array_equal(got[r], want, err_msg=f"row {r}, k={k[r]}")

    # -0.0 and +0.0 are one value for the threshold, as they are for a sort.
    x = np.array([[1.0, -0.0, 0.0, -1.0, -np.inf, 0.5]], np.float32)
    for k in (2, 3):
        got = np.asarray(_top_k(x, np.array([k], np.int32)))[0]
        np.testing.assert_array_equal(got, [1.0, -0.0, 0.0, -np.inf, -np.inf, 0.5] if k == 3 else
                                      [1.0, -np.inf, -np.inf, -np.inf, -np.inf, 0.5])
    got = np.asarray(_top_k(x, np.array([4], np.int32)))[0]
    np.testing.assert_array_equal(got, [1.0, -0.0, 0.0, -np.inf, -np.inf, 0.5])


def test_top_p_matches_sort_reference():
    rng = np.random.default_rng(1)
    batch, vocab = 64, 48
    x = _tied_logits(rng, batch, vocab)
    top_p = rng.uniform(0.02, 1.0, batch).astype(np.float32)
    top_p[:3] = [1.0, 0.5, 1e-6]
    got = np.asarray(_top_p(x, top_p))
    checked = 0
    for r in range(batch):
        z = x[r].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.sort(p)[::-1]
        cum = np.cumsum(order)
        if top_p[r] < 1 and np.min(np.abs(cum - top_p[r])) < 1e-5:
            continue  # float32 vs float64 rounding could legitimately decide this row either way
        m = np.searchsorted(cum, top_p[r], side="left")  # first index with cum >= top_p
        threshold = order[min(m, vocab - 1)] if top_p[r] < 1 else 0.0
        want = np.where(p >= threshold, x[r], -np.inf)
        np.testing.assert_array_equal(got[r], want, err_msg=f"row {r}, top_p={top_p[r]}")
        checked += 1
    assert checked >= batch - 4


def test_min_p_matches_reference():
    rng = np.random.default_rng(2)
    x = _tied_logits(rng, 32, 48)
    min_p = rng.uniform(0, 1, 32).astype(np.float32)
    min_p[:2] = [0.0, 1.0]
    got = np.asarray(_min_p(x, min_p))
    for r in range(32):
        p = np.exp(x[r].astype(np.float64) - x[r].max())
        if np.min(np.abs(p - min_p[r])) < 1e-5 and min_p[r] not in (0.0, 1.0):
            continue
        np.testing.assert_array_equal(got[r], np.where(p >= min_p[r], x[r], -np.inf))


# ---------------------------------------------------------------------------------------------
# Statistics: empirical frequencies against the intended distribution

STAT_LOGITS = np.array(
    [2.0, 1.6, 1.3, 1.3, 1.0, 0.7, 0.4, 0.0, -0.3, -0.7, -1.0, -1.5, -2.0, -3.0, -4.0, -np.inf],
    np.float32,
)
N_PER_CONFIG = 20_000
MIN_P_VALUE = 1e-4

# (name, temperature, top_k, top_p, min_p)
STAT_CONFIGS = [
    ("temperature_0.7", 0.7, 0, 1.0, 0.0),
    ("temperature_1.3", 1.3, 0, 1.0, 0.0),
    ("top_k_3", 1.0, 3, 1.0, 0.0),
    ("top_p_0.6", 1.0, 0, 0.6, 0.0),
    ("min_p_0.2", 1.0, 0, 1.0, 0.2),
    ("combined", 0.8, 6, 0.9, 0.1),
]


def reference_probs(logits, temperature, top_k, top_p, min_p):
    """vLLM semantics with an explicit sort, in float64."""
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < len(z):
        z = np.where(z >= np.sort(z)[::-1][top_k - 1], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.sort(p)[::-1]
        m = np.searchsorted(np.cumsum(order), top_p)
        p = np.where(p >= order[m], p, 0.0)
        p /= p.sum()
    p = np.where(p >= min_p * p.max(), p, 0.0)
    return p / p.sum()


def chi2_sf(stat: float, dof: int) -> float:
    try:
        from scipy.stats import chi2
    except ImportError:  # Wilson-Hilferty: (X/k)^(1/3) is close to normal
        z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
        return 0.5 * math.erfc(z / math.sqrt(2))
    return float(chi2.sf(stat, dof))


def chi2_pvalue(counts, probs) -> float:
    """Goodness of fit over the allowed tokens, pooling bins with expected count < 5."""
    n = counts.sum()
    expected = probs * n
    allowed = probs > 0
    big = allowed & (expected >= 5)
    obs = list(counts[big])
    exp = list(expected[big])
    small = allowed & ~big
    if small.any():
        obs.append(counts[small].sum())
        exp.append(expected[small].sum())
    obs, exp = np.array(obs, np.float64), np.array(exp, np.float64)
    if len(obs) < 2:
        return 1.0
    stat = float(np.sum((obs - exp) ** 2 / exp))
    return chi2_sf(stat, len(obs) - 1)


@pytest.fixture(scope="module")
def stat_draws():
    """One call samples every config: rows differ in seed and position, as in a real batch."""
    rows = len(STAT_CONFIGS) * N_PER_CONFIG
    cfg = np.repeat(np.arange(len(STAT_CONFIGS)), N_PER_CONFIG)
    table = np.array([c[1:] for c in STAT_CONFIGS], np.float64)
    rng = np.random.default_rng(3)
    md = make_md(
        rows,
        temperature=table[cfg, 0],
        top_k=table[cfg, 1],
        top_p=table[cfg, 2],
        min_p=table[cfg, 3],
        seed=rng.integers(0, 2**32, rows, dtype=np.uint64),
        position=rng.integers(0, 4096, rows),
    )
    logits = np.broadcast_to(STAT_LOGITS, (rows, len(STAT_LOGITS)))
    out = _sample(jnp.asarray(logits), md, init_sampler_state(4, len(STAT_LOGITS)), max_logprobs=K)
    return np.asarray(out.token_ids).reshape(len(STAT_CONFIGS), N_PER_CONFIG)


@pytest.mark.parametrize("index", range(len(STAT_CONFIGS)), ids=[c[0] for c in STAT_CONFIGS])
def test_sampling_distribution(stat_draws, index):
    probs = reference_probs(STAT_LOGITS, *STAT_CONFIGS[index][1:])
    counts = np.bincount(stat_draws[index], minlength=len(STAT_LOGITS))
    outside = counts[probs == 0]
    assert outside.sum() == 0, f"disallowed tokens drawn: {np.nonzero(counts * (probs == 0))[0]}"
    p_value = chi2_pvalue(counts, probs)
    assert p_value > MIN_P_VALUE, f"chi-square p={p_value:.2e}; counts={counts}, probs={probs}"


def test_reference_filters_bite():
    # Guard against the statistics passing because the filters were no-ops in the reference.
    assert (reference_probs(STAT_LOGITS, 1.0, 3, 1.0, 0.0) > 0).sum() == 4  # the 3rd value is tied
    assert (reference_probs(STAT_LOGITS, 1.0, 0, 0.6, 0.0) > 0).sum() == 4  # tie at 1.3 kept
    assert 2 < (reference_probs(STAT_LOGITS, 1.0, 0, 1.0, 0.2) > 0).sum() < 15


# ---------------------------------------------------------------------------------------------
# Greedy, seeds, batch invariance

B, V, S = 8, 64, 4


def _random_logits(seed, batch=B, vocab=V, scale=3.0):
    return np.random.default_rng(seed).normal(0, scale, (batch, vocab)).astype(np.float32)


def test_greedy_is_argmax():
    logits = _random_logits(10)
    md = make_md(B, temperature=0.0, top_k=2, top_p=0.1, min_p=0.5)
    out = _sample(logits, md, init_sampler_state(S, V), max_logprobs=K)
    np.testing.assert_array_equal(np.asarray(out.token_ids), logits.argmax(-1))


def test_mixed_greedy_and_random_rows():
    logits = _random_logits(11, scale=0.1)  # near-uniform so random rows rarely hit the argmax
    temperature = np.array([0, 1, 0, 1, 0, 1, 0, 1], np.float32)
    outs = [
        np.asarray(_sample(logits, make_md(B, temperature=temperature, position=p), init_sampler_state(S, V),
                           max_logprobs=K).token_ids)
        for p in range(6)
    ]
    outs = np.stack(outs)  # [6, B]
    np.testing.assert_array_equal(outs[:, ::2], np.broadcast_to(logits.argmax(-1)[::2], (6, 4)))
    assert len(np.unique(outs[:, 1::2])) > 6


def test_tiny_top_p_and_full_min_p_keep_the_argmax():
    logits = _random_logits(12)
    argmax = logits.argmax(-1)
    state = init_sampler_state(S, V)
    for md in (make_md(B, top_p=1e-7), make_md(B, min_p=1.0), make_md(B, top_k=1)):
        for position in range(3):
            md.position[:] = position
            np.testing.assert_array_equal(np.asarray(_sample(logits, md, state, max_logprobs=K).token_ids), argmax)


def test_fully_masked_row_returns_a_valid_token():
    state = init_sampler_state(S, V)
    state = _set_row(state, jnp.int32(1), jnp.full(4, V, jnp.int32), jnp.zeros(4), jnp.arange(V, dtype=jnp.int32))
    md = make_md(B, slot=1, suppress_stop=True, top_k=3, top_p=0.5)
    ids = np.asarray(_sample(_random_logits(13), md, state, max_logprobs=K).token_ids)
    assert ((0 <= ids) & (ids < V)).all()


def _neighbour_md(rng, seed, position):
    """A batch with one fixed seeded row at a random index among random neighbours."""
    md = make_md(
        B,
        temperature=rng.choice([0.0, 0.5, 1.0, 2.0], B),
        top_k=rng.choice([0, 2, 10], B),
        top_p=rng.choice([1.0, 0.3, 0.9], B),
        min_p=rng.choice([0.0, 0.1], B),
        seed=rng.integers(0, 2**32, B, dtype=np.uint64),
        position=rng.integers(0, 100, B),
        presence_penalty=rng.choice([0.0, 0.5], B),
    )
    row = int(rng.integers(B))
    for name, value in dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, position=position,
                            presence_penalty=0.0).items():
        getattr(md, name)[row] = value
    return md, row


def test_seeded_row_is_independent_of_its_neighbours():
    rng = np.random.default_rng(14)
    target = np.random.default_rng(15).normal(0, 0.5, V).astype(np.float32)
    state = init_sampler_state(S, V)
    sequences = []
    for trial in range(3):
        tokens = []
        for position in range(12):
            md, row = _neighbour_md(rng, seed=1234, position=position)
            logits = _random_logits(100 + trial * 50 + position)
            logits[row] = target
            tokens.append(int(_sample(logits, md, state, max_logprobs=K).token_ids[row]))
        sequences.append(tokens)
    assert sequences[0] == sequences[1] == sequences[2]
    assert len(set(sequences[0])) > 3  # the position really advances the noise


def test_different_seeds_give_different_samples():
    logits = np.broadcast_to(np.zeros(V, np.float32), (B, V))
    state = init_sampler_state(S, V)
    draws = {}
    for seed in (1, 2):
        draws[seed] = np.concatenate([
            np.asarray(_sample(logits, make_md(B, seed=seed, position=np.arange(B) + p * B), state,
                               max_logprobs=K).token_ids)
            for p in range(4)
        ])
    assert (draws[1] != draws[2]).mean() > 0.8  # uniform over 64: equal by chance ~1/64


# ---------------------------------------------------------------------------------------------
# History, penalties, bias, min_tokens


def test_update_history_counts_and_reset():
    state = init_sampler_state(S, V)
    slots = np.array([0, 0, 0, 1, 1, 1, 2, S], np.int32)  # last entry is padding
    tokens = np.array([3, 3, 5, 7, 7, 7, 9, 11], np.int32)
    is_prompt = np.array([1, 1, 0, 1, 0, 0, 0, 0], bool)
    no_reset = np.full(B, S, np.int32)
    state = _update(state, slots, tokens, is_prompt, no_reset)
    pm, oc = np.asarray(state.prompt_mask), np.asarray(state.output_counts)
    assert set(zip(*np.nonzero(pm))) == {(0, 3), (1, 7)}
    assert {tuple(i): oc[tuple(i)] for i in np.argwhere(oc)} == {(0, 5): 1, (1, 7): 2, (2, 9): 1}

    # Slot 1 is reused by a new request whose prompt is in this step; slot 0 keeps counting.
    reset = no_reset.copy()
    reset[3] = 1
    state = _update(state, np.array([1, 1, 0, S, S, S, S, S], np.int32), np.array([4, 4, 5, 0, 0, 0, 0, 0], np.int32),
                    np.array([1, 0, 0, 0, 0, 0, 0, 0], bool), reset)
    pm, oc = np.asarray(state.prompt_mask), np.asarray(state.output_counts)
    assert set(zip(*np.nonzero(pm))) == {(0, 3), (1, 4)}
    assert {tuple(i): oc[tuple(i)] for i in np.argwhere(oc)} == {(0, 5): 2, (1, 4): 1, (2, 9): 1}


def test_apply_penalties_formulas():
    rng = np.random.default_rng(16)
    logits = rng.normal(0, 2, (B, V)).astype(np.float32)
    prompt = rng.random((B, V)) < 0.2
    counts = rng.integers(0, 3, (B, V)).astype(np.int32) * (rng.random((B, V)) < 0.3)
    rep = rng.uniform(0.5, 2.0, B).astype(np.float32)
    pres = rng.uniform(-2, 2, B).astype(np.float32)
    freq = rng.uniform(-2, 2, B).astype(np.float32)
    got = np.asarray(_penalties(logits, prompt, counts, rep, pres, freq))

    want = logits.copy()
    for r in range(B):
        for t in range(V):
            if prompt[r, t] or counts[r, t] > 0:
                want[r, t] = want[r, t] / rep[r] if want[r, t] > 0 else want[r, t] * rep[r]
            want[r, t] -= freq[r] * counts[r, t] + pres[r] * (counts[r, t] > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    neutral = np.asarray(_penalties(logits, prompt, counts, np.ones(B, np.float32), np.zeros(B, np.float32),
                                    np.zeros(B, np.float32)))
    np.testing.assert_array_equal(neutral, logits)


def test_penalties_steer_greedy_sampling():
    state = init_sampler_state(S, V)
    # Slot 0 has token 3 in its output twice; slot 1 has token 3 in its prompt.
    state = _update(state, np.array([0, 0, 1, S, S, S, S, S], np.int32), np.array([3, 3, 3, 0, 0, 0, 0, 0], np.int32),
                    np.array([0, 0, 1, 0, 0, 0, 0, 0], bool), np.full(B, S, np.int32))
    logits = np.zeros((B, V), np.float32)
    logits[:, 3], logits[:, 5] = 2.0, 1.5
    md = make_md(
        B, temperature=0.0,
        slot=[0, 0, 0, 1, 1, 1, 0, S],
        presence_penalty=[0.6, 0.4, 0, 0.6, 0, 0, 0, 0],
        frequency_penalty=[0, 0, 0.3, 0, 0, 0, 0, 0],
        repetition_penalty=[1, 1, 1, 1, 1.5, 1.2, 1, 1],
    )
    ids = np.asarray(_sample(logits, md, state, max_logprobs=K).token_ids)
    # 2-0.6=1.4<1.5 ; 2-0.4=1.6 ; 2-0.3*2=1.4 ; presence ignores prompt ; 2/1.5=1.33 ; 2/1.2=1.67
    np.testing.assert_array_equal(ids, [5, 3, 5, 3, 5, 3, 3, 3])


def test_logit_bias_applies_only_with_has_bias():
    state = init_sampler_state(S, V)
    state = _set_row(state, jnp.int32(2), jnp.array([9, 0, V, V], jnp.int32), jnp.array([40.0, -100.0, 0, 0]),
                     jnp.full(2, V, jnp.int32))
    logits = _random_logits(17)
    logits[:, 0] = 30.0
    md = make_md(B, temperature=0.0, slot=2, has_bias=[1, 0, 1, 0, 1, 0, 1, 0])
    ids = np.asarray(_sample(logits, md, state, max_logprobs=K).token_ids)
    np.testing.assert_array_equal(ids, [9, 0, 9, 0, 9, 0, 9, 0])

    # Re-admitting the slot replaces, not accumulates, the old row.
    state = _set_row(state, jnp.int32(2), jnp.array([4, V, V, V], jnp.int32), jnp.array([60.0, 0, 0, 0]),
                     jnp.full(2, V, jnp.int32))
    bias = np.asarray(state.logit_bias)
    assert bias[2, 4] == 60.0 and bias[2, 9] == 0.0 and bias[2, 0] == 0.0
    assert not bias[[0, 1, 3]].any()


def test_min_tokens_suppresses_stop_ids():
    state = init_sampler_state(S, V)
    state = _set_row(state, jnp.int32(0), jnp.full(1, V, jnp.int32), jnp.zeros(1), jnp.array([2, 6, V], jnp.int32))
    logits = np.zeros((B, V), np.float32)
    logits[:, 2], logits[:, 6], logits[:, 7] = 5.0, 4.0, 3.0
    md = make_md(B, temperature=0.0, slot=0, suppress_stop=[1, 0, 1, 0, 1, 0, 1, 0])
    ids = np.asarray(_sample(logits, md, state, max_logprobs=K).token_ids)
    np.testing.assert_array_equal(ids, [7, 2] * 4)

    # Sampled rows never draw a suppressed stop id, although they dominate the distribution.
    for position in range(5):
        md = make_md(B, slot=0, suppress_stop=True, position=position, seed=np.arange(B) * 7)
        ids = np.asarray(_sample(logits, md, state, max_logprobs=K).token_ids)
        assert not np.isin(ids, [2, 6]).any()


# ---------------------------------------------------------------------------------------------
# Logprobs


def test_logprobs_are_raw_and_top_k_is_exact():
    logits = _random_logits(18)
    state = init_sampler_state(S, V)
    state = _set_row(state, jnp.int32(1), jnp.array([7], jnp.int32), jnp.array([50.0]), jnp.full(1, V, jnp.int32))
    md = make_md(B, slot=1, has_bias=[1, 1, 0, 0, 0, 0, 0, 0], num_logprobs=[2, -1, 0, 4, -1, 1, 0, 3],
                 temperature=[0, 1, 1, 0.5, 0, 1, 1, 1], presence_penalty=0.5)
    out = _sample(logits, md, state, max_logprobs=K)
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    ids = np.asarray(out.token_ids)
    assert ids[0] == 7  # biased greedy row picks the biased token, but reports its raw logprob
    np.testing.assert_allclose(np.asarray(out.logprobs), raw[np.arange(B), ids], rtol=1e-6, atol=1e-6)

    want_ids = np.argsort(-raw, axis=-1)[:, :K]
    np.testing.assert_array_equal(np.asarray(out.top_ids), want_ids)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), np.take_along_axis(raw, want_ids, -1), rtol=1e-6)
    assert out.top_ids.dtype == jnp.int32 and out.top_ids.shape == (B, K)


def test_logprobs_skipped_without_full_variant_and_zero_width():
    logits = _random_logits(19)
    state = init_sampler_state(S, V)
    md = make_md(B)
    assert variant_for(md) == "random"  # nobody asked for logprobs: they are not computed
    out = _sample(logits, md, state, max_logprobs=K, variant="random")
    assert not np.asarray(out.top_logprobs).any() and not np.asarray(out.top_ids).any()
    assert not np.asarray(out.logprobs).any()

    out = _sample(logits, make_md(B, num_logprobs=0), state, max_logprobs=0)
    assert out.top_ids.shape == (B, 0) and out.top_logprobs.shape == (B, 0)
    np.testing.assert_allclose(
        np.asarray(out.logprobs),
        np.asarray(jax.nn.log_softmax(logits, -1))[np.arange(B), np.asarray(out.token_ids)], rtol=1e-6,
    )


# ---------------------------------------------------------------------------------------------
# Sampler variants: the host picks the cheapest one that serves a step; a row's token never depends on it


def test_variant_for_picks_the_cheapest_that_serves_every_row():
    assert variant_for(make_md(3, temperature=0.0)) == "greedy"
    assert variant_for(make_md(3, temperature=[0.0, 0.7, 0.0])) == "random"
    assert variant_for(make_md(3, temperature=0.0, top_k=5)) == "greedy"  # top-k means nothing to a greedy row
    assert variant_for(make_md(3, temperature=[0.0, 0.7, 0.0], top_p=0.9)) == "full"
    assert variant_for(make_md(3, temperature=0.0, num_logprobs=0)) == "full"
    assert variant_for(make_md(3, temperature=0.0, repetition_penalty=1.1)) == "full"
    assert variant_for(make_md(3, temperature=0.0, has_bias=True)) == "full"
    assert variant_for(make_md(3, temperature=0.0, suppress_stop=True)) == "full"


def test_every_variant_that_serves_a_row_gives_it_the_same_token():
    B, V, S = 6, 64, 8
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(B, V)).astype(np.float32) * 3)
    md = make_md(B, num_slots=S, temperature=[0.0, 0.9, 0.0, 1.3, 0.5, 0.0], seed=np.arange(B) + 11,
                 position=[0, 4, 2, 9, 1, 7], slot=np.arange(B))
    state = init_sampler_state(S, V)
    full = np.asarray(_sample(logits, md, state, max_logprobs=K, variant="full").token_ids)
    random = np.asarray(_sample(logits, md, state, max_logprobs=K, variant="random").token_ids)
    np.testing.assert_array_equal(random, full)
    greedy_rows = np.asarray(md.temperature) == 0
    greedy = np.asarray(_sample(logits, md, state, max_logprobs=K, variant="greedy").token_ids)
    np.testing.assert_array_equal(greedy[greedy_rows], full[greedy_rows])
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))


def test_sampled_tokens_are_kept_per_slot_for_the_next_step():
    B, V, S = 3, 32, 5
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(B, V)).astype(np.float32))
    md = make_md(B, num_slots=S, temperature=0.0, slot=[3, S, 1])  # the middle row is padding
    out, state = _sample_jit(logits, md, init_sampler_state(S, V), variant="greedy", max_logprobs=K)
    ids, last = np.asarray(out.token_ids), np.asarray(state.last_token)
    assert last[3] == ids[0] and last[1] == ids[2] and last[[0, 2, 4]].tolist() == [0, 0, 0]
