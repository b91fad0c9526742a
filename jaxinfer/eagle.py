"""EAGLE's draft head (speculative decoding's "eagle" method): its weights, how they load, its forward pass.

An EAGLE head (Li et al., EAGLE-1) predicts the target's next *feature* (its last hidden state, after the final norm)
rather than the next token: for a sequence position i with the target's feature f_i and the token after it t_{i+1},

    x_i = fc([embed(t_{i+1}), f_i])           [T, 2D] -> [T, D]
    f'_{i+1} = decoder_layer(x_i)             one Llama layer, with no norm on its input (fc's output is its input)
    logits_{i+2} = lm_head(f'_{i+1})          the target's lm_head, no final norm

and it runs on from its own predictions: x_{i+1} = fc([embed(t_{i+2}), f'_{i+1}]) and so on, so k drafts cost k
passes through one layer. Its attention reads a paged KV cache of its own (one layer), at the positions of the features.

Checkpoint layout (the public EAGLE checkpoints, e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B; safetensors: a
`pytorch_model.bin` is converted once with `safetensors.torch.save_file(torch.load(...), "model.safetensors")`):
    config.json                                   a Llama config of one layer; hidden_size is the target's
    fc.weight [D, 2D], fc.bias [D] (optional)     the input is [embedding, feature], in that order
    embed_tokens.weight [V, D] (optional)         else the target's embedding
    layers.0.self_attn.{q,k,v,o}_proj.weight, layers.0.mlp.{gate,up,down}_proj.weight,
    layers.0.post_attention_layernorm.weight      (no layers.0.input_layernorm)

An EAGLE-3 head (method eagle3; Li et al., EAGLE-3) reads three of the target's hidden states instead of its last
feature: the residual stream entering three of its layers (low, middle, high; by default 2, L // 2 and L - 3), fused
by fc, and it predicts tokens of a vocabulary of its own (often smaller), mapped to the target's:

    g_i = fc([a_low, a_mid, a_high]_i)          [T, 3D] -> [T, D]   (the target's rows)
    y_i = g_i + attention([norm_e(embed(t_{i+1})), norm_h(g_i)])   q / k / v read [T, 2D]
    o_i = y_i + mlp(norm_post(y_i))             the head's output, fed back as g for its next draft
    logits_{i+2} = lm_head(norm(o_i))           [T, V_draft]; draft id j is the target's id j + d2t[j]

(`norm_before_residual`: the residual is norm_h(g_i) instead of g_i.)
Checkpoint layout (e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B): config.json (a one-layer Llama config, with
`draft_vocab_size` and, optionally, `eagle_config.eagle_aux_hidden_state_layer_ids`), fc.weight [D, 3D],
midlayer.{input_layernorm, hidden_norm, post_attention_layernorm}.weight, midlayer.self_attn.{q,k,v}_proj.weight
[*, 2D], midlayer.self_attn.o_proj.weight, midlayer.mlp.{gate,up,down}_proj.weight (or the same under layers.0.),
norm.weight, lm_head.weight [V_draft, D], d2t [V_draft] (absent: the target's vocabulary), embed_tokens.weight
(optional; else the target's). t2d is not read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import quant
from jaxinfer.config import ModelConfig
from jaxinfer.model import (AttentionMetadata, KVCache, LayerParams, ParamSpec, Params, attention_block, mlp_block,
                            dot, logical_sharding, param_specs, pytree_dataclass, rms_norm, rope_inv_freq)
from jaxinfer.weights import SafetensorsSource, WeightEntry, load_params, weight_table


@pytree_dataclass
class EagleParams:
    fc: Any  # [2, D, D]: (embedding | feature) x D in -> D out
    fc_bias: Any  # [D] or None
    layer: LayerParams  # attn_norm None: the first layer has no input norm
    embed: Any  # [V, D], or None: the target's


def eagle_param_specs(cfg: ModelConfig, fc_bias: bool, own_embed: bool) -> EagleParams:
    D = cfg.hidden_size
    layer = dataclasses.replace(param_specs(dataclasses.replace(cfg, num_layers=1)).layers[0], attn_norm=None)
    return EagleParams(
        fc=ParamSpec((2, D, D), (None, "embed", "embed"), contract=(0, 1)),
        fc_bias=ParamSpec((D,), ("embed",), "zeros") if fc_bias else None,
        layer=layer,
        embed=ParamSpec((cfg.vocab_size, D), ("vocab", "embed"), contract=(1,)) if own_embed else None,
    )


def eagle_weight_table(cfg: ModelConfig, fc_bias: bool, own_embed: bool) -> list[WeightEntry]:
    """The Llama table's layer-0 entries under EAGLE's key names ("layers.0." without "model."), and fc / embed."""
    one = dataclasses.replace(cfg, num_layers=1, tie_word_embeddings=True)
    same = lambda w: w  # noqa: E731
    table = [dataclasses.replace(e, keys=tuple(k.removeprefix("model.") for k in e.keys),
                                 path=e.path.replace("layers.0.", "layer."))
             for e in weight_table(one, "hf") if e.path.startswith("layers.0.") and e.path != "layers.0.attn_norm"]
    table.append(WeightEntry(("fc.weight",), "fc", same))
    if fc_bias:
        table.append(WeightEntry(("fc.bias",), "fc_bias", same))
    if own_embed:
        table.append(WeightEntry(("embed_tokens.weight",), "embed", same))
    return table


def _open_head(path: str, target: ModelConfig, kind: str) -> tuple[dict, ModelConfig, SafetensorsSource, set]:
    """An EAGLE head's checkpoint directory: its config.json (as read, and as a ModelConfig), its tensors and their
    names, checked against the target's config; kind: "EAGLE-1" or "EAGLE-3", for the messages."""
    d = Path(path)
    where = f"speculative_config.model {path!r}"
    if not (d / "config.json").is_file():
        raise ValueError(f"{where}: no config.json (an EAGLE checkpoint directory has config.json and safetensors)")
    if not list(d.glob("*.safetensors")):
        bins = [p.name for p in d.glob("*.bin")]
        raise ValueError(f"{where}: no *.safetensors file{f' (found {bins})' if bins else ''}; convert a PyTorch "
                         "checkpoint once: safetensors.torch.save_file(torch.load(BIN), 'model.safetensors')")
    raw = json.loads((d / "config.json").read_text())
    try:  # an EAGLE-3 config names its own architecture (LlamaForCausalLMEagle3): its layer is a Llama layer
        cfg = ModelConfig.from_hf({**raw, "architectures": ["LlamaForCausalLM"]} if kind == "EAGLE-3" else raw,
                                  name=d.name)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if cfg.num_layers != 1:
        raise ValueError(f"{where}: {cfg.num_layers} layers; an {kind} head has one")
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(f"{where}: a vocabulary of {cfg.vocab_size} tokens, the target's has {target.vocab_size}")
    if cfg.hidden_size != target.hidden_size:
        raise ValueError(f"{where}: hidden_size {cfg.hidden_size}, the target's is {target.hidden_size}; an EAGLE "
                         "head reads the target's features")
    src = SafetensorsSource(d)
    keys = set(src.keys())
    if "fc.weight" not in keys:
        raise ValueError(f"{where}: no tensor 'fc.weight'; not an EAGLE head (an {kind} layout is expected)")
    eagle3 = "d2t" in keys or any(k.startswith("midlayer.") for k in keys) or "lm_head.weight" in keys
    if eagle3 != (kind == "EAGLE-3"):
        method, other = ("eagle3", "EAGLE-3") if eagle3 else ("eagle", "EAGLE-1")
        raise ValueError(f"{where}: an {other} head's layout; give it speculative_config method {method!r}")
    return raw, cfg, src, keys


