"""The Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, Qwen3, Gemma 3; Qwen3-MoE and Mixtral with
mixture-of-experts MLPs) as pure functions over pytrees.

Glossary:
  T tokens in the step, B sequence rows, D model width, F MLP width, V vocabulary,
  N query heads, K kv heads, G = N // K, H head dim, P cache pages, S tokens per page, L layers,
  E experts, k experts per token, Fe an expert's MLP width.

Every weight leaf is declared once in `param_specs` with its shape and logical axis names; `SHARDING_RULES`
maps logical axes to mesh axes, so the same model runs on one device or a `jax.sharding.Mesh`.
Every matmul goes through `dot`, the one place that takes a quantized weight leaf (`quant.QuantizedWeight`,
declared by the `contract` axes of its spec). The Q, K and V
projections are one weight [D, K, G + 2, H] (each kv head with its query heads), so they are one GEMM: as
three, XLA:GPU turned the small K / V products at one token into multiply + reduce at a third of the
bandwidth, and tensor parallelism still shards whole kv-head groups. Gate and up are one [D, 2, F] weight
(one launch, a wider GEMM: MLP blocks 2-9% faster at 1-64 rows on an H100, even at 256-2048 rows);
sharding its F axis keeps each device's gate and up columns paired.
Layers are unrolled in Python with one KV buffer per layer: each buffer is donated and updated in place,
which on GPU is about 3x faster than a `lax.scan` carrying a stacked cache.

A mixture-of-experts layer keeps its experts as stacked weights with a leading "expert" axis and runs them as
grouped matmuls (`grouped_dot`): the T * k (token, expert) pairs sorted by expert on the device, one
`jax.lax.ragged_dot` per projection over the groups, the outputs weighted and summed back per token. No Python
loop over experts, and no shape depends on the routing, so a bucket's program serves every routing.

Gemma 3 is the same decoder with switches from its config: local layers (a sliding window, their own rope base)
between global ones, each layer's window passed to the attention op; embeddings scaled by sqrt(D); an RMSNorm on the
attention's and the MLP's outputs before each residual add; GeGLU; the attention scaled by query_pre_attn_scalar.
Its norms multiply by 1 + w: the loader stores 1 + w, so `rms_norm` is the one norm of every family.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer import quant
from jaxinfer.config import ModelConfig

# Logical axis -> mesh axis. One table for the whole model (tensor parallelism over "tp").
SHARDING_RULES: dict[str, str | None] = {
    "vocab": "tp",
    "embed": None,
    "q_heads": "tp",
    "kv_heads": "tp",
    "qkv": None,  # the G query heads + key + value of one kv head stay together
    "head_dim": None,
    "mlp": "tp",
    # a mixture-of-experts layer's stacked experts: split by their MLP width like the dense MLP (tensor parallel, every
    # device holds a slice of every expert), or with expert parallelism (ModelConfig.expert_parallel) by expert, whole
    # experts per device; param_specs names the one axis that is split
    "expert": "tp",
    "moe_mlp": "tp",
    "pages": None,
    "page_slot": None,
}


def pytree_dataclass(cls):
    """A frozen dataclass whose fields are all pytree children (None fields hold no leaves)."""
    cls = dataclass(frozen=True)(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@dataclass(frozen=True)
class ParamSpec:
    """Declaration of one weight leaf."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # normal | ones | zeros (dummy weights)
    contract: tuple[int, ...] = ()  # a matmul weight's input dims (the rest are its outputs); () for other leaves

    @property
    def out_axes(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.shape)) if i not in self.contract)

    @property
    def quantized_shape(self) -> tuple[int, ...]:
        """The [*out, I] matrix a `QuantizedWeight` of this leaf stores (unpacked)."""
        return (*(self.shape[i] for i in self.out_axes), math.prod(self.shape[i] for i in self.contract))

    def quantized_axes(self) -> tuple[str | None, ...]:
        """Logical axes of the [*out, I] (and [*out, groups]) arrays: the outputs', then the first input dim's."""
        return (*(self.axes[i] for i in self.out_axes), self.axes[self.contract[0]])


