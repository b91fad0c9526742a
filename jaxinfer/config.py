"""Model and engine configuration: frozen dataclasses, validated once, built by one constructor each.

`ModelConfig.from_hf(dict)` reads an HF `config.json`; `ModelConfig.from_gguf(fields)` reads GGUF metadata;
named presets live in `configs/models/*.json` (HF config.json format) and load through `from_hf` too.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxinfer.spec_decode import SpeculativeConfig

# Architectures the one decoder in model.py covers, and what distinguishes them.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Gemma3ForCausalLM": "gemma3",
}

# What `quantization=` accepts: on-the-fly schemes (vLLM's names), "none" (every checkpoint weight dequantized
# to the model dtype at load), and the checkpoint formats, which are detected anyway (naming one checks it).
ON_THE_FLY_QUANTIZATION = ("int8", "int4", "fp8")
CHECKPOINT_QUANTIZATION = ("gguf", "gptq", "awq", "auto-round", "compressed-tensors")  # and "fp8" checkpoints
QUANTIZATION_CHOICES = ("none", *ON_THE_FLY_QUANTIZATION, *CHECKPOINT_QUANTIZATION)

# auto: the model dtype; fp8 (float8_e4m3fn) and int8: 8-bit caches holding twice the tokens, with scales
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8", "float8_e4m3fn", "int8")

# Presets: configs/ of a source checkout, or the copy a wheel installs as the package jaxinfer.configs.
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
if not (CONFIGS_DIR / "models").is_dir():
    CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency scaling ("llama3"), or linear position interpolation ("linear")."""

    kind: str = "none"  # none | llama3 | linear
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @staticmethod
    def from_hf(d: dict | None) -> "RopeScaling":
        if not d:
            return RopeScaling()
        kind = d.get("rope_type", d.get("type", "default"))
        if kind == "default":
            return RopeScaling()
        if kind == "llama3":
            return RopeScaling(
                "llama3",
                float(d["factor"]),
                float(d.get("low_freq_factor", 1.0)),
                float(d.get("high_freq_factor", 4.0)),
                int(d.get("original_max_position_embeddings", 8192)),
            )
        if kind == "linear":
            return RopeScaling("linear", float(d["factor"]))
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, llama3, linear)")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder, dense or mixture-of-experts."""

    arch: str  # llama | mistral | qwen2 | qwen3 | qwen3_moe | mixtral | gemma3
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection biases (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    sliding_window: int | None = None  # Mistral
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    # each of the checkpoint's kv heads held this many times (num_kv_heads counts the copies): tensor parallelism over
    # more devices than the checkpoint has kv heads gives every device one (model.tensor_parallel_config)
    kv_replicas: int = 1
    # Mixture of experts (0 experts: a dense model). Each token's router picks num_experts_per_tok of num_experts
    # MLPs of width moe_intermediate_size (softmax over all experts, then top-k; norm_topk_prob: the k weights
    # renormalised to sum to 1); dense_layers run the dense MLP of width intermediate_size instead.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    dense_layers: tuple[int, ...] = ()
    # experts split over the tensor-parallel devices by expert, not by MLP width (model.tensor_parallel_config)
    expert_parallel: bool = False
    # Gemma 3: local layers (sliding_layers use sliding_window, with rope base local_rope_theta and no rope scaling)
    # between global ones; None: every layer uses sliding_window (Mistral), or none does
    sliding_layers: tuple[int, ...] | None = None
    local_rope_theta: float | None = None
    query_pre_attn_scalar: float | None = None  # attention scale query_pre_attn_scalar ** -0.5 (None: head_dim's)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), in the model dtype
    sandwich_norms: bool = False  # RMSNorm on the attention's and the MLP's outputs too, before each residual add
    hidden_act: str = "silu"  # silu | gelu_tanh: the gated MLP's activation

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, f) <= 0:
                raise ValueError(f"model config: {f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.kv_replicas < 1 or self.num_kv_heads % self.kv_replicas:
            raise ValueError(f"model config: kv_replicas ({self.kv_replicas}) must divide num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.arch not in SUPPORTED_ARCHITECTURES.values():
            raise ValueError(f"model config: unknown arch {self.arch!r}")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"model config: hidden_act must be silu or gelu_tanh, got {self.hidden_act!r}")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"model config: num_experts_per_tok must be in 1..num_experts ({self.num_experts}), "
                                 f"got {self.num_experts_per_tok}")
            if self.moe_intermediate_size <= 0:
                raise ValueError(f"model config: moe_intermediate_size must be positive, got {self.moe_intermediate_size}")

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.dense_layers

    def layer_window(self, i: int) -> int | None:
        """Layer i's sliding window (None: it attends to the whole context)."""
        return self.sliding_window if self.sliding_layers is None or i in self.sliding_layers else None

    def layer_rope(self, i: int) -> tuple[float, "RopeScaling"]:
        """Layer i's rope base and scaling: a Gemma 3 local layer's own base, unscaled; else the model's."""
        if self.local_rope_theta is not None and self.layer_window(i) is not None:
            return self.local_rope_theta, RopeScaling()
        return self.rope_theta, self.rope_scaling

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @staticmethod
    def from_hf(cfg: dict[str, Any], name: str = "") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = {"gemma3_text": "gemma3"}.get(cfg.get("model_type"), cfg.get("model_type"))  # else the arch's
            arch = model_type if model_type in SUPPORTED_ARCHITECTURES.values() else None
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            eos = cfg.get("eos_token_id")
            eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            window = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch in ("mistral", "mixtral")) else None
            fields = dict(
                arch=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
                rope_scaling=RopeScaling.from_hf(cfg.get("rope_scaling") or _rope_params_scaling(cfg)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
                qk_norm=arch in ("qwen3", "qwen3_moe", "gemma3"),
                sliding_window=int(window) if window else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos,
                name=name or cfg.get("_name_or_path", ""),
            )
            fields.update(_moe_fields(cfg, arch))
            if arch == "gemma3":
                fields.update(_gemma3_fields(cfg))
            return ModelConfig(**fields)
        except KeyError as e:
            raise ValueError(f"model config is missing key {e.args[0]!r}") from None

    @staticmethod
    def from_gguf(fields: dict[str, Any], name: str = "") -> "ModelConfig":
        """From GGUF metadata (already decoded to Python values)."""
        arch = fields.get("general.architecture")
        if arch not in ("llama", "mistral", "qwen2", "qwen3", "gemma3"):
            raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: llama, mistral, qwen2, qwen3, "
                             "gemma3)")

        def get(key, default=None):
            v = fields.get(f"{arch}.{key}", default)
            if v is None:
                raise ValueError(f"GGUF metadata is missing key {arch}.{key!s}")
            return v

        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        scaling = None
        if fields.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": fields[f"{arch}.rope.scaling.factor"]}
        eos = fields.get("tokenizer.ggml.eos_token_id")
        out = dict(
            arch=arch,
            vocab_size=int(fields.get(f"{arch}.vocab_size") or len(fields["tokenizer.ggml.tokens"])),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(fields.get(f"{arch}.attention.key_length") or hidden // heads),
            max_position_embeddings=int(get("context_length", 4096)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=RopeScaling.from_hf(scaling),
            tie_word_embeddings=False,  # decided by the loader: no output.weight tensor means tied
            attention_bias=arch == "qwen2",
            qk_norm=arch in ("qwen3", "gemma3"),
            sliding_window=None,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(eos),) if eos is not None else (),
            name=name or str(fields.get("general.name", "")),
        )
        if arch == "gemma3":
            # llama.cpp's own constants for Gemma 3 (the GGUF does not store them): every sixth layer global, local
            # rope base 10000 unscaled, the attention scaled by head_dim (the 27B's 62 layers: hidden / heads); the
            # norms are stored as the 1 + w Gemma multiplies by.
            L, heads = out["num_layers"], out["num_heads"]
            out.update(sliding_layers=tuple(i for i in range(L) if (i + 1) % GEMMA3_SLIDING_PATTERN),
                       sliding_window=int(get("attention.sliding_window")), local_rope_theta=GEMMA3_LOCAL_ROPE_THETA,
                       query_pre_attn_scalar=float(hidden // heads if L == 62 else out["head_dim"]),
                       embed_scale=True, sandwich_norms=True, hidden_act="gelu_tanh")
        return ModelConfig(**out)

    @staticmethod
    def from_preset(name: str) -> "ModelConfig":
        """A named preset from configs/models/<name>.json (HF config.json format)."""
        path = CONFIGS_DIR / "models" / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in (CONFIGS_DIR / "models").glob("*.json"))
            raise ValueError(f"unknown model preset {name!r}; known presets: {known}")
        return ModelConfig.from_hf(json.loads(path.read_text()), name=name)


def engine_preset(name_or_path: str) -> dict:
    """Engine options from configs/engine/<name>.json or configs/deploy/<name>.json, or from a JSON file at that path
    ("_" keys are comments).

    Use them as defaults: `LLM(model, **{**engine_preset("h100-llama-3.1-8b"), "max_model_len": 8192})`.
    """
    path = Path(name_or_path)
    for folder in ("engine", "deploy"):  # deploy: a machine's presets (TPU slices, GCP GPU machine types)
        if not path.is_file():
            path = CONFIGS_DIR / folder / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for folder in ("engine", "deploy") for p in (CONFIGS_DIR / folder).glob("*.json"))
        raise ValueError(f"engine config {name_or_path!r} is neither a JSON file nor a preset; known presets: {known}")
    try:
        options = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"engine config {path}: not valid JSON ({e})") from None
    if not isinstance(options, dict):
        raise ValueError(f"engine config {path}: expected a JSON object of engine options")
    options = {k: v for k, v in options.items() if not k.startswith("_")}
    EngineConfig.from_options(**options)  # unknown or bad options fail here, naming the option
    return options


