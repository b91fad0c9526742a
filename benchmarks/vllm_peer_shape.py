"""The vLLM peer's offline benchmark (../shared/peers/vllm/bench.py, copied to .peers/bench.py) for another model
shape: its dummy-weight model directory gets one of our presets' HF config instead of Llama-3.1-8B's.

    python3 benchmarks/vllm_peer_shape.py configs/models/qwen3-30b-a3b.json --out OUT --skip c --max-model-len 2048

Arguments after the config go to bench.py unchanged (--out, --skip, --quantization, ...).
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    config, rest = sys.argv[1], sys.argv[2:]
    sys.path.insert(0, os.path.join(ROOT, ".peers"))
    import bench  # the peer's script: its model directory is written from this module-level config

    with open(config) as f:
        bench.LLAMA31_8B = {"torch_dtype": "bfloat16", **json.load(f)}
    sys.argv = ["bench.py", *rest]
    bench.main()


if __name__ == "__main__":
    main()