@pytree_dataclass
class LayerParams:
    attn_norm: Any  # [D]
    wqkv: Any  # [D, K, G + 2, H]: per kv head, its G query heads, its key, its value (one GEMM for all three)
    wo: Any  # [N, H, D]
    bqkv: Any  # [K, G + 2, H] or None
    q_norm: Any  # [H] or None
    k_norm: Any  # [H] or None
    mlp_norm: Any  # [D]
    w_gate_up: Any  # [D, 2, F]: gate and up projections as one GEMM (None in a mixture-of-experts layer)
    w_down: Any  # [F, D]
    post_attn_norm: Any = None  # [D] Gemma 3: on the attention's output, before the residual add
    post_mlp_norm: Any = None  # [D] Gemma 3: on the MLP's output
    router: Any = None  # [D, E] a mixture-of-experts layer's router (None in a dense one)
    experts_gate_up: Any = None  # [E, D, 2, Fe]
    experts_down: Any = None  # [E, Fe, D]


@pytree_dataclass
class Params:
    embed: Any  # [V, D]
    layers: list  # [L] LayerParams
    final_norm: Any  # [D]
    lm_head: Any  # [D, V] or None when tied to embed


@pytree_dataclass
class KVCache:
    k: list  # [L] arrays [P, K, S, H]
    v: list  # [L] arrays [P, K, S, H]
    # 8-bit caches (int8, float8_e4m3fn): [L] arrays [K, H], per layer, kv head and channel; a stored value times
    # its scale is the key / value. None for a cache in the model's own float type.
    k_scale: list | None = None
    v_scale: list | None = None


KV_CACHE_8BIT = {"int8": np.dtype(np.int8), "fp8": np.dtype(jnp.float8_e4m3fn),
                 "float8_e4m3fn": np.dtype(jnp.float8_e4m3fn)}


def is_8bit(dtype) -> bool:
    return np.dtype(dtype) in KV_CACHE_8BIT.values()


def to_cache_units(x, scale, dtype):
    """Keys / values [T, K, 1, H] -> what an 8-bit cache stores, still in x's dtype: divided by the per-channel
    scale [K, H], rounded (int8) and clipped to the type's range (casting an out-of-range float to e4m3 gives NaN)."""
    top = 127.0 if np.dtype(dtype) == np.int8 else float(jnp.finfo(jnp.float8_e4m3fn).max)
    y = x.astype(jnp.float32) / scale.astype(jnp.float32)[:, None, :]
    if np.dtype(dtype) == np.int8:
        y = jnp.round(y)
    return jnp.clip(y, -top, top).astype(x.dtype)


@pytree_dataclass
class AttentionMetadata:
    """What the attention op needs to find each token's context in the paged cache (see pallas_kernels)."""

    slot_mapping: Any  # [T] int32 cache slot (page * S + offset) of each new token; padding: P * S
    page_tables: Any  # [B, M] int32
    kv_lens: Any  # [B] int32 context length incl. this step's tokens
    cu_q_lens: Any  # [B + 1] int32
    num_seqs: Any  # [] int32


def param_specs(cfg: ModelConfig) -> Params:
    D, F, V, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = N // K
    bias = cfg.attention_bias

    def layer(i: int):
        moe = cfg.is_moe_layer(i)
        E, Fe = cfg.num_experts, cfg.moe_intermediate_size
        e_ax, f_ax = ("expert", None) if cfg.expert_parallel else (None, "moe_mlp")
        return LayerParams(
            attn_norm=ParamSpec((D,), ("embed",), "ones"),
            wqkv=ParamSpec((D, K, G + 2, H), ("embed", "kv_heads", "qkv", "head_dim"), contract=(0,)),
            wo=ParamSpec((N, H, D), ("q_heads", "head_dim", "embed"), contract=(0, 1)),
            bqkv=ParamSpec((K, G + 2, H), ("kv_heads", "qkv", "head_dim"), "zeros") if bias else None,
            q_norm=ParamSpec((H,), ("head_dim",), "ones") if cfg.qk_norm else None,
            k_norm=ParamSpec((H,), ("head_dim",), "ones") if cfg.qk_norm else None,
            mlp_norm=ParamSpec((D,), ("embed",), "ones"),
            w_gate_up=None if moe else ParamSpec((D, 2, F), ("embed", None, "mlp"), contract=(0,)),
            w_down=None if moe else ParamSpec((F, D), ("mlp", "embed"), contract=(0,)),
            post_attn_norm=ParamSpec((D,), ("embed",), "ones") if cfg.sandwich_norms else None,
            post_mlp_norm=ParamSpec((D,), ("embed",), "ones") if cfg.sandwich_norms else None,
            router=ParamSpec((D, E), ("embed", None), contract=(0,)) if moe else None,
            experts_gate_up=ParamSpec((E, D, 2, Fe), (e_ax, "embed", None, f_ax), contract=(1,)) if moe else None,
            experts_down=ParamSpec((E, Fe, D), (e_ax, f_ax, "embed"), contract=(1,)) if moe else None,
        )

    return Params(
        embed=ParamSpec((V, D), ("vocab", "embed"), contract=(1,)),  # contracted over D as a tied lm_head
        layers=[layer(i) for i in range(cfg.num_layers)],
        final_norm=ParamSpec((D,), ("embed",), "ones"),
        lm_head=None if cfg.tie_word_embeddings else ParamSpec((D, V), ("embed", "vocab"), contract=(0,)),
    )


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def logical_sharding(axes, mesh: Mesh | None, rules=SHARDING_RULES):
    if mesh is None:
        return None
    return NamedSharding(mesh, PartitionSpec(*(rules.get(a) if a else None for a in axes)))