def load_eagle(path: str, target: ModelConfig, dtype, mesh=None, show_progress: bool = False
               ) -> tuple[ModelConfig, EagleParams]:
    """An EAGLE head's config and weights from its checkpoint directory, checked against the target's config."""
    _, cfg, src, keys = _open_head(path, target, "EAGLE-1")
    fc_bias, own_embed = "fc.bias" in keys, "embed_tokens.weight" in keys
    specs = eagle_param_specs(cfg, fc_bias, own_embed)
    table = eagle_weight_table(cfg, fc_bias, own_embed)
    params = load_params(cfg, src, "hf", dtype, mesh, show_progress, specs=specs, table=table)
    return cfg, params


def eagle_forward(ep: EagleParams, target: Params, cfg: ModelConfig, tokens, features, positions, kv: KVCache,
                  meta: AttentionMetadata, attn_fn):
    """tokens [T] (each feature's next token), features [T, D] (the target's after its final norm, or the head's own
    predictions), positions [T] (the features') -> predicted next features [T, D], updated cache (one layer)."""
    embed = ep.embed if ep.embed is not None else target.embed
    if quant.is_quantized(embed):
        e = quant.embedding_rows(embed, tokens, features.dtype)
    else:
        e = embed[tokens].astype(features.dtype)  # [T, D]
    x = dot("tcd,cde->te", jnp.stack([e, features], axis=1), ep.fc)  # [T, D]
    if ep.fc_bias is not None:
        x = x + ep.fc_bias.astype(x.dtype)
    scales = (kv.k_scale[0], kv.v_scale[0]) if kv.k_scale is not None else ()
    x, k, v = attention_block(ep.layer, cfg, x, positions, jnp.asarray(rope_inv_freq(cfg)), kv.k[0], kv.v[0], meta,
                               attn_fn, *scales)
    x = mlp_block(ep.layer, cfg, x)
    return x, dataclasses.replace(kv, k=[k], v=[v])


