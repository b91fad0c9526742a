"""The wheel carries what an installed jaxinfer needs outside its .py files: the model and engine presets."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_every_preset(tmp_path):
    src, out = tmp_path / "src", tmp_path / "dist"
    for d in ("jaxinfer", "pallas_kernels", "serving", "configs"):  # a copy: the build writes next to its sources
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / f, src / f)
    # Build isolation, as a user's `pip install .` would do: the test venv's own setuptools may be too old to
    # build wheels (Python 3.11's venvs ship setuptools 65 without `wheel`).
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("jaxinfer-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    presets = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.json"))
    assert presets and {"models/llama-3.1-8b.json", "engine/h100-llama-3.1-8b.json"} <= set(presets)
    missing = [p for p in presets if f"jaxinfer/configs/{p}" not in names]
    assert not missing, missing
    assert "jaxinfer/engine.py" in names and "pallas_kernels/ragged_paged_attention_gpu.py" in names
    assert "pallas_kernels/cpu_qmatmul.cc" in names  # built on first use from the installed package
    assert {"serving/static/index.html", "serving/static/chat.js", "serving/static/chat.css"} <= names  # the chat page
    # the SPDX license expression (PEP 639), not the TOML table setuptools deprecates
    meta = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)  # its text, found by setuptools' default