def kv_cache_spec(cfg: ModelConfig, num_pages: int, page_size: int) -> ParamSpec:
    return ParamSpec((num_pages, cfg.num_kv_heads, page_size, cfg.head_dim), ("pages", "kv_heads", "page_slot", "head_dim"), "zeros")


def tp_size(mesh: Mesh | None) -> int:
    """Devices along the mesh axis that the tensor-parallel logical axes map to (1 without a mesh)."""
    return 1 if mesh is None else int(dict(mesh.shape).get(SHARDING_RULES["kv_heads"], 1))


def tensor_parallel_config(cfg: ModelConfig, n: int, expert_parallel: bool = False) -> ModelConfig:
    """cfg for tensor parallelism over n devices: query heads, the MLP and the vocabulary split n ways, the kv heads
    too, or, with fewer kv heads than devices, each held n / K times so every device has one with its share of the
    query heads (as vLLM replicates them; the KV cache holds each copy). A mixture-of-experts model's experts are
    split by their MLP width too, or with `expert_parallel` (vLLM's enable_expert_parallel) by expert: num_experts / n
    whole experts per device (a dense model ignores it). Raises a ValueError naming what does not divide."""
    if n <= 1:
        return cfg
    K = cfg.num_kv_heads // cfg.kv_replicas
    ep = expert_parallel and cfg.num_experts > 0
    sizes = [("num_attention_heads", cfg.num_heads), ("vocab_size", cfg.vocab_size)]
    if not cfg.num_experts or cfg.dense_layers:
        sizes.append(("intermediate_size", cfg.intermediate_size))
    if cfg.num_experts:
        sizes.append(("num_experts", cfg.num_experts) if ep else ("moe_intermediate_size", cfg.moe_intermediate_size))
    for what, size in sizes:
        if size % n:
            raise ValueError(f"tensor_parallel_size {n} must divide the model's {what} ({size})"
                             + (" with expert parallelism" if what == "num_experts" else ""))
    cfg = dataclasses.replace(cfg, expert_parallel=ep)
    if K >= n:
        if K % n:
            raise ValueError(f"tensor_parallel_size {n} must divide the model's num_key_value_heads ({K}), or be a "
                             "multiple of it")
        return dataclasses.replace(cfg, num_kv_heads=K, kv_replicas=1)
    if n % K:
        raise ValueError(f"tensor_parallel_size {n} must be a multiple of the model's num_key_value_heads ({K}), or "
                         "divide it")
    return dataclasses.replace(cfg, num_kv_heads=n, kv_replicas=n // K)


def regroup_kv_heads(x, axis: int, r_from: int, r_to: int):
    """A q/k/v weight's (or bias's) [..., K, G + 2, ...] axes (kv heads at `axis`) from each checkpoint kv head held
    r_from times to r_to times (`tensor_parallel_config`): copy j of head k holds query heads j * G ... (j + 1) * G - 1
    of the head's group, and the same key and value."""
    shape = x.shape
    K, G = shape[axis] // r_from, shape[axis + 1] - 2
    x = x.reshape(*shape[:axis], K, r_from, G + 2, *shape[axis + 2:])
    q = jnp.take(x, jnp.arange(G), axis=axis + 2)  # [.., K, r_from, G, ..]
    q = q.reshape(*shape[:axis], K, r_from * G, *shape[axis + 2:])
    kv = jnp.take(jnp.take(x, 0, axis=axis + 1), jnp.arange(G, G + 2), axis=axis + 1)  # [.., K, 2, ..]
    G1 = r_from * G // r_to
    q = q.reshape(*shape[:axis], K, r_to, G1, *shape[axis + 2:])
    kv = jnp.repeat(jnp.expand_dims(kv, axis + 1), r_to, axis=axis + 1)  # [.., K, r_to, 2, ..]
    out = jnp.concatenate([q, kv], axis=axis + 2)
    return out.reshape(*shape[:axis], K * r_to, G1 + 2, *shape[axis + 2:])


def init_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype, mesh: Mesh | None = None,
                  abstract: bool = False, scales: tuple | None = None) -> KVCache:
    """Zeroed per-layer K and V page arrays; abstract=True: their ShapeDtypeStructs (to compile before allocating).
    An 8-bit dtype carries per-layer, per-channel scales: `scales` = (k [L, K, H], v [L, K, H]) (default 1)."""
    spec = kv_cache_spec(cfg, num_pages, page_size)
    sharding = logical_sharding(spec.axes, mesh)
    if abstract:
        make = lambda: jax.ShapeDtypeStruct(spec.shape, dtype, sharding=sharding)  # noqa: E731
    else:
        make = jax.jit(lambda: jnp.zeros(spec.shape, dtype), out_shardings=sharding)
    kv = KVCache(k=[make() for _ in range(cfg.num_layers)], v=[make() for _ in range(cfg.num_layers)])
    if not is_8bit(dtype):
        return kv
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    head_sharding = logical_sharding(("kv_heads", "head_dim"), mesh)
    if abstract:
        per_layer = lambda _: [jax.ShapeDtypeStruct((K, H), jnp.float32, sharding=head_sharding) for _ in range(L)]  # noqa: E731
    else:
        per_layer = lambda a: [jax.device_put(np.asarray(r, np.float32), head_sharding) for r in a]  # noqa: E731
    ones = np.ones((L, K, H), np.float32)
    k_s, v_s = scales if scales is not None else (ones, ones)
    return dataclasses.replace(kv, k_scale=per_layer(k_s), v_scale=per_layer(v_s))


