#!/usr/bin/python3
"""Plots benchmarks/results/qemu_bench.csv: checkpoint pauses and guest throughput."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/qemu_bench.csv"
dst = sys.argv[2] if len(sys.argv) > 2 else src.rsplit(".", 1)[0] + ".png"
rows = list(csv.DictReader(open(src)))
paused = [r for r in rows if float(r["pause_p50_ms"]) > 0]
served = [r for r in rows if float(r["requests_per_s"]) > 0]
fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
w = 0.38
x = range(len(paused))
labels = [f"{r['system']}\n{r['load']}\n{float(r['epochs_per_s']):.0f} epochs/s" for r in paused]
a.bar([i - w / 2 for i in x], [float(r["pause_p50_ms"]) for r in paused], w, label="pause p50")
a.bar([i + w / 2 for i in x], [float(r["pause_p99_ms"]) for r in paused], w, label="pause p99")
a.set_yscale("log")
a.set_xticks(list(x), labels)
a.set_ylabel("ms (log scale)")
a.set_title("checkpoint pause, real guest under TCG, same QEMU binary")
a.legend()
x = range(len(served))
b.bar(list(x), [float(r["requests_per_s"]) for r in served], 0.5)
b.set_xticks(list(x), [f"{r['system']}" for r in served])
b.set_ylabel("requests/s")
b.set_title("guest workload throughput, client on another host")
fig.tight_layout()
fig.savefig(dst, dpi=110)
print(f"wrote {dst}")
