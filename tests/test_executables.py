"""Compiled programs saved whole (jaxinfer/executables.py): a second engine of the same configuration loads them
without tracing or lowering, generates the same tokens, and anything that changes a program changes the key."""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import warnings

import jax
import pytest
from conftest import TINY_ENGINE_OPTIONS

from jaxinfer import cache_trust, compile_guard, executables
from jaxinfer.sampling_params import SamplingParams

OPTS = dict(TINY_ENGINE_OPTIONS, token_buckets=(4, 16), seq_buckets=(1, 4), max_num_seqs=4, num_pages=40,
            use_compilation_cache=True)
PROMPTS = [[1, 5, 9, 2, 7], [3, 3, 8], list(range(10, 30))]
PARAMS = [SamplingParams(max_tokens=6, temperature=0.0), SamplingParams(max_tokens=6, temperature=0.8, seed=3),
          SamplingParams(max_tokens=6, temperature=0.0, logprobs=2)]


def _llm(model_dir, cache):
    import jaxinfer

    return jaxinfer.LLM(str(model_dir), compilation_cache_dir=str(cache), **OPTS)


def _run(llm):
    return [(o.outputs[0].token_ids, [sorted(lp) for lp in o.outputs[0].logprobs or []])
            for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


_JAX_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                      "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="module")
def cold(tiny_llama_dir, tmp_path_factory):
    """An engine built on an empty cache (jax's persistent cache on in it, as in a user's process), its outputs,
    and the cache. jax's cache settings are process-wide: restored afterwards."""
    from jax._src import compilation_cache

    saved = {k: getattr(jax.config, k) for k in _JAX_CACHE_OPTIONS}
    compilation_cache.reset_cache()
    cache = tmp_path_factory.mktemp("cc")
    llm = _llm(tiny_llama_dir[0], cache)
    assert jax.config.jax_compilation_cache_dir == str(cache)
    yield llm, _run(llm), cache
    for k, v in saved.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


def _store_files(cache):
    return sorted((cache / executables.FOLDER).glob(f"*/*{executables.SUFFIX}"))


def test_a_second_engine_loads_every_program_without_lowering(cold, tiny_llama_dir, monkeypatch):
    llm, out, cache = cold
    runner = llm.engine.runner
    n = len(runner.program_seconds)
    assert runner.programs_loaded == 0 and n == len(_store_files(cache)) > len(runner.compiled)

    from jaxinfer.runner import ModelRunner

    def no_lowering(*a, **k):
        raise AssertionError("a saved program was traced again")

    monkeypatch.setattr(ModelRunner, "_lower_forward", no_lowering)
    monkeypatch.setattr(ModelRunner, "_lower_sampler", no_lowering)
    warm = _llm(tiny_llama_dir[0], cache)
    assert warm.engine.runner.programs_loaded == n
    assert _run(warm) == out
    assert warm.engine.num_compiles_since_ready == 0


def _drop_jax_cache(cache):
    for f in cache.glob("*-cache"):  # jax's own entries beside the store: the next compile is a fresh one
        f.unlink()


def test_a_broken_file_is_replaced_and_the_rest_still_load(cold, tiny_llama_dir):
    llm, out, cache = cold
    files = _store_files(cache)
    broken = next(f for f in files if f.name.startswith("16-4-False"))
    broken.write_bytes(b"not a program")
    _drop_jax_cache(cache)
    with pytest.warns(UserWarning, match="16-4-False.jxe could not be loaded"):
        warm = _llm(tiny_llama_dir[0], cache)
    assert warm.engine.runner.programs_loaded == len(files) - 1
    assert _run(warm) == out
    assert broken.stat().st_size > 1000  # compiled again and saved over the broken file
    devices = executables.devices_of(warm.engine.runner.params, None)
    store = executables.ExecutableStore(cache, broken.parent.name.removeprefix("p0-"), devices)
    assert store.load((16, 4, False)) is not None


def test_programs_loaded_from_jax_cache_are_not_saved_on_cpu(cold, tiny_llama_dir):
    """XLA:CPU serialises an executable it loaded from jax's persistent cache without its machine code, which
    then fails at its first run ("Function ... not found"): such programs must not reach the store there."""
    llm, out, cache = cold
    folder = _store_files(cache)[0].parent
    shutil.rmtree(folder)
    _drop_jax_cache(cache)
    _llm(tiny_llama_dir[0], cache)  # compiles afresh: into jax's cache and the store
    assert len(_store_files(cache)) == len(llm.engine.runner.program_seconds)
    shutil.rmtree(folder)  # the store is empty; jax's cache holds every program
    again = _llm(tiny_llama_dir[0], cache)
    assert again.engine.runner.programs_loaded == 0 and not _store_files(cache)
    third = _llm(tiny_llama_dir[0], cache)  # what a saved-and-broken program would have failed in
    assert third.engine.runner.programs_loaded == 0
    assert _run(third) == out


def test_an_unwritable_store_warns_once_and_the_program_still_runs(cold, tmp_path):
    llm, _, _ = cold
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    (cache / executables.FOLDER).write_text("")  # the store's folder would be under a file
    devices = executables.devices_of(llm.engine.runner.params, None)
    store = executables.ExecutableStore(cache, "x", devices)
    exe = llm.engine.runner.compiled_samplers[(1, "greedy")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store.save((1, "greedy"), exe)
        store.save((4, "greedy"), exe)
    assert [str(w.message).startswith("compiled programs not saved") for w in caught] == [True]  # once
    assert store.load((1, "greedy")) is None


def test_the_fingerprint_follows_what_reaches_the_programs(cold, tmp_path, monkeypatch):
    llm, _, _ = cold
    eng = llm.engine
    r = eng.runner
    args = dict(cfg=eng.cfg, ecfg=eng.ecfg, params=r.params, abstract_kv=r.kv, max_model_len=eng.max_model_len,
                devices=executables.devices_of(r.params, None))
    key = executables.fingerprint(**args)
    assert executables.fingerprint(**args) == key
    quiet = dataclasses.replace(eng.ecfg, show_progress=True, compile_threads=3, compilation_cache_dir="/elsewhere")
    assert executables.fingerprint(**dict(args, ecfg=quiet)) == key  # options no program reads
    with jax.default_matmul_precision("highest"):  # jax's config reaches the programs
        assert executables.fingerprint(**args) != key
    for module, name in (("jaxinfer.quant", "GPU_KERNEL_MIN_TOKENS_4BIT"),
                         ("jaxinfer.runner", "SAMPLER_COMPILER_OPTIONS")):
        with monkeypatch.context() as m:  # a setting that picks a program's form, changed at run time
            value = getattr(importlib.import_module(module), name)
            m.setattr(f"{module}.{name}", {"xla_gpu_graph_min_graph_size": 9} if isinstance(value, dict) else value + 1)
            assert executables.fingerprint(**args) != key, name
    assert executables.fingerprint(**args) == key
    for changed in (dict(ecfg=dataclasses.replace(eng.ecfg, max_logprobs=eng.ecfg.max_logprobs + 1)),
                    dict(cfg=dataclasses.replace(eng.cfg, rms_norm_eps=eng.cfg.rms_norm_eps * 2)),
                    dict(max_model_len=eng.max_model_len - 4)):
        assert executables.fingerprint(**dict(args, **changed)) != key, changed
    src = tmp_path / "src"
    for root in executables._source_roots():
        shutil.copytree(root, src / root.name)
    monkeypatch.setattr(executables, "_source_roots", lambda: [src / "jaxinfer", src / "pallas_kernels"])
    copied = executables.fingerprint(**args)
    with open(src / "jaxinfer" / "model.py", "a") as f:
        f.write("\n# an edit\n")
    assert executables.fingerprint(**args) != copied  # any source edit: programs lowered again


def test_saving_a_new_configuration_keeps_only_the_most_recently_used(cold, tmp_path):
    llm, _, _ = cold
    root = tmp_path / executables.FOLDER
    for i in range(executables.KEEP + 2):  # older configurations, the first the least recently used
        (root / f"p0-old{i}").mkdir(parents=True)
        os.utime(root / f"p0-old{i}", (1_000_000 + i, 1_000_000 + i))
    (root / "p1-other").mkdir()  # another process's (a multi-host job sharing the directory): not ours to prune
    os.utime(root / "p1-other", (1_000, 1_000))
    devices = executables.devices_of(llm.engine.runner.params, None)
    exe = llm.engine.runner.compiled_samplers[(1, "greedy")]
    executables.ExecutableStore(tmp_path / "elsewhere", "x", devices).save((1, "greedy"), exe)
    shutil.copy(tmp_path / "elsewhere" / executables.FOLDER / "p0-x" / "1-greedy.jxe", root / "p0-old0")
    shutil.copy(tmp_path / "elsewhere" / cache_trust.KEY_FILE, tmp_path / cache_trust.KEY_FILE)  # the same signer
    os.utime(root / "p0-old0", (1_000_000, 1_000_000))
    assert executables.ExecutableStore(tmp_path, "old0", devices).load((1, "greedy")) is not None  # marks old0 used
    store = executables.ExecutableStore(tmp_path, "new", devices)
    store.save((1, "greedy"), exe)
    kept = sorted(p.name for p in root.iterdir())
    assert kept == sorted(["p0-new", "p0-old0", "p1-other"] + [f"p0-old{i}" for i in range(4, executables.KEEP + 2)])
    assert store.load((1, "greedy")) is not None


class _Payload:
    """Unpickling this runs code: it writes the marker file (what a planted pickle would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_file_this_store_did_not_write_is_never_unpickled(cold, tmp_path):
    import pickle

    llm, _, cache = cold
    devices = executables.devices_of(llm.engine.runner.params, None)
    store = executables.ExecutableStore(cache, "planted", devices)
    store.path.mkdir(parents=True)
    marker = tmp_path / "ran"
    raw = pickle.dumps(_Payload(marker))
    key = (cache / cache_trust.KEY_FILE).read_bytes()
    for name, data in [("1-greedy", raw),  # a bare pickle
                       ("4-greedy", cache_trust.MAGIC + bytes(32) + raw),  # a made-up signature
                       ("16-greedy", cache_trust.sign(b"another key" * 3, "16-greedy.jxe", raw)),  # another cache's
                       ("1-random", cache_trust.sign(key, "4-random.jxe", raw))]:  # this key, another file's name
        (store.path / (name + executables.SUFFIX)).write_bytes(data)
        with pytest.warns(UserWarning, match="signature does not match"):
            assert store.load(tuple(name.split("-"))) is None
        assert not marker.exists() and not (store.path / (name + executables.SUFFIX)).exists()
    assert pickle.loads(cache_trust.verify(key, "x.jxe", cache_trust.sign(key, "x.jxe", raw))) is not None
    assert marker.exists()  # the payload does run when unpickled: the checks above are what kept it out


def test_jax_cache_entries_are_signed(cold):
    _, _, cache = cold
    entries = list(cache.glob("*-cache"))
    key = (cache / cache_trust.KEY_FILE).read_bytes()
    assert entries and all(f.read_bytes().startswith(cache_trust.MAGIC) for f in entries)
    f = entries[0]
    assert cache_trust.verify(key, f.name.removesuffix("-cache"), f.read_bytes()) is not None
    tampered = bytearray(f.read_bytes())
    tampered[-1] ^= 1
    assert cache_trust.verify(key, f.name.removesuffix("-cache"), bytes(tampered)) is None


@pytest.mark.parametrize("how", ["group-writable", "other user's"])
def test_a_cache_directory_others_control_is_refused(cold, tmp_path, monkeypatch, how):
    llm, _, _ = cold
    cache = tmp_path / "shared"
    cache.mkdir()
    if how == "group-writable":
        cache.chmod(0o775)
    else:
        monkeypatch.setattr(os, "getuid", lambda: os.stat(cache).st_uid + 1)
    devices = executables.devices_of(llm.engine.runner.params, None)
    with pytest.warns(UserWarning, match="not used: (writable by its group|owned by another user)"):
        store = executables.ExecutableStore(cache, "x", devices)
    store.save((1, "greedy"), llm.engine.runner.compiled_samplers[(1, "greedy")])
    assert store.load((1, "greedy")) is None and not (cache / executables.FOLDER).exists()
    assert not (cache / cache_trust.KEY_FILE).exists()
    before = jax.config.jax_compilation_cache_dir
    assert compile_guard.enable_persistent_cache(str(cache)) is False
    assert jax.config.jax_compilation_cache_dir == before
    assert cache_trust.unsafe_reason("gs://bucket/cache") is not None


def test_a_new_cache_directory_is_private_and_its_key_too(tmp_path):
    d = tmp_path / "new" / "cache"
    assert cache_trust.unsafe_reason(str(d)) is None
    assert (d.stat().st_mode & 0o777) == 0o700
    key = cache_trust.signing_key(str(d))
    assert len(key) == 32 and cache_trust.signing_key(str(d)) == key
    assert ((d / cache_trust.KEY_FILE).stat().st_mode & 0o777) == 0o600
    (d / cache_trust.KEY_FILE).chmod(0o644)  # readable by others: no longer a secret
    with pytest.warns(UserWarning, match="signing key"):
        assert cache_trust.signing_key(str(d)) is None
