"""Loading: sharded safetensors, dummy weights, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import make_hf_model, sequence_logits
from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.loader import load_model
from jaxinfer.weights import GGUFSource, SafetensorsSource

ECFG = EngineConfig(show_progress=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    model = make_hf_model("qwen2", d)
    return d, model


def test_sharded_checkpoint_loads_like_the_single_file(ckpt, tmp_path):
    d, model = ckpt
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a = load_model(str(d), ECFG, jnp.float32)
    b = load_model(str(sharded), ECFG, jnp.float32)
    ids = list(range(1, 20))
    np.testing.assert_array_equal(sequence_logits(a.params, a.cfg, ids), sequence_logits(b.params, b.cfg, ids))


def test_dummy_weights_have_the_config_shape(ckpt):
    d, _ = ckpt
    m = load_model(str(d), EngineConfig(load_format="dummy", show_progress=False), jnp.float32)
    real = load_model(str(d), ECFG, jnp.float32)
    shapes = lambda p: [x.shape for x in __import__("jax").tree_util.tree_leaves(p)]  # noqa: E731
    assert shapes(m.params) == shapes(real.params)
    assert np.isfinite(sequence_logits(m.params, m.cfg, [1, 2, 3])).all()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    st = next(d.glob("*.safetensors"))
    src = SafetensorsSource(d)
    from safetensors.numpy import save_file

    tensors = {k: np.asarray(src.get(k)) for k in src.keys() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(tensors, st)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(d), ECFG, jnp.float32)


def test_wrong_shape_is_named(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"gate_proj\.weight.*shape"):
        load_model(str(d), ECFG, jnp.float32)


def test_corrupt_and_truncated_files_are_named(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    st = next(d.glob("*.safetensors"))
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{st.name}.*(truncated|corrupt)"):
        load_model(str(d), ECFG, jnp.float32)
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match=f"{st.name}.*corrupt"):
        load_model(str(d), ECFG, jnp.float32)


def test_missing_index_shard_is_named(ckpt, tmp_path):
    d, model = ckpt
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    victim = sorted(sharded.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(str(sharded), ECFG, jnp.float32)


def test_unsupported_architecture_and_missing_files(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_model(str(d), ECFG, jnp.float32)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(d), ECFG, jnp.float32)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_model(str(tmp_path / "nowhere"), ECFG, jnp.float32)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(ValueError, match="bad.gguf"):
        GGUFSource(bad)


def test_preset_needs_dummy_format():
    with pytest.raises(ValueError, match="dummy"):
        load_model("llama-3.1-8b", ECFG, jnp.float32)
    assert ModelConfig.from_preset("llama-3.1-8b").rope_scaling.kind == "llama3"
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("no-such-model")


def _safetensors(path, header: bytes, data: bytes = b"\0" * 64, n=None):
    path.write_bytes((len(header) if n is None else n).to_bytes(8, "little") + header + data)
    return path


@pytest.mark.parametrize("header,n", [
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', 2**63),  # a header "longer" than the file
    (b'[1, 2, 3]', None),  # not an object
    (b'{"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}', None),
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99999999999]}}', None),  # past the end
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}', None),
    (b'{"w": {"dtype": "F32", "shape": [1099511627776, 1099511627776], "data_offsets": [0, 0]}}', None),  # int64 wraps
    (b'{"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}', None),
    (b'{"w": {"dtype": "F32", "shape": [4]}}', None),
    (b'{"w": 7}', None),
    (b'{"w": ' + b"[" * 100000 + b"]" * 100000 + b"}", None),  # nesting past the parser's recursion limit
])
def test_hostile_safetensors_headers_are_value_errors(tmp_path, header, n):
    _safetensors(tmp_path / "model.safetensors", header, n=n)
    with pytest.raises(ValueError, match="model.safetensors"):
        src = SafetensorsSource(tmp_path)
        for k in src.keys():
            src.get(k)


def test_mutated_gguf_files_are_value_errors_or_load(tmp_path):
    """Random byte flips in a small GGUF's header and tables: each file loads or is a ValueError naming it, in
    bounded time (no hang, no other exception, no allocation from a count the file cannot hold)."""
    import time

    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list([f"t{i}" for i in range(64)])
    w.add_context_length(128)
    for i in range(4):
        w.add_tensor(f"blk.{i}.w", np.arange(256, dtype=np.float32).reshape(16, 16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    good = path.read_bytes()
    head = good.find(b"blk.3.w") + 64  # the header, the key/values and the tensor table
    rng = np.random.default_rng(0)
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(60):
        bad = bytearray(good)
        for pos in rng.integers(4, head, size=rng.integers(1, 4)):
            bad[pos] = rng.integers(0, 256) if trial % 2 else 0xFF  # 0xFF bytes: huge counts and lengths
        p = tmp_path / f"bad{trial}.gguf"
        p.write_bytes(bytes(bad))
        t0 = time.monotonic()
        try:
            src = GGUFSource(p)
            for k in src.keys():
                src.get(k)
            outcomes["loaded"] += 1
        except ValueError as e:
            assert p.name in str(e)
            outcomes["refused"] += 1
        assert time.monotonic() - t0 < 5
    assert outcomes["refused"] > 10


def test_broken_copies_of_the_default_model_are_value_errors():
    """The reliability table's corrupt-file row, short: the default model's GGUF and a small safetensors checkpoint,
    truncated and overwritten, each loaded as the engine loads it: a ValueError naming the file, or it loads;
    nothing else, and no load past a minute."""
    from conftest import bench_module
    from jaxinfer.tokenizer import default_model_path

    ri = bench_module("reliability_inputs")
    res = ri.corrupt_files(default_model_path(), trials=3, seed=1)
    assert res["other"] == 0, res["examples"]
    assert res["tried"] == res["value_error"] + res["loaded"] and res["value_error"] > 20
    assert res["slowest_s"] < 60
