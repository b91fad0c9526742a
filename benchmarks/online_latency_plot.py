"""Online latency of two engines side by side, from `jaxinfer bench serve --json-out` files of each (the runs of
benchmarks/online_latency_gpu.sh): TTFT and ITL p50 / p99 and output tokens/s against the offered request rate,
a PNG, and a markdown table with the ratios (ours / the peer's).

    python benchmarks/online_latency_plot.py --ours DIR/jaxinfer_*.json --peer DIR/vllm_*.json \\
        --png benchmarks/online_latency_h100.png --title "H100, Llama-3.1-8B shape, bf16"
"""

from __future__ import annotations

import argparse
import json
import math

METRICS = (("ttft_ms", "time to first token (ms)"), ("itl_ms", "inter-token latency (ms)"))


def levels(paths: list[str]) -> dict[float, dict]:
    """Every load level of the runs by offered rate (inf for all-at-once); a later file's level replaces an
    earlier one's at the same rate."""
    out = {}
    for p in paths:
        for r in json.load(open(p))["results"]:
            out[math.inf if r["request_rate"] == "inf" else float(r["request_rate"])] = r
    return dict(sorted(out.items()))


def table(ours: dict, peer: dict, names: tuple[str, str]) -> str:
    a, b = names
    head = ["rate/s", "requests"]
    for m in ("TTFT", "ITL"):
        for q in ("p50", "p99"):
            head += [f"{m} {q} {a}", f"{b}", "ratio"]
    head += [f"out tok/s {a}", b, "ratio"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rate in sorted(set(ours) & set(peer)):
        o, p = ours[rate], peer[rate]
        cells = ["inf" if math.isinf(rate) else f"{rate:g}", f"{o['completed']} / {p['completed']}"]
        for m, _ in METRICS:
            for q in ("p50", "p99"):
                x, y = o[m][q], p[m][q]
                cells += [f"{x:.1f}", f"{y:.1f}", f"{x / y:.2f}"]
        x, y = o["output_throughput"], p["output_throughput"]
        cells += [f"{x:,.0f}", f"{y:,.0f}", f"{x / y:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(ours: dict, peer: dict, names: tuple[str, str], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted(set(ours) & set(peer))
    x = list(range(len(rates)))
    labels = ["inf" if math.isinf(r) else f"{r:g}" for r in rates]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, (m, label) in zip(axes, METRICS):
        for runs, name, color in ((ours, names[0], "tab:blue"), (peer, names[1], "tab:orange")):
            for q, style in (("p50", "o-"), ("p99", "^--")):
                ax.plot(x, [runs[r][m][q] for r in rates], style, color=color, label=f"{name} {q}")
        ax.set(title=label, xlabel="offered request rate (req/s)", ylabel="ms", yscale="log")
    ax = axes[2]
    for runs, name, color in ((ours, names[0], "tab:blue"), (peer, names[1], "tab:orange")):
        ax.plot(x, [runs[r]["output_throughput"] for r in rates], "o-", color=color, label=name)
    ax.set(title="output tokens / s", xlabel="offered request rate (req/s)", ylabel="tok/s")
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", nargs="+", required=True, help="jaxinfer's bench serve JSON files")
    ap.add_argument("--peer", nargs="+", required=True, help="the peer's bench serve JSON files")
    ap.add_argument("--names", nargs=2, default=("jaxinfer", "vLLM"), metavar=("OURS", "PEER"))
    ap.add_argument("--title", default="online latency")
    ap.add_argument("--png", help="write the plot here (needs matplotlib: pip install 'jaxinfer[bench]')")
    a = ap.parse_args()
    ours, peer = levels(a.ours), levels(a.peer)
    if not set(ours) & set(peer):
        raise SystemExit("no request rate is in both sets of runs")
    print(table(ours, peer, tuple(a.names)))
    if a.png:
        plot(ours, peer, tuple(a.names), a.title, a.png)
        print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
