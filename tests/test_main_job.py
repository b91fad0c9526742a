"""The README's main job, as a user runs it: `jaxinfer chat "What is the capital of France?"` on the default model."""

from __future__ import annotations

import os
import subprocess
import sys


def test_chat_cli_answers_on_default_model():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "jaxinfer", "chat", "What is the capital of France?", "--quiet"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
    assert "Traceback" not in proc.stderr and "PyTorch was not found" not in proc.stderr