GEMMA3_SLIDING_PATTERN = 6  # Gemma 3: five local layers, then a global one
GEMMA3_LOCAL_ROPE_THETA = 10000.0


def _gemma3_fields(cfg: dict) -> dict:
    """ModelConfig's Gemma 3 fields from an HF Gemma3TextConfig (transformers 4.5x's flat rope keys, or 5's
    rope_parameters per layer type): local / global layers, their rope, the attention scale, GeGLU, the embedding
    scale, the four norms per layer."""
    L = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types:
        sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    else:
        every = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or GEMMA3_SLIDING_PATTERN)
        sliding = tuple(i for i in range(L) if (i + 1) % every)
    rp = cfg.get("rope_parameters") or {}
    full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    out = dict(sliding_layers=sliding, embed_scale=True, sandwich_norms=True,
               local_rope_theta=float(local.get("rope_theta", cfg.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_THETA))),
               query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or cfg.get("head_dim") or 256),
               hidden_act=_activation(cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"),
               tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
               sliding_window=int(cfg.get("sliding_window") or 4096))
    if full:
        out["rope_theta"] = float(full.get("rope_theta", cfg.get("rope_theta", 1e6)))
        out["rope_scaling"] = RopeScaling.from_hf(full if full.get("rope_type", "default") != "default" else None)
    for k in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(k):
            raise ValueError(f"model config: {k} is not supported (Gemma 2's); Gemma 3 has none")
    return out


