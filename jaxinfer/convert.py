"""A model converted once: `jaxinfer convert MODEL OUT`, then `LLM(OUT)` / `jaxinfer serve --model OUT` on any machine.

Converting reads the checkpoint (HF safetensors, GGUF, a quantized format), quantizes it if asked, and saves:

  OUT/jaxinfer.json   the manifest: format, the model config, dtype, each quantized weight's scheme, the tokenizer's
                      end-of-sequence ids, and the compiled programs' index (below)
  OUT/weights/        the weight pytree, an orbax-checkpoint (tensorstore, OCDBT): each process writes its devices'
                      shards, and a restore reads only the slices its mesh places on each device, for a mesh of any
                      size (also from gs:// through tensorstore)
  OUT/tokenizer/      the tokenizer (a fast HF tokenizer with its chat template), rebuilt from a GGUF file if need be
  OUT/programs/       the engine's compiled programs for one engine preset (executables.py's store), when converted
                      on the machine kind that serves: a start whose fingerprint matches loads them (no trace, no
                      compile); one that does not logs why and compiles

The weights are saved in their portable form: kv heads not replicated (tensor parallelism over more devices than
the model has kv heads copies them at restore), quantized weights as the GPU and TPU read them (the CPU kernel's form
is made at restore on a CPU). The compiled programs run as code in the process that loads them: they are loaded only
from a local directory owned by this user and writable by nobody else, and each file is signed with the key in
OUT/programs (cache_trust), the rules of the compilation cache itself; ship only directories you made.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import quant
from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.model import Params, logical_sharding, param_specs, regroup_kv_heads, tensor_parallel_config, tp_size

MANIFEST = "jaxinfer.json"
FORMAT = 1
_Q_META = ("bits", "group_size", "in_shape", "act", "act_group", "scheme")


def is_converted(model) -> bool:
    """Whether `model` names a converted model directory (local, or a gs:// path)."""
    if model is None:
        return False
    s = os.fspath(model)
    if "://" in s:
        return _epath(s).joinpath(MANIFEST).exists()
    return os.path.isfile(os.path.join(s, MANIFEST))


def _epath(s: str):
    """orbax-checkpoint's own path type: a local path, or gs:// (read through gcsfs, the `gcs` extra)."""
    from etils import epath

    if s.startswith("gs://"):
        import importlib.util

        if importlib.util.find_spec("gcsfs") is None:  # epath's backend for gs://
            raise ValueError(f"model {s!r}: reading gs:// paths needs gcsfs; pip install 'jaxinfer[gcs]'")
    elif "://" in s:
        raise ValueError(f"model {s!r}: of remote paths only gs:// is supported; copy the model to a local path")
    return epath.Path(s)


def read_manifest(model) -> dict:
    path = _epath(os.fspath(model)).joinpath(MANIFEST)
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{path}: a converted-model manifest of format {m.get('format') if isinstance(m, dict) else '?'}"
                         f", this jaxinfer reads format {FORMAT}; convert the model again")
    return m


def config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # JSON lists back to the config's tuples
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["expert_parallel"] = False  # a layout of the mesh restored onto, not of the saved weights
    return ModelConfig(**d)


def _leaf_paths(tree) -> list[tuple[str, object]]:
    from jaxinfer.weights import _path_str

    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=quant.is_quantized)
    return [(_path_str(p), x) for p, x in flat]


# ---------------------------------------------------------------------------------------------------------
# kv-head replicas: the saved form has none


