"""Shared fixtures: engines are expensive to build (weights + AOT compilation), so each is built once per session."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from jaxinfer import compile_guard

compile_guard.count()  # start counting compilations before any engine warms up

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def bench_module(name: str):
    """benchmarks/<name>.py as a module (the folder goes on sys.path: its scripts import one another by name)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)

# Every compiled CPU program maps its code, and Linux's default vm.max_map_count (65,530) makes XLA crash mid-compile
# when a process reaches it: this suite once held ~62,000 maps at its peak. The fixture below keeps it near 22,000
# (RESULTS.md, "the test suite's memory maps").


@pytest.fixture(scope="module", autouse=True)
def _release_finished_engines():
    """Each Engine freezes what start-up built (gc.freeze): an engine of a finished module that sits in reference
    cycles is collected only once unfrozen, and until then its compiled programs' code stays mapped (a test process
    holding many programs runs out of memory maps, vm.max_map_count, and XLA crashes). Unfreeze and collect after
    each module, and drop jax's caches of the programs its direct `jax.jit` calls compiled (about 6 maps each; the
    session's engines hold their ahead-of-time programs themselves and keep them)."""
    yield
    import gc

    import jax

    gc.unfreeze()
    jax.clear_caches()
    gc.collect()

# Small bucket sets keep CI compile time down; they still exercise padding in both dimensions.
DEFAULT_MODEL_OPTIONS = dict(
    token_buckets=(1, 4, 16, 64), seq_buckets=(1, 4, 16), max_num_seqs=16, max_model_len=1024,
    kv_cache_memory="512MiB", show_progress=False,
)


@pytest.fixture(scope="session")
def default_llm():
    from jaxinfer.llm import shared_llm

    return shared_llm(None, **DEFAULT_MODEL_OPTIONS)  # the same engine `jaxinfer.generate` uses


@pytest.fixture(scope="session")
def default_hf_model():
    """The default GGUF model in HF transformers (PyTorch, fp32): the oracle."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxinfer.tokenizer import default_model_path

    path = default_model_path()
    torch.set_num_threads(os.cpu_count() or 1)
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from hf_models import make_hf_model

    d = tmp_path_factory.mktemp("tiny_llama")
    model = make_hf_model("llama", d)
    return d, model


TINY_ENGINE_OPTIONS = dict(
    token_buckets=(4, 16, 64), seq_buckets=(1, 4, 16), max_num_seqs=16, max_model_len=128, page_size=4,
    show_progress=False, use_compilation_cache=False,
)


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_dir):
    import jaxinfer

    return jaxinfer.LLM(str(tiny_llama_dir[0]), num_pages=160, **TINY_ENGINE_OPTIONS)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A random 2-layer Llama with the default model's vocabulary and tokenizer (chat template included)."""
    import torch
    import transformers
    from hf_models import TINY

    from jaxinfer.tokenizer import Tokenizer, default_model_path

    d = tmp_path_factory.mktemp("tiny_chat")
    tok = Tokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**TINY, "vocab_size": max(49152, tok.vocab_size)},
                                   eos_token_id=tok.hf.eos_token_id, bos_token_id=tok.hf.bos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    tok.hf.save_pretrained(d)
    return str(d)
