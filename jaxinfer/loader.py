"""From what the user names (a checkpoint directory, a .gguf file, a preset, or nothing) to config + weights + tokenizer."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxinfer import quant

from jaxinfer.config import CONFIGS_DIR, ON_THE_FLY_QUANTIZATION, EngineConfig, ModelConfig
from jaxinfer.model import Params, tensor_parallel_config, tp_size
from jaxinfer.quant_formats import QuantFormat, QuantizedSafetensorsSource
from jaxinfer.tokenizer import Tokenizer, default_model_path
from jaxinfer.weights import GGUFSource, SafetensorsSource, dummy_params, load_params


@dataclass
class LoadedModel:
    cfg: ModelConfig
    params: Params
    tokenizer: Tokenizer | None
    source: str
    programs_dir: str | None = None  # a converted model's shipped compiled programs (convert.py)
    program_records: list = field(default_factory=list)  # what they were compiled for (the manifest's "programs")

    @property
    def quantization(self) -> str:
        return describe_quantization(self.params)


def describe_quantization(params: Params) -> str:
    """The schemes of the quantized weights, most used first: "gguf:Q4_1 x210, gguf:Q8_0 x1"; "none" if dense."""
    counts = Counter(w.scheme for w in jax.tree_util.tree_leaves(params, is_leaf=quant.is_quantized)
                     if quant.is_quantized(w))
    return ", ".join(f"{k} x{n}" for k, n in counts.most_common()) or "none"


def weight_bytes(params: Params) -> int:
    """Bytes of all weights (every device's share together)."""
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(params))


def resolve_dtype(name: str, backend: str):
    if name == "auto":
        return jnp.float32 if backend == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def load_model(model: str | None, ecfg: EngineConfig, dtype, mesh: Mesh | None = None,
               portable: bool = False) -> LoadedModel:
    """`model`: None (the embedded default), a converted model's directory (convert.py; also gs://), an HF
    directory, a .gguf file, or a preset name in configs/models. portable: quantized weights in the form every backend
    reads (what `jaxinfer convert` saves), not the CPU kernel's."""
    from jaxinfer import convert

    if convert.is_converted(model):
        return convert.restore(model, ecfg, dtype, mesh)
    path = Path(model) if model else Path(default_model_path())
    fmt = ecfg.load_format
    show = ecfg.show_progress
    qz = ecfg.quantization
    if path.suffix == ".gguf" or (path.is_file() and fmt == "gguf"):
        if fmt not in ("auto", "gguf", "dummy"):
            raise ValueError(f"load_format {fmt!r} does not apply to GGUF file {path}")
        _check_quantization(qz, "gguf", path)
        src = GGUFSource(path)
        cfg = ModelConfig.from_gguf(src.metadata(), name=path.stem)
        cfg = dataclasses.replace(cfg, tie_word_embeddings="output.weight" not in src.keys())
        cfg = tensor_parallel_config(cfg, tp_size(mesh), ecfg.enable_expert_parallel)
        params = (dummy_params(cfg, dtype, ecfg.seed, mesh, show, qz) if fmt == "dummy"
                  else load_params(cfg, src, "gguf", dtype, mesh, show, qz, portable=portable))
        return LoadedModel(cfg, params, Tokenizer.from_pretrained(str(path)), str(path))
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} has no config.json: not an HF checkpoint directory")
        try:
            hf_cfg = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
        cfg = tensor_parallel_config(ModelConfig.from_hf(hf_cfg, name=path.name), tp_size(mesh),
                                     ecfg.enable_expert_parallel)
        qc = hf_cfg.get("quantization_config")
        qfmt = QuantFormat(qc) if qc is not None else None
        _check_quantization(qz, qfmt.method if qfmt else None, path)
        if fmt == "dummy":
            params = dummy_params(cfg, dtype, ecfg.seed, mesh, show, qz)
        else:
            if fmt not in ("auto", "safetensors"):
                raise ValueError(f"load_format {fmt!r} does not apply to checkpoint directory {path}")
            src = SafetensorsSource(path)
            if qfmt is not None:
                src = QuantizedSafetensorsSource(src, qfmt)
            params = load_params(cfg, src, "hf", dtype, mesh, show, qz if qz == "none" or not qfmt else None,
                                 portable=portable)
        tok = Tokenizer.from_pretrained(str(path)) if _has_tokenizer(path) else None
        return LoadedModel(cfg, params, tok, str(path))
    if model and (CONFIGS_DIR / "models" / f"{model}.json").is_file():
        if fmt != "dummy":
            raise ValueError(f"preset {model!r} has no weights; use load_format='dummy' (random weights of its shape)")
        cfg = tensor_parallel_config(ModelConfig.from_preset(model), tp_size(mesh), ecfg.enable_expert_parallel)
        _check_quantization(qz, None, model)
        return LoadedModel(cfg, dummy_params(cfg, dtype, ecfg.seed, mesh, show, qz), None, f"preset:{model}")
    known = sorted(p.stem for p in (CONFIGS_DIR / "models").glob("*.json"))
    raise FileNotFoundError(f"model {model!r} is not a checkpoint directory, a .gguf file, or a preset ({known})")


def _check_quantization(requested: str | None, detected: str | None, where) -> None:
    """A checkpoint format named in `quantization` must be the checkpoint's own, and a quantized checkpoint is not
    quantized again (as vLLM checks). "none" dequantizes any checkpoint; "fp8" names FP8 checkpoints too."""
    if requested in (None, "none", detected) or (requested in ON_THE_FLY_QUANTIZATION and detected in (None, "gguf")):
        return
    what = f"a {detected} checkpoint" if detected else "not a quantized checkpoint"
    raise ValueError(f"quantization {requested!r} does not match {where}: it is {what}; use None to take the "
                     f"checkpoint as it is" + ("" if detected else f", or one of {list(ON_THE_FLY_QUANTIZATION)} to "
                                              "quantize at load"))


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
