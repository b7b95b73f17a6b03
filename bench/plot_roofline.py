#!/usr/bin/python3
"""Roofline plot of BatchNorm3d(+ReLU) from bench_peers' JSON output (Debian's python3-matplotlib).

Usage: bench/plot_roofline.py peers.json out.png "machine, date"
For each shape and op: achieved GB/s (minimal traffic / time) of volfuse, oneDNN and libtorch,
with the in-place and copy rooflines measured in the same run, at 1 and 2 threads.
"""
import json
import re
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, out, label = sys.argv[1], sys.argv[2], sys.argv[3]
ms = {}
runs = json.load(open(src))["benchmarks"]
gbs = {}
for r in runs:
    if r.get("run_type") != "iteration":
        continue
    name = re.sub(r"/(min_warmup_time:[0-9.]+|real_time)", "", r["name"])
    gbs[name] = r["GB/s"] / 1e9
    ms[name] = r["real_time"] * {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[r["time_unit"]]

ops = ["fwd_train_relu", "fwd_eval_relu", "bwd_relu"]
impls = [("volfuse_ncdhw", "volfuse NCDHW", "tab:red"), ("volfuse_ndhwc", "volfuse NDHWC", "tab:orange"),
         ("volfuse_nCdhw16c", "volfuse nCdhw16c", "tab:brown"),
         ("onednn_nCdhw16c", "oneDNN nCdhw16c", "tab:blue"), ("onednn_ndhwc", "oneDNN NDHWC", "tab:cyan"),
         ("onednn_ncdhw", "oneDNN NCDHW", "tab:purple"), ("torch_ncdhw", "libtorch NCDHW", "tab:green")]
def volume(shape):
    n = 1
    for v in shape.split("x"):
        n *= int(v)
    return n


shapes = sorted({m.group(1) for n in gbs for m in [re.match(r"peers/([^/]+)/", n)] if m}, key=volume)
fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharey=True)
for row, threads in enumerate(["1T", "2T"]):
    for col, op in enumerate(ops):
        ax = axes[row][col]
        xs = range(len(shapes))
        width = 0.115
        for k, (key, lab, color) in enumerate(impls):
            vals = [gbs.get("peers/%s/%s/%s/%s" % (s, threads, op, key), 0.0) for s in shapes]
            ax.bar([x + (k - 3) * width for x in xs], vals, width, label=lab, color=color)
        roof = "roofline_ntcopy" if op == "bwd_relu" else "roofline_inplace"
        for x, s in zip(xs, shapes):
            v = gbs.get("peers/%s/%s/%s" % (s, threads, roof), 0.0)
            ax.hlines(v, x - 0.45, x + 0.45, colors="black", linestyles="dashed",
                      label=("roofline (%s)" % ("copy" if op == "bwd_relu" else "in-place r+w")) if x == 0 else None)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([s.replace("x", "\u00d7") for s in shapes], fontsize=8)
        ax.set_title("%s, %s thread%s" % (op, threads[0], "" if threads == "1T" else "s"))
        if col == 0:
            ax.set_ylabel("GB/s of minimal traffic")
        if row == 0 and col == 0:
            ax.legend(fontsize=7)
fig.suptitle("BatchNorm3d(+ReLU), fp32: achieved bandwidth vs the roofline measured in the same run (%s)" % label)
fig.tight_layout()
fig.savefig(out, dpi=110)
print("wrote", out)

# The same run as a Markdown table (times in ms): what docs/performance.md shows.
print("\n| shape | threads | op | roofline | volfuse NCDHW | volfuse NDHWC | volfuse nCdhw16c | oneDNN NCDHW | "
      "oneDNN NDHWC | oneDNN nCdhw16c | libtorch NCDHW | volfuse / roofline | oneDNN best / volfuse | libtorch / volfuse |")
print("|" + "---|" * 14)
for s in shapes:
    for threads in ["1T", "2T"]:
        for op in ops:
            base = "peers/%s/%s/" % (s, threads)
            roof = ms.get(base + "roofline_ntcopy", 0) * 1.5 if op == "bwd_relu" else ms.get(base + "roofline_inplace", 0)
            t = {k: ms.get(base + op + "/" + k, 0.0) for k, _, _ in impls}
            v = min(x for x in (t["volfuse_ncdhw"], t["volfuse_ndhwc"], t["volfuse_nCdhw16c"]) if x > 0)
            d = min(x for x in (t["onednn_ncdhw"], t["onednn_ndhwc"], t["onednn_nCdhw16c"]) if x > 0)
            print("| [%s] | %s | %s | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.2f | %.2f | %.1f |" % (
                s.replace("x", ","), threads[0], op, roof, t["volfuse_ncdhw"], t["volfuse_ndhwc"], t["volfuse_nCdhw16c"],
                t["onednn_ncdhw"],
                t["onednn_ndhwc"], t["onednn_nCdhw16c"], t["torch_ncdhw"], v / roof, d / v, t["torch_ncdhw"] / v))