def _activation(name: str) -> str:
    acts = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
    if name not in acts:
        raise ValueError(f"model config: activation {name!r} is not supported (supported: {sorted(acts)})")
    return acts[name]


def _moe_fields(cfg: dict, arch: str) -> dict:
    """ModelConfig's mixture-of-experts fields from an HF config: Qwen3-MoE (num_experts, moe_intermediate_size,
    norm_topk_prob, dense layers from mlp_only_layers and decoder_sparse_step) or Mixtral (num_local_experts of
    width intermediate_size, the top-k weights always renormalised)."""
    if arch == "mixtral":
        return dict(num_experts=int(cfg.get("num_local_experts", 8)), num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)),
                    moe_intermediate_size=int(cfg["intermediate_size"]), norm_topk_prob=True)
    E = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)  # transformers >= 5 writes the latter
    if arch == "qwen3_moe" and E > 0:
        L, step = int(cfg["num_hidden_layers"]), int(cfg.get("decoder_sparse_step") or 1)
        only = set(cfg.get("mlp_only_layers") or ())
        return dict(num_experts=E, num_experts_per_tok=int(cfg.get("num_experts_per_tok", 8)),
                    moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                    dense_layers=tuple(i for i in range(L) if i in only or (i + 1) % step))
    return {}


