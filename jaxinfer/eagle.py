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
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxinfer import quant
from jaxinfer.config import ModelConfig
from jaxinfer.model import (AttentionMetadata, KVCache, LayerParams, ParamSpec, Params, attention_block, mlp_block,
                            dot, param_specs, pytree_dataclass, rope_inv_freq)
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


def load_eagle(path: str, target: ModelConfig, dtype, mesh=None, show_progress: bool = False
               ) -> tuple[ModelConfig, EagleParams]:
    """An EAGLE head's config and weights from its checkpoint directory, checked against the target's config."""
    d = Path(path)
    where = f"speculative_config.model {path!r}"
    if not (d / "config.json").is_file():
        raise ValueError(f"{where}: no config.json (an EAGLE checkpoint directory has config.json and safetensors)")
    if not list(d.glob("*.safetensors")):
        bins = [p.name for p in d.glob("*.bin")]
        raise ValueError(f"{where}: no *.safetensors file{f' (found {bins})' if bins else ''}; convert a PyTorch "
                         "checkpoint once: safetensors.torch.save_file(torch.load(BIN), 'model.safetensors')")
    try:
        cfg = ModelConfig.from_hf(json.loads((d / "config.json").read_text()), name=d.name)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if cfg.num_layers != 1:
        raise ValueError(f"{where}: {cfg.num_layers} layers; an EAGLE-1 head has one")
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(f"{where}: a vocabulary of {cfg.vocab_size} tokens, the target's has {target.vocab_size}")
    if cfg.hidden_size != target.hidden_size:
        raise ValueError(f"{where}: hidden_size {cfg.hidden_size}, the target's is {target.hidden_size}; an EAGLE "
                         "head reads the target's features")
    src = SafetensorsSource(d)
    keys = set(src.keys())
    if "fc.weight" not in keys:
        raise ValueError(f"{where}: no tensor 'fc.weight'; not an EAGLE head (an EAGLE-1 layout is expected)")
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
