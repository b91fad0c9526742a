"""Tokenizers rebuilt from GGUF metadata (no PyTorch at run time) behave like their sources."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxinfer.gguf_tokenizer import tokenizer_from_gguf
from jaxinfer.tokenizer import default_model_path
from test_tokenizer import TEXTS, _build_sp_dir

MORE = TEXTS + ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n", "don't I'll we're 12345 3.14", ""]


def test_default_model_matches_transformers_gguf_conversion():
    path = default_model_path()
    ours = tokenizer_from_gguf(path)
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))  # needs torch
    for text in MORE:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == ref.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)
    assert (ours.eos_token_id, ours.bos_token_id, len(ours)) == (2, 1, 49152)


@pytest.mark.parametrize("with_merges", [True, False])
def test_sentencepiece_byte_fallback_gguf(tmp_path, with_merges):
    """Write a llama-style (SentencePiece BPE + byte fallback) tokenizer into a GGUF and read it back."""
    src = AutoTokenizer.from_pretrained(_build_sp_dir(tmp_path / "sp"))
    tokens = [src.convert_ids_to_tokens(i) for i in range(len(src))]
    types = [3 if t in ("<s>", "</s>") else 2 if t == "<unk>" else 6 if t.startswith("<0x") else 1 for t in tokens]
    import json

    model = json.loads(src.backend_tokenizer.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    # Scores that reproduce the merge order: a piece made by an earlier merge scores higher.
    rank = {"".join(m.split(" ")): i for i, m in enumerate(merges)}
    scores = [-float(rank.get(t, len(merges) + i)) for i, t in enumerate(tokens)]
    path = str(tmp_path / "sp.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    if with_merges:
        w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<s>"))
    w.add_eos_token_id(tokens.index("</s>"))
    w.add_unk_token_id(tokens.index("<unk>"))
    w.add_add_bos_token(True)
    w.add_tensor("dummy", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = tokenizer_from_gguf(path)
    for text in MORE[:6]:
        ids = ours.encode(text)
        assert ids[0] == tokens.index("<s>")  # add_bos_token
        assert ids[1:] == src.encode(text), text  # the source adds no BOS
        assert ours.decode(ids, skip_special_tokens=True) == src.decode(ids, skip_special_tokens=True)
    assert any(t.startswith("<0x") for t in ours.convert_ids_to_tokens(ours.encode("🙂")))
