"""The engine end to end with a Pallas attention kernel forced on (interpret mode on CPU): greedy tokens
still equal HF transformers'."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import jaxinfer
from hf_models import hf_greedy

KERNELS = [k for k, mod in (("tpu", "ragged_paged_attention_tpu"), ("gpu", "ragged_paged_attention_gpu"))
           if importlib.util.find_spec(f"pallas_kernels.{mod}") is not None]


def test_both_kernels_are_present():
    assert KERNELS == ["tpu", "gpu"]


@pytest.mark.parametrize("impl", KERNELS)
def test_greedy_matches_hf_with_kernel(impl, tiny_llama_dir):
    d, model = tiny_llama_dir
    llm = jaxinfer.LLM(str(d), attention_impl=impl, attention_interpret=True, token_buckets=(4, 16), seq_buckets=(1, 4),
                       max_num_seqs=4, max_model_len=64, page_size=16, num_pages=24, show_progress=False,
                       use_compilation_cache=False)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 21)]  # 21 > the 16-token budget: chunked
    outs = llm.generate(prompts, jaxinfer.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(model, p, 12)


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
def test_warm_up_changes_no_state(impl, tiny_llama_dir):
    """runner.warm_up runs every program once on an all-padding input: the KV cache and sampler state stay as they
    were (here: after real requests filled them), and generation afterwards still equals HF's. The engine is
    built without its own warm-up, so no earlier warm-up has left its marks in the snapshot."""
    import jax

    d, model = tiny_llama_dir
    llm = jaxinfer.LLM(str(d), attention_impl=impl, attention_interpret=impl != "reference", token_buckets=(4, 16),
                       seq_buckets=(1, 4), max_num_seqs=4, max_model_len=64, page_size=16, num_pages=24,
                       show_progress=False, use_compilation_cache=False, warm_up=False)
    run = llm.engine.runner
    rng = np.random.default_rng(12)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 19)]
    sp = jaxinfer.SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=6, ignore_eos=True,
                                 logit_bias={7: 2.0}, min_tokens=2)
    llm.generate(prompts, sp, use_tqdm=False)
    before = jax.tree_util.tree_map(np.asarray, (run.kv, run.sstate))
    calls = []

    def counted(name, program):
        def call(*args):
            calls.append(name)
            return program(*args)
        return call

    saved = (run.compiled, run.compiled_samplers, run.compiled_prompt_logprobs, run._compiled_set_row,
             run._compiled_history)
    run.compiled = {k: counted(k, p) for k, p in run.compiled.items()}
    run.compiled_samplers = {k: counted(k, p) for k, p in run.compiled_samplers.items()}
    run.compiled_prompt_logprobs = {k: counted(("prompt_logprobs", k), p) for k, p in run.compiled_prompt_logprobs.items()}
    run._compiled_set_row, run._compiled_history = counted("set_row", saved[3]), counted("history", saved[4])
    run.warm_up()
    every = [*saved[0], *saved[1], *(("prompt_logprobs", k) for k in saved[2]), "set_row", "history"]
    assert sorted(map(str, calls)) == sorted(map(str, every))  # every program, once
    (run.compiled, run.compiled_samplers, run.compiled_prompt_logprobs, run._compiled_set_row,
     run._compiled_history) = saved
    after = jax.tree_util.tree_map(np.asarray, (run.kv, run.sstate))
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(a, b)
    greedy = jaxinfer.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for p, o in zip(prompts, llm.generate(prompts, greedy, use_tqdm=False)):
        assert o.outputs[0].token_ids == hf_greedy(model, p, 8)
