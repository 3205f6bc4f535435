#!/usr/bin/python3
"""Plots benchmarks/results/failover_bench.csv: CDFs of the failover steps per witness."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/failover_bench.csv"
dst = sys.argv[2] if len(sys.argv) > 2 else src.rsplit(".", 1)[0] + ".png"
rows = list(csv.DictReader(open(src)))
witnesses = sorted({r["witness"] for r in rows})
metrics = [("exit_ms", "kill -9 -> process gone (baseline)", ":"),
           ("detect_ms", "-> loss detected (PROMOTING)", "--"),
           ("active_ms", "-> running, identity announced (ACTIVE)", "-"),
           ("first_reply_ms", "-> client's first reply", "-.")]
fig, axes = plt.subplots(1, len(witnesses), figsize=(6.5 * len(witnesses), 4.5), squeeze=False)
for ax, w in zip(axes[0], witnesses):
    mine = [r for r in rows if r["witness"] == w]
    for key, label, style in metrics:
        v = sorted(float(r[key]) for r in mine)
        ax.step(v, [(i + 1) / len(v) for i in range(len(v))], style, where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("ms after kill -9 (log scale)")
    ax.set_ylabel("fraction of trials")
    ax.set_title(f"failover, {w} witness, {len(mine)} trials, real guest under TCG")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
rto = rows[0].get("client_rto_min_ms", "0") if rows else "0"
fig.suptitle(f"plugin settings {rows[0].get('settings', '?') if rows else '?'}; client TCP "
             f"rto_min {'kernel default (200 ms)' if rto in ('', '0') else rto + ' ms'}",
             fontsize=9)
fig.tight_layout()
fig.savefig(dst, dpi=110)
print(f"wrote {dst}")
