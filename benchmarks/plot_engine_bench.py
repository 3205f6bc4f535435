#!/usr/bin/python3
"""Plots benchmarks/results/engine_bench.csv: pause vs memcpy, stream vs raw socket."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/engine_bench.csv"
dst = sys.argv[2] if len(sys.argv) > 2 else src.rsplit(".", 1)[0] + ".png"
rows = list(csv.DictReader(open(src)))
labels = [f"{r['dirty_mib']} MiB{'' if r['delta'] == '1' else ' raw'}\n{r.get('link_protection', '')}"
          for r in rows]
x = range(len(rows))
fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
w = 0.27
a.bar([i - w for i in x], [float(r["pause_p50_us"]) / 1000 for r in rows], w, label="pause p50")
a.bar([i for i in x], [float(r["pause_p99_us"]) / 1000 for r in rows], w, label="pause p99")
a.bar([i + w for i in x], [float(r["memcpy_cold_us"]) / 1000 for r in rows], w, label="memcpy (cold), same run")
a.set_xticks(list(x), labels)
a.set_ylabel("ms")
a.set_title("checkpoint pause vs memcpy of the dirty bytes")
a.legend()
b.bar([i - w / 2 for i in x], [float(r["stream_mbps"]) for r in rows], w, label="epoch stream (to ACK)")
b.bar([i + w / 2 for i in x], [float(r["raw_socket_mbps"]) for r in rows], w, label="raw loopback socket, same run")
b.set_xticks(list(x), labels)
b.set_ylabel("MB/s")
b.set_title("epoch throughput over TCP loopback")
b.legend()
fig.suptitle(f"lockstep engine_bench, {rows[0]['run_at']}")
fig.tight_layout()
fig.savefig(dst, dpi=110)
print(f"wrote {dst}")
