"""Speculative decoding, host side: the n-gram proposer, greedy acceptance, the config's validation."""

import pytest

from jaxinfer.spec_decode import SpeculativeConfig, accept_greedy, ngram_propose


def test_ngram_proposes_what_followed_the_latest_occurrence():
    #        0  1  2  3  4  5  6  7  8  9
    toks = [5, 1, 2, 3, 9, 1, 2, 3, 4, 1, 2]
    # suffix [1, 2] (n = 2; [4, 1, 2] never occurred before) last occurred at 5: then 3, 4, 1, 2
    assert ngram_propose(toks, k=3, n_max=3, n_min=2) == [3, 4, 1]
    assert ngram_propose(toks, k=10, n_max=3, n_min=2) == [3, 4, 1, 2]  # runs up to the end
    # the longest suffix wins: [9, 1, 2] occurred once, at 4, followed by 3
    assert ngram_propose([9, 1, 2, 3, 7, 1, 2, 8, 9, 1, 2], k=1, n_max=3, n_min=1) == [3]
    assert ngram_propose([1, 2, 3, 4], k=2, n_max=3, n_min=1) == []  # nothing repeats
    assert ngram_propose([7], k=2, n_max=3, n_min=1) == []
    assert ngram_propose([7, 7], k=2, n_max=3, n_min=1) == [7]
    assert ngram_propose([1, 2, 3, 9, 2, 3], k=2, n_max=4, n_min=3) == []  # only a 2-gram matches


def test_accept_greedy_keeps_the_targets_tokens():
    assert accept_greedy([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]  # all accepted, plus the bonus token
    assert accept_greedy([4, 5, 6], [4, 9, 6, 7]) == [4, 9]  # stops at the first difference, with the target's
    assert accept_greedy([4, 5, 6], [1, 5, 6, 7]) == [1]
    assert accept_greedy([], [3]) == [3]


def test_speculative_config_validation():
    c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5,
                                     "prompt_lookup_min": 2})
    assert c.num_speculative_tokens == 3 and SpeculativeConfig.from_dict(None) is None
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig.from_dict({"method": "medusa"})
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculativeConfig(prompt_lookup_min=5, prompt_lookup_max=2)
    with pytest.raises(ValueError, match="unknown keys"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_spec_tokens": 2})
