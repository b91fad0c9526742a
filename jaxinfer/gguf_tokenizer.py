"""A fast (HF `tokenizers`) tokenizer rebuilt from a GGUF file's metadata, without PyTorch.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and special ids
under `tokenizer.ggml.*`. Two models cover the Llama family:
  gpt2   byte-level BPE (Llama 3, Qwen2/3, SmolLM, ...); how text is split before BPE is named by
         `tokenizer.ggml.pre` and mirrored here from llama.cpp's pre-tokenizer table;
  llama  SentencePiece BPE with byte fallback (Llama 2, Mistral); merges from the file, or recovered
         from the token scores when the file has none.
(transformers can also convert GGUF tokenizers, but its GGUF reader needs PyTorch, which is not a
runtime dependency of jaxinfer.)
"""

from __future__ import annotations

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split(pattern: str):
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)


def _byte_level_pre(pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("llama-bpe", "llama3", "smaug-bpe", "dbrx"):
        return pre_tokenizers.Sequence([_split(_LLAMA3_PAT), byte_level])
    if pre in ("qwen2", "qwen35", "deepseek-r1-qwen"):
        return pre_tokenizers.Sequence([_split(_QWEN2_PAT), byte_level])
    if pre == "smollm":  # digits one by one, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _split(_GPT2_PAT), byte_level])
    return pre_tokenizers.Sequence([_split(_GPT2_PAT), byte_level])  # "gpt2", "default" and unknown


def _field(reader, name, default=None):
    f = reader.fields.get(name)
    if f is None:
        return default
    return f.contents()


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE files without merges: every split of a piece into two pieces of the vocabulary is a
    merge, ranked by the merged piece's score (higher merges first), then by the parts' ids."""
    merges = []
    for piece, score in zip(tokens, scores):
        for i in range(1, len(piece)):
            a, b = piece[:i], piece[i:]
            if a in vocab and b in vocab:
                merges.append((-score, vocab[a], vocab[b], a, b))
    merges.sort()
    return [(a, b) for *_, a, b in merges]


def tokenizer_from_gguf(path: str):
    """A `transformers.PreTrainedTokenizerFast` equivalent to the tokenizer described in the GGUF at `path`."""
    import gguf
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ValueError(f"{path}: GGUF metadata has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = _field(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in (_field(reader, "tokenizer.ggml.merges") or [])]
    vocab = {t: i for i, t in enumerate(tokens)}

    if kind == "gpt2":
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = _byte_level_pre(_field(reader, "tokenizer.ggml.pre"))
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        if not merges:
            scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
            merges = _merges_from_scores(tokens, list(np.asarray(scores, dtype=np.float64)), vocab)
        unk = _field(reader, "tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk] if unk is not None else None,
                                   fuse_unk=True, byte_fallback=True))
        norm = [normalizers.Replace(" ", "\u2581")]
        space_prefix = _field(reader, "tokenizer.ggml.add_space_prefix", True)
        if space_prefix:
            norm.insert(0, normalizers.Prepend("\u2581"))
        tok.normalizer = normalizers.Sequence(norm)
        # the space the normalizer prepends comes off again when decoding; with no prefix added (Gemma), none does
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    else:
        raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")

    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    def token(key):
        i = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = _field(reader, "tokenizer.ggml.add_eos_token", False)
    single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
    specials = [(t, vocab[t]) for t in {bos, eos} if t and ((t == bos and add_bos) or (t == eos and add_eos))]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=single + ["$B:1"], special_tokens=specials)

    template = _field(reader, "tokenizer.chat_template")
    if template is None and _field(reader, "general.architecture") == "gemma3" and "<start_of_turn>" in vocab:
        template = GEMMA_CHAT_TEMPLATE  # llama.cpp's Gemma 3 files may carry none; its own built-in one is this
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"), chat_template=template, clean_up_tokenization_spaces=False,
    )


# Gemma's turn format (text only): a system message is folded into the first user turn, the assistant's role is
# "model", each turn ends with <end_of_turn> (a stop token: Tokenizer._from_gguf).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
