"""Bar charts of a bench run (matplotlib, Agg backend): medians with min-max error bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"wgx-xdp": "#2a9d8f", "wgx-socket": "#8ab17d", "wireguard-go": "#e76f51",
          "underlay": "#9e9e9e"}


def _bars(ax: Any, results: dict[str, Any], metrics: list[tuple[str, str]], ylabel: str,
          title: str) -> None:
    summary = results["summary"]
    paths = list(summary)
    n = max(1, len(paths))
    width = 0.8 / n
    for i, p in enumerate(paths):
        xs, ys, lo, hi = [], [], [], []
        for j, (metric, _label) in enumerate(metrics):
            cell = summary[p].get(metric)
            if not cell:
                continue
            xs.append(j + (i - (n - 1) / 2) * width)
            ys.append(cell["median"])
            lo.append(cell["median"] - cell["min"])
            hi.append(cell["max"] - cell["median"])
        if xs:
            hatch = "//" if any((summary[p].get(m) or {}).get("only_disturbed")
                                for m, _ in metrics) else None
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=p,
                   color=COLORS.get(p), hatch=hatch, edgecolor="black", linewidth=0.5)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([label for _, label in metrics])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_chart(results: dict[str, Any], path: Path) -> None:
    plt = _figure()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    _bars(ax1, results, [("tcp1_gbps", "TCP 1 stream"), ("tcp4_gbps", "TCP 4 streams"),
                         ("junk_tcp1_gbps", "TCP 1 + junk")], "Gbit/s", "TCP goodput")
    _bars(ax2, results, [("udp1372_kpps", "UDP 1372 B"), ("udp64_kpps", "UDP 64 B")],
          "kpps", "UDP, highest rate with <= 1% loss")
    ax1.set_yscale("log")
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(f"wgx bench {results['date']} ({results['machine']['cores']} cores; "
                 "bars: median, whiskers: min-max, hatched: disturbed only)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latency_chart(results: dict[str, Any], path: Path) -> None:
    plt = _figure()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    _bars(ax1, results, [("rtt_p50_ms", "p50"), ("rtt_p99_ms", "p99")], "ms", "ping RTT")
    _bars(ax2, results, [("cpu_s_per_gb", "TCP 1 stream"),
                         ("junk_cpu_s_per_gb", "TCP 1 + junk")], "CPU-s per GB",
          "dataplane CPU (both ends) per GB")
    ax1.legend(fontsize=8)
    fig.suptitle(f"wgx bench {results['date']} (bars: median, whiskers: min-max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