# ---------------------------------------------------------------------------------------------------------
# The forward pass


# float32 weights on a CPU: steps of up to this many tokens run pallas_kernels/cpu_qmatmul's f32matmul, which reads
# each weight once for all tokens; XLA's dot packs the weight for a few rows (a 4-token step ~2x a 1-token one).
# Measured on the 2-core EPYC (benchmarks/cpu_qmatmul.py --kinds f32k, 30 layers of the default model): the kernel
# takes 0.90x XLA's time at 1 token, 0.53x at 4, 0.85x at 8, 1.05x at 12, 1.11x at 16 (benchmarks/RESULTS.md).
CPU_F32_KERNEL_MAX_TOKENS = 8


def _weight_layout(eq: str) -> str | None:
    """"in" when `eq` is x [T, *in] times w [*in, *out] -> [T, *out], "out" for w [*out, *in]; else None."""
    lhs, out = eq.replace(" ", "").split("->")
    xs, ws = lhs.split(",")
    t, ins = xs[:1], xs[1:]
    if not ins or not out.startswith(t):
        return None
    if ws.startswith(ins) and out == t + ws[len(ins):]:
        return "in"
    if ws.endswith(ins) and out == t + ws[:-len(ins)]:
        return "out"
    return None


def _cpu_f32_kernel(eq: str, x, w) -> str | None:
    """The weight layout when this matmul runs the native float32 kernel: a CPU backend, float32 x and w, a step
    of at most CPU_F32_KERNEL_MAX_TOKENS tokens, a contraction of x's trailing dims (`_weight_layout`)."""
    if jax.default_backend() != "cpu" or x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return None
    if x.shape[0] > CPU_F32_KERNEL_MAX_TOKENS:
        return None
    layout = _weight_layout(eq)
    if layout is None:
        return None
    from pallas_kernels import cpu_qmatmul

    return layout if cpu_qmatmul.available() else None


def dot(eq: str, x, w):
    """The one matmul of the model: `eq` contracts x's trailing dims with w's input dims. A quantized weight
    goes to `quant.qmatmul` (x [T, *in] -> [T, *out]); a float32 one on a CPU, for a few tokens, to the native
    f32matmul."""
    if quant.is_quantized(w):
        return quant.qmatmul(x, w)
    layout = _cpu_f32_kernel(eq, x, w)
    if layout is not None:
        from pallas_kernels import cpu_qmatmul

        T, n_in = x.shape[0], x.ndim - 1
        I = math.prod(x.shape[1:])
        out_shape = w.shape[n_in:] if layout == "in" else w.shape[:w.ndim - n_in]
        w2 = w.reshape(I, -1) if layout == "in" else w.reshape(-1, I)  # [I, O] or [O, I]: no copy
        y = cpu_qmatmul.f32matmul(x.reshape(T, I), w2, out_major=layout == "out")  # [T, O]
        return y.reshape(T, *out_shape)
    return jnp.einsum(eq, x, w.astype(x.dtype) if w.dtype != x.dtype else w)