def with_kv_replicas(params: Params, cfg_from: ModelConfig, cfg_to: ModelConfig, mesh) -> Params:
    """The weights of cfg_from's kv-head layout (each checkpoint kv head held cfg_from.kv_replicas times) in
    cfg_to's, placed by cfg_to's logical axes on `mesh`. Only the q/k/v weights and biases change."""
    if cfg_from.kv_replicas == cfg_to.kv_replicas:
        return params
    r0, r1 = cfg_from.kv_replicas, cfg_to.kv_replicas
    specs = param_specs(cfg_to)

    def move(x, axis, spec_axes):
        shape = jax.eval_shape(functools.partial(regroup_kv_heads, axis=axis, r_from=r0, r_to=r1), x).shape
        return _regroup(axis, r0, r1, _sharding(spec_axes, shape, mesh))(x)  # the shape above: nothing computed

    layers = []
    for lp, sp in zip(params.layers, specs.layers):
        wqkv = lp.wqkv
        if quant.is_quantized(wqkv):
            axes = sp.wqkv.quantized_axes()
            wqkv = dataclasses.replace(wqkv, **{k: move(getattr(wqkv, k), 0, axes) for k in ("q", "scales", "zeros", "mins")
                                                if getattr(wqkv, k) is not None})
        else:
            wqkv = move(wqkv, 1, sp.wqkv.axes)
        bqkv = None if lp.bqkv is None else move(lp.bqkv, 0, sp.bqkv.axes)
        layers.append(dataclasses.replace(lp, wqkv=wqkv, bqkv=bqkv))
    return dataclasses.replace(params, layers=layers)


@functools.cache
def _regroup(axis: int, r0: int, r1: int, sharding):
    """`regroup_kv_heads` compiled once per layout and placement (every layer's q/k/v weights share them)."""
    return jax.jit(functools.partial(regroup_kv_heads, axis=axis, r_from=r0, r_to=r1), out_shardings=sharding)


def _sharding(axes, shape, mesh):
    """The leaf's sharding on `mesh` (a dim left whole where its mesh axis does not divide it); one device without."""
    from jaxinfer.weights import _divisible

    if mesh is None:  # the loader's placement without a mesh: the default device
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return _divisible(axes, shape, mesh)


# ---------------------------------------------------------------------------------------------------------
# converting


def convert(model: str | None, out: str, *, programs: bool = True, device_kind: str | None = None,
            show_progress: bool = True, **options) -> dict:
    """Load `model` with the engine options given (quantization, dtype, tensor_parallel_size, load_format), save it
    to `out` (see the module docstring) and, with `programs`, build an engine from `out` with those options to save
    its compiled programs there. device_kind: the devices the programs are for; it must be this machine's (compile
    them on the kind that serves). Returns the manifest."""
    import orbax.checkpoint as ocp

    from jaxinfer.config import EngineConfig
    from jaxinfer.engine import tensor_parallel_mesh
    from jaxinfer.loader import load_model, resolve_dtype

    show_progress = options.pop("show_progress", show_progress)
    here = jax.devices()[0].device_kind
    if programs and device_kind is not None and device_kind != here:
        raise ValueError(f"device_kind {device_kind!r}: compiled programs are made on the kind of device that runs "
                         f"them, and this machine has {here!r}; run the conversion there, or leave the programs out")
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise ValueError(f"{out}: the output directory exists and is not empty; name a new one")
    ecfg = EngineConfig.from_options(**options, show_progress=show_progress)
    if ecfg.data_parallel_size > 1:
        raise ValueError("data_parallel_size: replicas share one converted model; convert with "
                         "tensor_parallel_size only")
    if ecfg.speculative_config is not None:
        raise ValueError("speculative_config: convert the target and the draft model each on their own")
    dtype = resolve_dtype(ecfg.dtype, jax.default_backend())
    mesh = tensor_parallel_mesh(ecfg.tensor_parallel_size, None)
    t0 = time.monotonic()
    loaded = load_model(model, ecfg, dtype, mesh, portable=True)
    load_s = time.monotonic() - t0
    cfg = loaded.cfg
    base = dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads // cfg.kv_replicas, kv_replicas=1)
    params = with_kv_replicas(loaded.params, cfg, base, mesh)
    if loaded.tokenizer is None:
        print(f"warning: {loaded.source} has no tokenizer; the converted model takes token ids only", file=sys.stderr,
              flush=True)
    out_path.mkdir(parents=True, exist_ok=True)
    t1 = time.monotonic()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out_path.resolve() / "weights", params)
    save_s = time.monotonic() - t1
    manifest = {
        "format": FORMAT,
        "source": loaded.source,
        "model_config": config_to_dict(base),
        "dtype": jnp.dtype(dtype).name,
        "quantization": loaded.quantization,
        "quantization_option": ecfg.quantization,
        "quantized": {path: {k: getattr(w, k) for k in _Q_META} for path, w in _leaf_paths(params)
                      if quant.is_quantized(w)},
        "tokenizer": None,
        "programs": [],
    }
    if loaded.tokenizer is not None and jax.process_index() == 0:
        loaded.tokenizer.hf.save_pretrained(out_path / "tokenizer")
        manifest["tokenizer"] = {"eos_token_ids": sorted(loaded.tokenizer.eos_token_ids)}
    _write_manifest(out_path, manifest)
    del loaded, params
    if programs:
        from jaxinfer.engine import Engine

        # XLA:CPU saves only programs it compiled in this process (executables.py): no persistent cache there.
        opts = {k: v for k, v in options.items() if k != "load_format"}
        opts["show_progress"] = show_progress
        if jax.default_backend() == "cpu":
            opts["use_compilation_cache"] = False
        engine = Engine(str(out_path), program_dir=str(out_path / "programs"), **opts)
        manifest["programs"].append(engine.program_record)
        del engine
        _write_manifest(out_path, manifest)
    manifest["_seconds"] = {"load": round(load_s, 2), "save": round(save_s, 2)}
    return manifest


