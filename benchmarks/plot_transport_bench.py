#!/usr/bin/python3
"""Plots benchmarks/results/transport_bench.csv: each transport's stream beside its raw medium."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/transport_bench.csv"
dst = sys.argv[2] if len(sys.argv) > 2 else src.rsplit(".", 1)[0] + ".png"
# Rows that measured something (not a transport that could not run, not a failed size).
rows = [r for r in csv.DictReader(open(src))
        if r["epoch_bytes"] != "0" and float(r["stream_mbps"]) > 0]
def size(b):
    b = int(b)
    return f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB"


labels = [f"{r['transport']}\n{r['medium']}\n{size(r['epoch_bytes'])}" for r in rows]
x = range(len(rows))
fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
w = 0.27
a.bar([i - w for i in x], [float(r["stream_mbps"]) for r in rows], w, label="transport, epochs streamed")
a.bar([i for i in x], [float(r["baseline_mbps"]) for r in rows], w, label="raw medium, same run")
a.bar([i + w for i in x], [float(r.get("baseline_copy_mbps") or 0) for r in rows], w,
      label="raw memif + payload copied in and out")
for i, r in zip(x, rows):
    if r.get("ratio_pct"):  # the median of the paired ratios against the raw medium
        a.annotate(f"{float(r['ratio_pct']):.0f}%", (i - w, float(r["stream_mbps"])),
                   ha="center", va="bottom", fontsize=7)
a.set_xticks(list(x), labels, fontsize=7)
a.set_ylabel("MB/s")
a.set_title("one-way throughput")
a.legend(loc="upper left", fontsize=8)
b.bar([i - w / 2 for i in x], [float(r["ack_p50_us"]) for r in rows], w, label="p50")
b.bar([i + w / 2 for i in x], [float(r["ack_p99_us"]) for r in rows], w, label="p99")
b.set_xticks(list(x), labels, fontsize=7)
b.set_yscale("log")
b.set_ylabel("µs")
b.set_title("epoch sent → 16-byte ACK back")
b.legend()
fig.tight_layout()
fig.savefig(dst, dpi=110)