def eagle_logits(target: Params, f):
    """A predicted feature [B, D] -> logits [B, V] in float32: the target's lm_head, without its final norm (the
    head predicts features after it)."""
    if target.lm_head is None:
        return dot("bd,vd->bv", f, target.embed).astype(jnp.float32)
    return dot("bd,dv->bv", f, target.lm_head).astype(jnp.float32)


# -- EAGLE-3 ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Eagle3Spec:
    """What an EAGLE-3 head needs of the programs beside its weights: the target's layers whose input (the residual
    stream entering them) it reads, in fc's order, and where its residual branches off (see the module docstring)."""

    aux_layers: tuple[int, ...]
    norm_before_residual: bool = False


@pytree_dataclass
class Eagle3Params:
    fc: Any  # [3, D, D]: (low | middle | high) x D in -> D out
    layer: LayerParams  # attn_norm: the embedding's norm (input_layernorm); wqkv [2D, K, G + 2, H]
    hidden_norm: Any  # [D]: the fed feature's norm
    norm: Any  # [D]: before lm_head
    lm_head: Any  # [D, V_draft]
    token_ids: Any  # [V_draft] int32: the target's id of each draft-vocabulary token, or None (the same vocabulary)
    embed: Any  # [V, D], or None: the target's


def eagle3_param_specs(cfg: ModelConfig, draft_vocab: int, own_embed: bool) -> Eagle3Params:
    D = cfg.hidden_size
    layer = param_specs(dataclasses.replace(cfg, num_layers=1)).layers[0]
    wqkv = layer.wqkv
    layer = dataclasses.replace(layer, wqkv=dataclasses.replace(wqkv, shape=(2 * D, *wqkv.shape[1:])))
    return Eagle3Params(
        fc=ParamSpec((3, D, D), (None, "embed", "embed"), contract=(0, 1)),
        layer=layer,
        hidden_norm=ParamSpec((D,), ("embed",), "ones"),
        norm=ParamSpec((D,), ("embed",), "ones"),
        lm_head=ParamSpec((D, draft_vocab), ("embed", "vocab"), contract=(0,)),
        token_ids=None,
        embed=ParamSpec((cfg.vocab_size, D), ("vocab", "embed"), contract=(1,)) if own_embed else None,
    )


def eagle3_weight_table(cfg: ModelConfig, prefix: str, own_embed: bool) -> list[WeightEntry]:
    """The Llama table's layer-0 entries under the head's key names (prefix "midlayer." or "layers.0."), and the
    head's own tensors."""
    one = dataclasses.replace(cfg, num_layers=1, tie_word_embeddings=True)
    same = lambda w: w  # noqa: E731
    table = [dataclasses.replace(e, keys=tuple(prefix + k.removeprefix("model.layers.0.") for k in e.keys),
                                 path=e.path.replace("layers.0.", "layer."))
             for e in weight_table(one, "hf") if e.path.startswith("layers.0.")]
    table += [WeightEntry(("fc.weight",), "fc", same), WeightEntry((prefix + "hidden_norm.weight",), "hidden_norm", same),
              WeightEntry(("norm.weight",), "norm", same), WeightEntry(("lm_head.weight",), "lm_head", same)]
    if own_embed:
        table.append(WeightEntry(("embed_tokens.weight",), "embed", same))
    return table