def _rope_params_scaling(cfg: dict) -> dict | None:
    # transformers >= 5 nests rope settings under "rope_parameters".
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp.get("rope_type", "default") != "default":
        return rp
    return None


def parse_bytes(s: str | int | float | None) -> int | None:
    """'4GiB', '512MB', '1e9', 123 -> bytes."""
    if s is None or isinstance(s, (int, float)):
        return None if s is None else int(s)
    t = s.strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}
    for u, mult in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    return int(float(t))


def _is_int(v) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# A mixed (T, B) bucket is compiled only for B >= T / this (see EngineConfig.buckets).
MIXED_TOKENS_PER_ROW = 16


CPU_MIXED_STEP_TOKENS = 64


@dataclass(frozen=True)
class EngineConfig:
    """Everything about how the engine runs a model, independent of the model's shape.

    `buckets()` (drawn from `token_buckets` x `seq_buckets`) is the set of step shapes compiled ahead of time:
    every step is padded to the smallest (T, B) bucket with T >= scheduled tokens and B >= scheduled sequences.
    A step where every sequence feeds one token (decode) goes to a decode bucket (B, B).
    """

    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 16
    max_num_batched_tokens: int | None = None  # per-step token budget; None: the largest token bucket
    # the most tokens of a step that carries decodes (prompt chunks get what the decodes leave): bounds the time
    # between a running stream's tokens while long prompts are admitted. None: CPU_MIXED_STEP_TOKENS on a CPU (where
    # a step costs about its token count: 256 tokens ~1.7 s for the default model on 2 cores), the token budget on
    # GPU / TPU (benchmarks/long_prompt_itl.py)
    mixed_step_token_budget: int | None = None
    token_buckets: tuple[int, ...] = (1, 4, 16, 64, 256)
    seq_buckets: tuple[int, ...] = (1, 4, 16)
    # more row counts for decode steps only (vLLM's cudagraph_capture_sizes): each adds one forward program and its
    # sampler programs, and no mixed (T, B) buckets; a decode step of 140 rows runs as 160 instead of 256
    decode_buckets: tuple[int, ...] = ()
    page_size: int = 16
    kv_cache_memory: int | None = None  # bytes of KV cache per device; None: memory_fraction of free device memory
    memory_fraction: float = 0.9
    num_pages: int | None = None  # overrides the memory budget (tests)
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU/TPU
    kv_cache_dtype: str = "auto"  # auto: same as dtype; fp8 (e4m3) / int8: an 8-bit cache with calibrated scales
    attention_impl: str = "auto"  # auto | reference | xla | tpu | gpu (see jaxinfer/attention.py)
    attention_interpret: bool = False  # run a Pallas attention kernel in interpret mode (CPU tests)
    enable_prefix_caching: bool = True  # reuse the KV pages of a cached prompt prefix (page_allocator.py)
    async_scheduling: bool = True  # launch step N+1 before reading step N's tokens (engine.py)
    max_logprobs: int = 20
    max_logit_bias: int = 300
    compilation_cache_dir: str | None = None  # persistent XLA cache; None: $JAXINFER_CACHE_DIR/xla or ~/.cache/jaxinfer/xla
    use_compilation_cache: bool = True
    compile_threads: int = 0  # 0: one per CPU core, at most 8
    warm_up: bool | None = None  # run every program once at start-up (runner.warm_up); None: on GPU / TPU, not on CPU
    # traffic-adaptive buckets (adaptive_buckets.py): token sizes learned from the prompt-carrying steps served, every
    # adaptive_window of them, compiled beside serving, at most adaptive_max_buckets programs over the engine's life
    adaptive_buckets: bool = False
    adaptive_window: int = 256
    adaptive_max_buckets: int = 8
    seed: int = 0
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    # None: as the checkpoint is (quantized checkpoints detected and kept quantized); "none": dequantize every
    # weight to dtype at load; "int8" / "int4" / "fp8": quantize a float checkpoint at load (jaxinfer/quant.py)
    quantization: str | None = None
    show_progress: bool = True
    # speculative decoding (spec_decode.py): vLLM's dict, e.g. {"method": "ngram", "num_speculative_tokens": 3}; None: off
    speculative_config: SpeculativeConfig | None = None
    # devices the model is split over (tensor parallelism: a mesh of the first N devices, model.tensor_parallel_config)
    tensor_parallel_size: int = 1
    # a mixture-of-experts model's experts split over those devices by expert (whole experts per device), not by width
    enable_expert_parallel: bool = False
    # engine replicas, each on tensor_parallel_size devices of its own, behind one front (data_parallel.py)
    data_parallel_size: int = 1

    def __post_init__(self):
        for name, lo, optional in (("max_model_len", 1, True), ("max_num_seqs", 1, False), ("tensor_parallel_size", 1, False),
                                   ("data_parallel_size", 1, False),
                                   ("max_num_batched_tokens", 1, True), ("mixed_step_token_budget", 1, True),
                                   ("page_size", 1, False),
                                   ("num_pages", 1, True), ("max_logprobs", 0, False), ("max_logit_bias", 0, False),
                                   ("compile_threads", 0, False), ("seed", -(2**63), False)):
            v = getattr(self, name)
            if not (v is None and optional) and (not _is_int(v) or v < lo):
                raise ValueError(f"{name} must be an integer >= {lo}{' (or None)' if optional else ''}, got {v!r}")
        for name in ("token_buckets", "seq_buckets", "decode_buckets"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or not all(_is_int(x) and x >= 1 for x in v):
                raise ValueError(f"{name} must be a list of integers >= 1, got {v!r}")
        if self.kv_cache_memory is not None and (not _is_int(self.kv_cache_memory) or self.kv_cache_memory < 1):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes (or None), "
                             f"got {self.kv_cache_memory!r}")
        for name in ("attention_interpret", "enable_prefix_caching", "async_scheduling", "use_compilation_cache",
                     "show_progress", "adaptive_buckets", "enable_expert_parallel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if not self.token_buckets or sorted(set(self.token_buckets)) != list(self.token_buckets):
            raise ValueError(f"token_buckets must be a non-empty increasing list, got {self.token_buckets}")
        if not self.seq_buckets or sorted(set(self.seq_buckets)) != list(self.seq_buckets):
            raise ValueError(f"seq_buckets must be a non-empty increasing list, got {self.seq_buckets}")
        if self.seq_buckets[-1] < self.max_num_seqs:
            raise ValueError(f"the largest seq bucket ({self.seq_buckets[-1]}) must be >= max_num_seqs ({self.max_num_seqs})")
        seq_bucket = next(b for b in self.seq_buckets if b >= self.max_num_seqs)
        if sorted(set(self.decode_buckets)) != list(self.decode_buckets) or \
                any(b > seq_bucket for b in self.decode_buckets):
            raise ValueError(f"decode_buckets must be an increasing list of row counts up to the seq bucket that holds "
                             f"max_num_seqs ({seq_bucket}), got {self.decode_buckets}")
        if self.token_buckets[-1] < seq_bucket:  # else a step of max_num_seqs sequences fits no bucket
            raise ValueError(f"the largest token bucket ({self.token_buckets[-1]}) must be >= the seq bucket that holds "
                             f"max_num_seqs ({seq_bucket})")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens > self.token_buckets[-1]:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) exceeds the largest token bucket ({self.token_buckets[-1]})"
            )
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.attention_impl not in ("auto", "reference", "xla", "tpu", "gpu"):
            raise ValueError(f"attention_impl must be auto, reference, xla, tpu or gpu, got {self.attention_impl!r}")
        if self.warm_up not in (None, True, False):
            raise ValueError(f"warm_up must be true, false or null (auto), got {self.warm_up!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"quantization must be one of {list(QUANTIZATION_CHOICES)} (or None: as the checkpoint "
                             f"is), got {self.quantization!r}")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors, gguf or dummy, got {self.load_format!r}")
        for name in ("adaptive_window", "adaptive_max_buckets"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.adaptive_buckets and self.speculative_config is not None:
            raise ValueError("adaptive_buckets: not with speculative decoding yet (its draft programs would need the "
                             "new sizes too); leave one of them off")
        # a dict (or None) becomes a SpeculativeConfig: bad keys and values raise here, naming them
        object.__setattr__(self, "speculative_config", SpeculativeConfig.from_dict(self.speculative_config))
        sq = self.speculative_config.quantization if self.speculative_config else None
        if sq is not None and sq not in QUANTIZATION_CHOICES:
            raise ValueError(f"speculative_config.quantization must be one of {list(QUANTIZATION_CHOICES)} (or None: "
                             f"as the draft checkpoint is), got {sq!r}")

    def mixed_step_tokens(self, backend: str) -> int | None:
        """`mixed_step_token_budget`, or its default on this backend (None: no bound below the token budget)."""
        if self.mixed_step_token_budget is not None:
            return self.mixed_step_token_budget
        return CPU_MIXED_STEP_TOKENS if backend == "cpu" else None

    def warms_up(self, backend: str) -> bool:
        """Whether start-up runs every program once: `warm_up`, or by default on a GPU / TPU (not on CPU,
        where a first run costs nothing extra)."""
        return self.warm_up if self.warm_up is not None else backend != "cpu"

    @property
    def token_budget(self) -> int:
        return self.max_num_batched_tokens or self.token_buckets[-1]

    def buckets(self) -> list[tuple[int, int, bool]]:
        """(T, B, decode) step shapes to compile, sorted; B up to the seq bucket that holds max_num_seqs.

        decode buckets (B, B, True), one per seq bucket and per `decode_buckets` entry: every sequence feeds exactly
        one token, so attention runs its decode kernel. Mixed buckets (T, B, False) for every token bucket with the
        smaller seq buckets (a step with more tokens than sequences), and (T, T, False) only for the largest token bucket when it is
        also a seq bucket (nothing larger could hold such a step). A mixed bucket's B only sizes its logits and
        sampling (B rows), which next to T tokens of forward pass cost little: so T gets only the seq buckets
        with B >= T / MIXED_TOKENS_PER_ROW, and always the largest one below T (an 8192-token step samples 512
        rows, not 32; a step never moves to a larger T for want of a small B).
        With speculative decoding, verify buckets (V, V, False) too (`verify_sizes`): a verifying sequence samples
        at each of its tokens, so such a step needs as many sampled rows as it may have tokens.
        """
        max_b = next(b for b in self.seq_buckets if b >= self.max_num_seqs)
        seqs = [b for b in self.seq_buckets if b <= max_b]
        tmax = self.token_buckets[-1]
        mixed = []
        for t in self.token_buckets:
            fits = [b for b in seqs if b < t or b == t == tmax]
            # B >= T / 16, and always the largest B that fits T: a step is never moved to a larger T for want of B
            mixed += [(t, b, False) for b in fits if b * MIXED_TOKENS_PER_ROW >= t or b == fits[-1]]
        verify = [(v, v, False) for v in self.verify_sizes()]
        return sorted(set(mixed + verify + [(b, b, True) for b in (*seqs, *self.decode_buckets)]))

    def verify_sizes(self) -> list[int]:
        """Token counts of the verify buckets: b sequences each feeding its last token and k drafts, b(k + 1), for
        every seq bucket b (capped by the token budget); [] without speculation. A step carrying drafts holds at most
        the largest of these tokens (the scheduler's `max_spec_tokens`), so one of them always fits it."""
        if self.speculative_config is None:
            return []
        max_b = next(b for b in self.seq_buckets if b >= self.max_num_seqs)
        k = self.speculative_config.num_speculative_tokens
        sizes = {min(b * (k + 1), self.token_budget) for b in self.seq_buckets if b <= max_b}
        return sorted(v for v in sizes if v > 1)

    @staticmethod
    def from_options(**options) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(names)}")
        if "kv_cache_memory" in options:
            try:
                options["kv_cache_memory"] = parse_bytes(options["kv_cache_memory"])
            except ValueError:
                raise ValueError(f"kv_cache_memory: expected bytes such as 4GiB or 512MB, got "
                                 f"{options['kv_cache_memory']!r}") from None
        for k in ("token_buckets", "seq_buckets", "decode_buckets"):
            if k in options and isinstance(options[k], (list, tuple)):
                options[k] = tuple(options[k])
        return EngineConfig(**options)

    def cache_dir(self) -> str:
        if self.compilation_cache_dir:
            return self.compilation_cache_dir
        base = os.environ.get("JAXINFER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxinfer")
        return os.path.join(base, "xla")
