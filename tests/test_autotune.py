"""Shipped XLA autotune results: packed from a cache folder, seeded into a fresh one for the GPU they fit only."""

from __future__ import annotations

import base64
import json

import jaxlib

from conftest import TINY_ENGINE_OPTIONS

from jaxinfer import autotune
from jaxinfer.config import CONFIGS_DIR


def _cache_with(tmp_path, files: dict[str, bytes]):
    root = tmp_path / "made"
    for name, data in files.items():
        p = root / autotune.FOLDER / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _write_bundle(path, b: dict, **override):
    path.mkdir(parents=True, exist_ok=True)
    (path / "gpu.json").write_text(json.dumps(dict(b, **override)))
    return path


def test_bundle_then_seed_copies_results_for_the_matching_gpu_and_jaxlib(tmp_path):
    files = {"dev1/aa.pb": b"\x0a\x01one", "dev1/bb.pb": b"\x0a\x02two\x00"}
    made = _cache_with(tmp_path, files)
    (made / autotune.FOLDER / "dev1" / ".tmp-half-written").write_bytes(b"x")  # never shipped
    b = autotune.bundle(made, note="test")
    assert b["jaxlib"] == jaxlib.__version__ and b["note"] == "test"
    assert sorted(b["results"]) == sorted(files)
    bundles = _write_bundle(tmp_path / "bundles", b, device_kind="GPU X")

    fresh = tmp_path / "fresh"
    assert autotune.seed(fresh, bundles, device_kinds={"GPU Y"}) == 0  # another GPU: nothing
    assert autotune.seed(fresh, bundles, device_kinds={"GPU X"}) == 2
    for name, data in files.items():
        assert (fresh / autotune.FOLDER / name).read_bytes() == data
    assert autotune.seed(fresh, bundles, device_kinds={"GPU X"}) == 0  # already there: left alone

    kept = tmp_path / "kept"
    (kept / autotune.FOLDER / "dev1").mkdir(parents=True)
    (kept / autotune.FOLDER / "dev1" / "aa.pb").write_bytes(b"own")
    assert autotune.seed(kept, bundles, device_kinds={"GPU X"}) == 1
    assert (kept / autotune.FOLDER / "dev1" / "aa.pb").read_bytes() == b"own"


def test_seed_skips_other_jaxlibs_unsafe_names_and_cpu(tmp_path):
    b = autotune.bundle(_cache_with(tmp_path, {"d/a.pb": b"a"}))
    other = _write_bundle(tmp_path / "other", b, device_kind="GPU X", jaxlib="0.0.1")
    assert autotune.seed(tmp_path / "c1", other, device_kinds={"GPU X"}) == 0
    evil = dict(b, device_kind="GPU X", results={"../../escaped.pb": base64.b64encode(b"x").decode()})
    assert autotune.seed(tmp_path / "c2", _write_bundle(tmp_path / "evil", evil), device_kinds={"GPU X"}) == 0
    assert not (tmp_path / "escaped.pb").exists()
    absolute = dict(evil, results={str(tmp_path / "abs.pb"): base64.b64encode(b"x").decode()})
    assert autotune.seed(tmp_path / "c4", _write_bundle(tmp_path / "abs", absolute), device_kinds={"GPU X"}) == 0
    assert not (tmp_path / "abs.pb").exists()
    # on this CPU backend the shipped GPU bundles are never seeded
    assert autotune.seed(tmp_path / "c3") == 0 and not (tmp_path / "c3").exists()


def test_shipped_bundles_are_well_formed():
    paths = sorted((CONFIGS_DIR / "autotune").glob("*.json"))
    assert paths
    for p in paths:
        b = json.loads(p.read_text())
        assert b["jaxlib"] and b["device_kind"] and b["note"], p
        assert len(b["results"]) > 100, p
        for name, data in b["results"].items():
            assert not name.startswith("/") and ".." not in name.split("/"), name
            assert name.endswith(".pb") and base64.b64decode(data, validate=True), name


def test_engine_starts_when_the_results_cannot_be_added(tiny_llama_dir, monkeypatch, capsys, tmp_path):
    """A cache the results cannot be written to costs XLA's searches, not the start-up."""
    from jaxinfer import compile_guard
    from jaxinfer.engine import Engine

    def fail(*a, **k):
        raise OSError("read-only file system")

    monkeypatch.setattr(autotune, "seed", fail)
    monkeypatch.setattr(compile_guard, "enable_persistent_cache", lambda d: None)  # keep this process's jax config
    opts = dict(TINY_ENGINE_OPTIONS, token_buckets=(4,), seq_buckets=(1,), max_num_seqs=1, use_compilation_cache=True,
                compilation_cache_dir=str(tmp_path))
    engine = Engine(str(tiny_llama_dir[0]), num_pages=40, **opts)
    assert engine.num_pages == 40
    assert "XLA autotune results not added to the compilation cache: read-only file system" in capsys.readouterr().err