def _write_manifest(out: Path, manifest: dict) -> None:
    if jax.process_index() != 0:
        return
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, default=list) + "\n")
    os.replace(tmp, out / MANIFEST)


# ---------------------------------------------------------------------------------------------------------
# restoring


def restore(model: str, ecfg, dtype, mesh):
    """A converted model as the loader's LoadedModel: weights restored onto `mesh` (or the first device)."""
    import orbax.checkpoint as ocp

    from jaxinfer.loader import LoadedModel
    from jaxinfer.weights import cpu_qmatmul

    src = os.fspath(model)
    manifest = read_manifest(src)
    if ecfg.load_format not in ("auto",):
        raise ValueError(f"load_format {ecfg.load_format!r} does not apply to the converted model {src}: it is read "
                         "as it was saved (use 'auto')")
    saved_q = manifest.get("quantization_option")
    if ecfg.quantization not in (None, saved_q) and not (ecfg.quantization == "none" and manifest["quantization"] == "none"):
        raise ValueError(f"quantization {ecfg.quantization!r} does not match the converted model {src} (converted with "
                         f"{saved_q!r}: {manifest['quantization']}); leave it out, or convert again")
    base = config_from_dict(manifest["model_config"])
    cfg = tensor_parallel_config(base, tp_size(mesh), ecfg.enable_expert_parallel)
    saved_dtype = jnp.dtype(manifest["dtype"])
    weights = _epath(src).joinpath("weights")
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(weights)
        meta = getattr(meta, "item_metadata", meta)
        meta = getattr(meta, "tree", meta)
        # the saved kv-head layout (base's), placed as this mesh splits it (experts by expert with expert parallelism)
        placed = dataclasses.replace(base, expert_parallel=cfg.expert_parallel)
        target = _abstract(placed, meta, manifest["quantized"], saved_dtype, jnp.dtype(dtype), mesh)
        params = ckpt.restore(weights, target)
    params = with_kv_replicas(params, base, cfg, mesh)
    if jax.default_backend() == "cpu" and mesh is None and cpu_qmatmul.available():
        params = jax.tree_util.tree_map(_cpu_form, params, is_leaf=quant.is_quantized)
    tok = None
    if manifest.get("tokenizer"):
        tok = _tokenizer(src, manifest["tokenizer"])
    # gs://: programs run as code and are loaded only from a local directory this user owns (cache_trust)
    programs = None if "://" in src else os.path.join(src, "programs")
    return LoadedModel(cfg, params, tok, src, programs, manifest.get("programs", []))