def eagle3_aux_layers(raw: dict, target: ModelConfig, where: str) -> tuple[int, ...]:
    """The target layers an EAGLE-3 head reads: its config's eagle_aux_hidden_state_layer_ids (top level or under
    eagle_config), else 2, L // 2 and L - 3 of the target's L layers (the layers EAGLE-3's training read)."""
    ids = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids",
                                                 raw.get("eagle_aux_hidden_state_layer_ids"))
    L = target.num_layers
    if ids is None:
        ids = (2, L // 2, L - 3)
    ids = tuple(ids) if isinstance(ids, (list, tuple)) else ids
    if not (isinstance(ids, tuple) and len(ids) == 3 and all(isinstance(i, int) and 0 <= i < L for i in ids)):
        raise ValueError(f"{where}: the head reads the target's layers {ids!r}; an EAGLE-3 head reads three of its "
                         f"{L} layers (eagle_aux_hidden_state_layer_ids, each in [0, {L}))")
    return ids


def load_eagle3(path: str, target: ModelConfig, dtype, mesh=None, show_progress: bool = False
                ) -> tuple[ModelConfig, Eagle3Params, Eagle3Spec]:
    """An EAGLE-3 head's config, weights and what its programs need, from its checkpoint directory."""
    where = f"speculative_config.model {path!r}"
    raw, cfg, src, keys = _open_head(path, target, "EAGLE-3")
    prefix = "midlayer." if any(k.startswith("midlayer.") for k in keys) else "layers.0."
    draft_vocab = int(raw.get("draft_vocab_size") or cfg.vocab_size)
    if "target_hidden_size" in raw and int(raw["target_hidden_size"]) != target.hidden_size:
        raise ValueError(f"{where}: target_hidden_size {raw['target_hidden_size']}, the target's hidden_size is "
                         f"{target.hidden_size}")
    own_embed = "embed_tokens.weight" in keys
    specs = eagle3_param_specs(cfg, draft_vocab, own_embed)
    params = load_params(cfg, src, "hf", dtype, mesh, show_progress, specs=specs,
                         table=eagle3_weight_table(cfg, prefix, own_embed))
    if "d2t" in keys:
        d2t = np.asarray(src.get("d2t")).astype(np.int64).reshape(-1)
        ids = np.arange(d2t.shape[0]) + d2t
        if d2t.shape[0] != draft_vocab or ids.min() < 0 or ids.max() >= target.vocab_size or len(set(ids)) != len(ids):
            raise ValueError(f"{where}: d2t maps {d2t.shape[0]} draft tokens (draft_vocab_size {draft_vocab}) to ids "
                             f"that are not distinct ids of the target's {target.vocab_size}")
        token_ids = jnp.asarray(ids.astype(np.int32))
        if mesh is not None:
            token_ids = jax.device_put(token_ids, logical_sharding((None,), mesh))
        params = dataclasses.replace(params, token_ids=token_ids)
    elif draft_vocab != target.vocab_size:
        raise ValueError(f"{where}: a draft vocabulary of {draft_vocab} tokens and no d2t tensor mapping it to the "
                         f"target's {target.vocab_size}")
    spec = Eagle3Spec(eagle3_aux_layers(raw, target, where), bool(raw.get("norm_before_residual", False)))
    return cfg, params, spec


def eagle3_forward(ep: Eagle3Params, target: Params, cfg: ModelConfig, spec: Eagle3Spec, tokens, hidden, positions,
                   kv: KVCache, meta: AttentionMetadata, attn_fn):
    """tokens [T] (each position's next token), hidden [T, D] (fc of the target's three hidden states there, or the
    head's own output) -> the head's output [T, D] (fed back for the next draft), updated cache (one layer)."""
    embed = ep.embed if ep.embed is not None else target.embed
    if quant.is_quantized(embed):
        e = quant.embedding_rows(embed, tokens, hidden.dtype)
    else:
        e = embed[tokens].astype(hidden.dtype)  # [T, D]
    eps = cfg.rms_norm_eps
    g = rms_norm(hidden, ep.hidden_norm, eps)
    qkv_in = jnp.concatenate([rms_norm(e, ep.layer.attn_norm, eps), g], axis=-1)  # [T, 2D]
    scales = (kv.k_scale[0], kv.v_scale[0]) if kv.k_scale is not None else ()
    x, k, v = attention_block(ep.layer, cfg, g if spec.norm_before_residual else hidden, positions,
                               jnp.asarray(rope_inv_freq(cfg)), kv.k[0], kv.v[0], meta, attn_fn, *scales,
                               qkv_in=qkv_in)
    x = mlp_block(ep.layer, cfg, x)
    return x, dataclasses.replace(kv, k=[k], v=[v])


def eagle3_fuse(ep: Eagle3Params, aux):
    """The target's three hidden states [T, 3D] (low | middle | high) -> the head's input feature [T, D]."""
    T, D = aux.shape[0], aux.shape[1] // 3
    return dot("tcd,cde->te", aux.reshape(T, 3, D), ep.fc)


def eagle3_logits(ep: Eagle3Params, cfg: ModelConfig, vocab_size: int, x):
    """The head's output [B, D] -> logits [B, V] over the target's vocabulary, float32: -inf at the ids outside the
    draft vocabulary."""
    logits = dot("bd,dv->bv", rms_norm(x, ep.norm, cfg.rms_norm_eps), ep.lm_head).astype(jnp.float32)
    if ep.token_ids is None:
        return logits
    full = jnp.full((x.shape[0], vocab_size), -jnp.inf, jnp.float32)
    return full.at[:, ep.token_ids].set(logits)