def embed_tokens(params: Params, tokens, cfg: ModelConfig | None = None):
    """tokens [T] -> [T, D] in the model dtype (the final norm's); times sqrt(D) in that dtype where cfg says so
    (Gemma)."""
    dtype = params.final_norm.dtype
    if quant.is_quantized(params.embed):
        x = quant.embedding_rows(params.embed, tokens, dtype)
    else:
        x = params.embed[tokens].astype(dtype)
    if cfg is not None and cfg.embed_scale:
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
    return x


def rms_norm(x, w, eps: float):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * xf).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig, layer: int | None = None) -> np.ndarray:
    """[H / 2] inverse frequencies, with Llama-3.1 or linear scaling applied; of `layer`'s rope where layers differ
    (Gemma 3's local layers), else the model's."""
    H = cfg.head_dim
    theta, rs = cfg.layer_rope(layer) if layer is not None else (cfg.rope_theta, cfg.rope_scaling)
    inv = 1.0 / (theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
    if rs.kind == "linear":
        inv = inv / rs.factor
    elif rs.kind == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = np.where(mid, (1 - smooth) * inv / rs.factor + smooth * inv, scaled)
    return inv.astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """Rotary embedding, rotate-half (HF) convention. x [T, ..., H], positions [T]."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + angles.shape[1:]
    cos, sin = jnp.cos(angles).reshape(shape), jnp.sin(angles).reshape(shape)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


AttentionFn = Callable[..., tuple]  # (qkv [T, K, G + 2, H], k_pages, v_pages, meta) -> ([T, N, H], k_pages, v_pages)


def attention_block(lp: LayerParams, cfg: ModelConfig, x, positions, inv_freq, k_pages, v_pages, meta, attn_fn,
                     k_scale=None, v_scale=None, qkv_in=None, layer: int | None = None):
    """x + attention(norm(x)); qkv_in: what the projections read instead of norm(x) (an EAGLE-3 head's [T, 2D]).
    layer: its index, where layers differ in their window (Gemma 3: passed to attn_fn as `window`)."""
    eps = cfg.rms_norm_eps
    h = rms_norm(x, lp.attn_norm, eps) if lp.attn_norm is not None else x  # None: an EAGLE head's first layer
    h = h if qkv_in is None else qkv_in
    G = cfg.q_per_kv
    # [T, K, G + 2, H]: per kv head k its G query heads (query head n = k * G + g, HF's order), its key, its value.
    qkv = dot("td,dkgh->tkgh", h, lp.wqkv)
    if lp.bqkv is not None:
        qkv = qkv + lp.bqkv.astype(qkv.dtype)
    if lp.q_norm is not None:
        qkv = jnp.concatenate([rms_norm(qkv[:, :, :G], lp.q_norm, eps), rms_norm(qkv[:, :, G:G + 1], lp.k_norm, eps),
                               qkv[:, :, G + 1:]], axis=2)
    # Rope on the query and key heads in one pass over the projection (one fusion); the value passes through.
    qkv = jnp.where((jnp.arange(G + 2) <= G)[:, None], apply_rope(qkv, positions, inv_freq), qkv)
    if k_scale is not None:
        # An 8-bit cache with a scale per channel, which no kernel needs to know: the new key and value go in the
        # cache's units (the kernels store them as they are), the queries take the key scales (q . k = (q * s) .
        # (k / s)), and the output the value scales (it is a weighted sum of the stored values).
        qkv = jnp.concatenate([qkv[:, :, :G] * k_scale[:, None, :].astype(qkv.dtype),
                               to_cache_units(qkv[:, :, G:G + 1], k_scale, k_pages.dtype),
                               to_cache_units(qkv[:, :, G + 1:], v_scale, v_pages.dtype)], axis=2)
    per_layer = {} if cfg.sliding_layers is None or layer is None else {"window": cfg.layer_window(layer)}
    o, k_pages, v_pages = attn_fn(qkv, k_pages, v_pages, meta, **per_layer)  # [T, N, H]; this step's K/V written
    if v_scale is not None:
        o = (o.reshape(o.shape[0], -1, G, o.shape[-1]) * v_scale[:, None, :].astype(o.dtype)).reshape(o.shape)
    out = dot("tnh,nhd->td", o, lp.wo)
    if lp.post_attn_norm is not None:
        out = rms_norm(out, lp.post_attn_norm, eps)
    return x + out, k_pages, v_pages


def mlp_block(lp: LayerParams, cfg: ModelConfig, x):
    h = rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
    if lp.router is not None:
        out = moe_mlp(lp, cfg, h)
    else:
        gu = dot("td,dcf->tcf", h, lp.w_gate_up)  # [T, 2, F]
        out = dot("tf,fd->td", activation(cfg, gu[:, 0]) * gu[:, 1], lp.w_down)
    if lp.post_mlp_norm is not None:
        out = rms_norm(out, lp.post_mlp_norm, cfg.rms_norm_eps)
    return x + out


def activation(cfg: ModelConfig, x):
    """The gate's activation: SiLU (SwiGLU), or GELU with the tanh approximation (Gemma's GeGLU)."""
    return jax.nn.gelu(x, approximate=True) if cfg.hidden_act == "gelu_tanh" else jax.nn.silu(x)


def route(logits, k: int, normalize: bool):
    """Router logits [T, E] -> (weights [T, k] float32, experts [T, k] int32): softmax over all experts in float32,
    the k largest (ties to the lower expert id), renormalised to sum to 1 when `normalize` (Mixtral always; Qwen3-MoE
    per its norm_topk_prob)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


# bf16 expert stacks on one Hopper GPU take jax's Mosaic GPU ragged dot (pallas_kernels/grouped_matmul_hopper) in
# steps of at least this many rows (T * k), `jax.lax.ragged_dot` otherwise.
HOPPER_GROUPED_MIN_ROWS: int | None = None  # None: never (benchmarks/moe_gemm_gpu.py measures both forms)


def _hopper_grouped(x, w) -> bool:
    if HOPPER_GROUPED_MIN_ROWS is None or x.shape[0] < HOPPER_GROUPED_MIN_ROWS or x.dtype != jnp.bfloat16:
        return False
    if jax.device_count() > 1:  # a Pallas call is not partitioned by a mesh: sharded experts take ragged_dot
        return False
    from pallas_kernels import grouped_matmul_hopper as gm

    return gm.fits(w.shape[1], w.shape[2]) and gm.available()


def grouped_dot(x, w, group_sizes):
    """x [M, I] rows sorted by group, w [E, I, *out] (a dense expert leaf: its input dim right after the expert
    axis) or its `QuantizedWeight` ([E, *out, I]), group_sizes [E] summing to M -> [M, *out]: row block e times
    expert e's weight, as one `jax.lax.ragged_dot` (or the Hopper kernel: `_hopper_grouped`). A quantized expert
    stack is dequantized first (every expert read in full: correct, not yet fast)."""
    if quant.is_quantized(w):
        d = quant.dequantize(w, x.dtype)  # [E, *out, I]
        w = jnp.moveaxis(d, -1, 1)
    E, I, out = w.shape[0], w.shape[1], w.shape[2:]
    w = w.reshape(E, I, -1).astype(x.dtype)
    if _hopper_grouped(x, w):
        from pallas_kernels.grouped_matmul_hopper import grouped_matmul

        return grouped_matmul(x, w, group_sizes).reshape(x.shape[0], *out)
    y = jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
    return y.astype(x.dtype).reshape(x.shape[0], *out)


# Steps of at most this many (token, expert) pairs per expert, by backend, gather each pair's expert weights
# (`gathered_experts`) instead of sorting into the grouped matmul. XLA:CPU runs ragged_dot as a dense product over
# every expert (benchmarks/moe_gemm_gpu.py --scale 0.25 on 2 cores, 128 experts, top 8: 1 token 1.7 ms gathered
# against 53 grouped, 16 tokens 79 / 94, 32 tokens 120 / 144, 64 tokens 421 / 216). The gathered weights are a copy
# (T * k experts' worth): at most MOE_GATHER_MAX_BYTES of it per matmul.
MOE_GATHER_MAX_PAIRS_PER_EXPERT = {"cpu": 2}
MOE_GATHER_MAX_BYTES = 256 << 20


def _gathers_experts(T: int, k: int, E: int, expert_bytes: int) -> bool:
    limit = MOE_GATHER_MAX_PAIRS_PER_EXPERT.get(jax.default_backend())
    if limit is None or T * k > limit * E or T * k * expert_bytes > MOE_GATHER_MAX_BYTES:
        return False
    return jax.device_count() == 1  # a gather along a sharded expert axis would bring whole experts to every device


def expert_weights(w, experts, dtype):
    """The weights of experts [T, k] of an expert leaf, dense [T, k, I, *out] in `dtype`: w [E, I, *out], or its
    `QuantizedWeight` [E, *out, I], whose gathered rows are dequantized (only the k experts of each token)."""
    if not quant.is_quantized(w):
        return w[experts].astype(dtype)
    part = dataclasses.replace(w, **{f: getattr(w, f)[experts] for f in ("q", "scales", "zeros", "mins")
                                     if getattr(w, f) is not None})
    return jnp.moveaxis(quant.dequantize(part, dtype), -1, 2)  # [T, k, *out, I] -> [T, k, I, *out]


def gathered_experts(lp: LayerParams, cfg: ModelConfig, h, weights, experts):
    """The MoE MLP for few tokens: each token's k experts' weights gathered, then batched matmuls (reads T * k
    experts, where the grouped form's XLA:CPU lowering computes with all E)."""
    f32 = jnp.float32
    gu = jnp.einsum("td,tkdcf->tkcf", h, expert_weights(lp.experts_gate_up, experts, h.dtype),
                    preferred_element_type=f32).astype(h.dtype)
    a = activation(cfg, gu[:, :, 0]) * gu[:, :, 1]
    y = jnp.einsum("tkf,tkfd->tkd", a, expert_weights(lp.experts_down, experts, h.dtype),
                   preferred_element_type=f32).astype(h.dtype)
    return jnp.einsum("tkd,tk->td", y, weights.astype(y.dtype))


def moe_mlp(lp: LayerParams, cfg: ModelConfig, h):
    """The mixture-of-experts MLP of normed h [T, D] -> [T, D]: every token through its k experts' gated MLPs,
    weighted by its router. The T * k (token, expert) pairs are sorted by expert (a stable sort: a token's pairs
    keep their order), each expert's rows run as one group of `grouped_dot`, and the weighted rows are added back
    to their tokens (few tokens on a CPU: `gathered_experts`). A token's routing depends on its own hidden state
    only, never on its batch mates'; on a CPU the two forms round differently, so its outputs' last bits may depend
    on how many tokens its step holds."""
    T, D = h.shape
    k, E = cfg.num_experts_per_tok, cfg.num_experts
    weights, experts = route(dot("td,de->te", h, lp.router), k, cfg.norm_topk_prob)  # [T, k] each
    if _gathers_experts(T, k, E, 3 * D * cfg.moe_intermediate_size * h.dtype.itemsize):
        return gathered_experts(lp, cfg, h, weights, experts)
    flat = experts.reshape(-1)  # [T * k]
    order = jnp.argsort(flat, stable=True)
    token = order // k  # the token of each sorted pair
    sizes = jnp.zeros((E,), jnp.int32).at[flat].add(1)
    gu = grouped_dot(h[token], lp.experts_gate_up, sizes)  # [T * k, 2, Fe]
    y = grouped_dot(activation(cfg, gu[:, 0]) * gu[:, 1], lp.experts_down, sizes)  # [T * k, D]
    y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
    return jnp.zeros_like(h).at[token].add(y)


def layer_inv_freqs(cfg: ModelConfig) -> list:
    """Each layer's rope inverse frequencies (one array per distinct rope: Gemma 3's local and global layers)."""
    by_rope = {}
    for i in range(cfg.num_layers):
        if cfg.layer_rope(i) not in by_rope:
            by_rope[cfg.layer_rope(i)] = jnp.asarray(rope_inv_freq(cfg, i))
    return [by_rope[cfg.layer_rope(i)] for i in range(cfg.num_layers)]


def forward(params: Params, cfg: ModelConfig, tokens, positions, kv: KVCache, meta: AttentionMetadata, attn_fn: AttentionFn,
            aux_layers: tuple[int, ...] = ()):
    """tokens, positions [T] -> hidden states [T, D] (before the final norm), updated cache; with aux_layers, also
    the residual stream entering each of those layers, side by side [T, len(aux_layers) * D] (an EAGLE-3 head's
    input)."""
    inv_freqs = layer_inv_freqs(cfg)
    x = embed_tokens(params, tokens, cfg)  # [T, D]
    ks, vs = list(kv.k), list(kv.v)
    aux = {}
    for i, lp in enumerate(params.layers):
        if i in aux_layers:
            aux[i] = x
        scales = (kv.k_scale[i], kv.v_scale[i]) if kv.k_scale is not None else (None, None)
        with jax.named_scope(f"layer{i}"):
            with jax.named_scope("attention"):
                x, ks[i], vs[i] = attention_block(lp, cfg, x, positions, inv_freqs[i], ks[i], vs[i], meta, attn_fn,
                                                   *scales, layer=i)
            with jax.named_scope("mlp"):
                x = mlp_block(lp, cfg, x)
    if aux_layers:
        return x, dataclasses.replace(kv, k=ks, v=vs), jnp.concatenate([aux[i] for i in aux_layers], axis=-1)
    return x, dataclasses.replace(kv, k=ks, v=vs)


# Calibration of an 8-bit KV cache's scales: a few sentences of ordinary prose (any text of the model's language
# does; random token ids give keys of another magnitude).
KV_CALIBRATION_TEXT = (
    "The history of the city begins with a small harbour, where fishermen sold their catch at dawn. Over two "
    "centuries the market grew into a port that traded grain, wool and timber with distant coasts. Scholars "
    "still argue about why it declined: some point to silting rivers, others to war, taxes, or a change in the "
    "routes that merchants preferred. Today visitors walk the old walls, eat grilled sardines, and ask the "
    "same question. What would you like to know? Please answer in three short steps, with one example each."
)


@functools.partial(jax.jit, static_argnames=("cfg",))
def kv_absmax(params: Params, cfg: ModelConfig, tokens):
    """Largest |key| and |value| per layer, kv head and channel ([L, K, H] each) over one sequence `tokens` [T],
    from the model run with dense causal attention (no cache): what an 8-bit cache's scales are set from."""
    T = tokens.shape[0]
    seen = []

    def dense_attention(qkv, k_pages, v_pages, meta, window=cfg.sliding_window):
        G = qkv.shape[2] - 2
        q, k, v = qkv[:, :, :G].astype(jnp.float32), qkv[:, :, G].astype(jnp.float32), qkv[:, :, G + 1].astype(jnp.float32)
        seen.append((jnp.max(jnp.abs(k), axis=0), jnp.max(jnp.abs(v), axis=0)))  # [K, H] each
        s = jnp.einsum("tkgh,skh->tkgs", q, k) * cfg.attn_scale
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        mask = (j <= i) & ((i - j < window) if window else True)
        p = jax.nn.softmax(jnp.where(mask[:, None, None, :], s, -jnp.inf), axis=-1)
        o = jnp.einsum("tkgs,skh->tkgh", p, v)
        return o.reshape(T, -1, cfg.head_dim).astype(qkv.dtype), k_pages, v_pages

    x, positions = embed_tokens(params, tokens, cfg), jnp.arange(T, dtype=jnp.int32)
    inv_freqs = layer_inv_freqs(cfg)
    for i, lp in enumerate(params.layers):
        x, _, _ = attention_block(lp, cfg, x, positions, inv_freqs[i], None, None, None, dense_attention, layer=i)
        x = mlp_block(lp, cfg, x)
    return jnp.stack([k for k, _ in seen]), jnp.stack([v for _, v in seen])


def kv_cache_scales(params: Params, cfg: ModelConfig, dtype, token_ids) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer, per-channel scales ([L, K, H] for keys and values) of an 8-bit cache of `dtype`.

    fp8: 1, vLLM's default (e4m3's relative precision holds at any scale, and keys and values stay far inside its
    +-448; calibrated scales measured no better on the default model, though a single perplexity ratio moves by ~2%
    with the f32 summation order: tests/test_quant.py measures the KL divergence instead).
    int8: the largest |key| and |value| of each channel over `token_ids` (a calibration text) with 1.5x headroom;
    what is larger clips. A channel never seen above 1e-3 of its head's largest gets that floor."""
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    if np.dtype(dtype) != np.int8:
        return np.ones((L, K, H), np.float32), np.ones((L, K, H), np.float32)
    k_max, v_max = (np.asarray(a, np.float32) for a in kv_absmax(params, cfg, jnp.asarray(token_ids, jnp.int32)))
    k_max, v_max = (np.maximum(a, 1e-3 * a.max(axis=-1, keepdims=True)) for a in (k_max, v_max))
    scale = lambda a: np.where(a > 0, a * 1.5 / 127.0, 1.0).astype(np.float32)  # noqa: E731
    return scale(k_max), scale(v_max)


def compute_logits(params: Params, cfg: ModelConfig, h):
    """h [B, D] -> logits [B, V] in float32."""
    h = rms_norm(h, params.final_norm, cfg.rms_norm_eps)
    if params.lm_head is None:
        return dot("bd,vd->bv", h, params.embed).astype(jnp.float32)
    return dot("bd,dv->bv", h, params.lm_head).astype(jnp.float32)