def _abstract(cfg: ModelConfig, meta, quantized: dict, saved_dtype, dtype, mesh):
    """The restore target: ShapeDtypeStructs with the shardings of `mesh` (dense float leaves cast to `dtype`)."""

    def node(tree, path):
        for part in path.split("."):
            tree = tree[int(part)] if isinstance(tree, list) else tree[part]
        return tree

    def sds(m, axes, cast=True):
        shape, dt = tuple(m.shape), jnp.dtype(m.dtype)
        if cast and dt == saved_dtype:
            dt = dtype
        if mesh is not None and axes is None:  # g_idx, a static activation scale: whole on every device
            return jax.ShapeDtypeStruct(shape, dt, sharding=logical_sharding((None,) * len(shape), mesh))
        return jax.ShapeDtypeStruct(shape, dt, sharding=_sharding(axes, shape, mesh))

    flat, treedef = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=lambda x: hasattr(x, "axes"))
    from jaxinfer.weights import _path_str

    leaves = []
    for p, spec in flat:
        path = _path_str(p)
        m = node(meta, path)
        if path in quantized:
            q = quantized[path]
            axes = spec.quantized_axes()
            parts = {k: None if m.get(k) is None else sds(m[k], axes if len(m[k].shape) > 1 else None, cast=False)
                     for k in ("q", "scales", "zeros", "mins", "g_idx", "act_scale")}
            leaves.append(quant.QuantizedWeight(**parts, **{k: tuple(v) if k == "in_shape" else v
                                                            for k, v in q.items()}))
        else:
            leaves.append(sds(m, spec.axes))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _cpu_form(w):
    """A quantized weight in the CPU kernel's form (quant.cpu_kernel_form), as the loader makes it on a CPU."""
    if not quant.is_quantized(w):
        return w
    host = dataclasses.replace(w, **{k: None if getattr(w, k) is None else np.asarray(getattr(w, k))
                                     for k in ("q", "scales", "zeros", "mins", "g_idx", "act_scale")})
    return jax.tree_util.tree_map(jax.device_put, quant.cpu_kernel_form(host))


def _tokenizer(src: str, info: dict):
    from jaxinfer.tokenizer import Tokenizer

    folder = _epath(src).joinpath("tokenizer")
    if "://" in src:  # the tokenizer's few small files, copied to a local folder for transformers
        local = tempfile.mkdtemp(prefix="jaxinfer-tokenizer-")
        for f in folder.iterdir():
            shutil.copyfileobj(f.open("rb"), open(os.path.join(local, f.name), "wb"))
        folder = local
    tok = Tokenizer.from_pretrained(os.fspath(folder))
    tok.eos_token_ids |= set(info.get("eos_token_ids", ()))
    tok.path = src
    return tok


def program_record(fingerprint: str, devices, ecfg, sources: str) -> dict:
    """What an engine's compiled programs were made for (the manifest's "programs" entries): its fingerprint, and the
    parts of it a user can read, to say why shipped programs do not fit (sources: `executables.source_digest()`)."""
    import jaxlib

    skip = ("show_progress", "compile_threads", "compilation_cache_dir", "use_compilation_cache")
    return json.loads(json.dumps({
        "fingerprint": fingerprint, "device_kind": devices[0].device_kind, "devices": len(devices),
        "platform_version": devices[0].client.platform_version, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "python": sys.version.split()[0], "jaxinfer_sources": sources[:16],
        "engine": {k: v for k, v in dataclasses.asdict(ecfg).items() if k not in skip}}, default=str))


def program_mismatch(records: list[dict], here: dict) -> str:
    """Why none of the shipped programs fits this engine: how the closest record differs from this one's."""
    if not records:
        return "the converted model ships no compiled programs"

    def flat(r):
        return {**{k: v for k, v in r.items() if k not in ("fingerprint", "engine")},
                **{f"engine option {k}": v for k, v in r.get("engine", {}).items()}}

    mine = flat(here)

    def diff(r):
        r = flat(r)
        return [(k, r.get(k), v) for k, v in mine.items() if r.get(k) != v]

    d = min((diff(r) for r in records), key=len)
    if not d:
        return "they were compiled with other settings (XLA flags, jax's config, or the weights' layout)"
    return "; ".join(f"{k}: shipped {a!r}, here {b!r}" for k, a, b in d)
