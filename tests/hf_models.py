"""Tiny random HF checkpoints of each supported family, written locally (no hub), and a one-sequence forward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.attention import make_attention_fn
from jaxinfer.model import AttentionMetadata, compute_logits, forward, init_kv_cache

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)

# family -> (transformers config class name, extra config fields)
FAMILIES = {
    "llama": ("LlamaConfig", dict(rope_theta=10000.0)),
    "llama3.1": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64))),
    "llama-tied-mqa": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "mistral": ("MistralConfig", dict(sliding_window=24, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
    # mixture of experts: 8 experts, 2 per token, the first layer dense (mlp_only_layers), top-k weights as they are
    "qwen3-moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=False, mlp_only_layers=[0])),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48,
                                      sliding_window=None)),
    # a local layer (window 8) then a global one, each with its rope base; GeGLU, four norms, scaled embeddings
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24, rms_norm_eps=1e-6,
                                        layer_types=["sliding_attention", "full_attention"])),
}

MODEL_CLASSES = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
                 "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM",
                 "Qwen3MoeConfig": "Qwen3MoeForCausalLM", "MixtralConfig": "MixtralForCausalLM",
                 "Gemma3TextConfig": "Gemma3ForCausalLM"}


def make_hf_model(family: str, path, seed: int = 0):
    """Build a random tiny HF model of `family`, save it (safetensors) to `path`, return the torch model."""
    import torch
    import transformers

    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**TINY, **extra})
    cfg.torch_dtype = "float32"
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[cls_name])(cfg).eval()
    with torch.no_grad():  # norms and biases are 1/0 at init; randomise them so a mixed-up leaf shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(".gate.weight"):  # a router: decisive top-k choices (no near-ties to flip on rounding)
                p.mul_(20.0)
    model.save_pretrained(path, safe_serialization=True)
    return model


def sequence_logits(params, cfg, token_ids, page_size: int = 4, impl: str = "xla", kv_dtype=jnp.float32,
                    kv_scales=None) -> np.ndarray:
    """Logits [T, V] of one sequence run through the paged model in one step (pages shuffled on purpose); an
    8-bit `kv_dtype` with its (k, v) [L, K] scales reads the step's keys and values back from that cache."""
    T = len(token_ids)
    n_pages = -(-T // page_size)
    P = n_pages + 3
    perm = np.random.default_rng(0).permutation(P)[:n_pages].astype(np.int32)
    kv = init_kv_cache(cfg, P, page_size, kv_dtype, scales=kv_scales)
    pos = np.arange(T, dtype=np.int32)
    meta = AttentionMetadata(
        slot_mapping=perm[pos // page_size] * page_size + pos % page_size,
        page_tables=perm[None, :],
        kv_lens=np.array([T], np.int32),
        cu_q_lens=np.array([0, T], np.int32),
        num_seqs=np.array(1, np.int32),
    )
    return np.asarray(_logits_fn(cfg, impl)(params, jnp.asarray(token_ids, jnp.int32), pos, kv, meta))


@functools.lru_cache(maxsize=None)
def _logits_fn(cfg, impl):
    attn = make_attention_fn(cfg, impl)

    @jax.jit
    def f(params, tokens, positions, kv, meta):
        h, _ = forward(params, cfg, tokens, positions, kv, meta, attn)
        return compute_logits(params, cfg, h)

    return f


# Engine options for the per-family tiny engines (small pool, small buckets: cheap to compile).
TINY_ENGINE_OPTIONS_FOR_FAMILY = dict(
    token_buckets=(4, 32), seq_buckets=(1, 4), max_num_seqs=4, max_model_len=96, page_size=8, num_pages=48,
    show_progress=False, use_compilation_cache=False,
)


def hf_greedy(model, prompt_ids, max_new_tokens: int) -> list[int]:
    """HF greedy decoding that never stops early (our side runs with ignore_eos=True).

    A hand loop rather than `generate`, which keeps stopping at the checkpoint's EOS whatever it is told;
    each step reruns the whole sequence (no HF cache API involved: the models here are small).
    """
    import torch

    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(int(model(torch.tensor(ids)[None]).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]
