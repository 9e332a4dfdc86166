"""The bench's summary table, as a rich Table (the CLI prints it) and as Markdown."""

from __future__ import annotations

from typing import Any

from .bench import METRICS

COLUMNS: list[tuple[str, str]] = [
    ("tcp1_gbps", "TCP1\nGbit/s"), ("tcp4_gbps", "TCP4\nGbit/s"),
    ("udp1372_kpps", "UDP1372\nkpps"), ("udp64_kpps", "UDP64\nkpps"),
    ("rtt_p50_ms", "RTT p50\nms"), ("rtt_p99_ms", "RTT p99\nms"),
    ("cpu_s_per_gb", "CPU-s/GB\nTCP1"), ("rss_peak_mb", "RSS\nMB"), ("pss_peak_mb", "PSS\nMB"),
    ("junk_clean_tcp1_gbps", "TCP1 before junk\nGbit/s"),
    ("junk_tcp1_gbps", "junk TCP1\nGbit/s"), ("junk_keep_pct", "junk keeps\n% of clean"),
    ("junk_cpu_s_per_gb", "junk\nCPU-s/GB"),
]
REFS = (("wireguard-go", "wg"), ("wgx-socket", "sk"))


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def cells(results: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(path, [(value text, ratio text) per column])]."""
    rows = []
    for p, row in results["summary"].items():
        info = results["paths"].get(p, {})
        out = []
        for metric, _title in COLUMNS:
            cell = row.get(metric)
            if not info.get("available"):
                out.append(("n/a", ""))
                continue
            if not cell:
                out.append(("n/a" if metric.endswith(("cpu_s_per_gb", "_mb"))
                            and p == "underlay" else "-", ""))
                continue
            text = _fmt(cell["median"]) + ("*" if cell["only_disturbed"] else "")
            ratios = []
            for ref, short in REFS:
                r = results["ratios"].get(ref, {}).get(p, {}).get(metric)
                if r is not None and ref != p:
                    ratios.append(f"{r:.2f}x{short}")
            out.append((text, " ".join(ratios)))
        rows.append((p, out))
    return rows


def rich_table(results: dict[str, Any]) -> Any:
    """Metrics as rows, paths as columns; each cell: median, then its ratios."""
    from rich.table import Table

    cfg = results["config"]
    table = Table(title=f"wgx bench: medians of {cfg['repeat']} x {cfg['duration']:g} s, "
                  "paths interleaved",
                  caption="ratios: x wg = value / wireguard-go, x sk = value / wgx-socket; "
                          "* = only disturbed samples; UDP = highest rate with <= 1% loss; "
                          "RTT, CPU, memory: lower is better", show_lines=True)
    table.add_column("metric", style="bold")
    rows = cells(results)
    for p, _ in rows:
        avail = results["paths"].get(p, {}).get("available")
        table.add_column(p if avail else f"{p}\n[red]unavailable[/]", justify="right")
    for i, (_metric, title) in enumerate(COLUMNS):
        table.add_row(title.replace("\n", " "),
                      *[row[i][0] + (f"\n[dim]{row[i][1]}[/]" if row[i][1] else "")
                        for _, row in rows])
    return table


def markdown_table(results: dict[str, Any]) -> str:
    """The same table in Markdown: a row per metric, a column per path."""
    rows = cells(results)
    lines = ["| metric | " + " | ".join(p for p, _ in rows) + " |",
             "|---|" + "---:|" * len(rows)]
    for i, (_metric, title) in enumerate(COLUMNS):
        lines.append(f"| {title.replace(chr(10), ' ')} | " + " | ".join(
            row[i][0] + (f" ({row[i][1]})" if row[i][1] else "") for _, row in rows) + " |")
    return "\n".join(lines)


def crypto_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in res["sizes"]:
        rows.append([f"{r['size']} B", f"{r['decrypt_pps'] / 1e3:.0f}",
                     f"{r['decrypt_ceiling_pps'] / 1e3:.0f}", f"{r['decrypt_ratio']:.2f}",
                     f"{r['encrypt_pps'] / 1e3:.0f}", f"{r['encrypt_ceiling_pps'] / 1e3:.0f}",
                     f"{r['encrypt_ratio']:.2f}"])
    return rows


__all__ = ["COLUMNS", "METRICS", "cells", "crypto_rows", "markdown_table", "rich_table"]
