#!/usr/bin/env python3
"""Compile time of the sources volfuse_gen generated for the seed networks, with the
benchmark build's own flags (-O3 -march=native), one after the other (issue 5's budget: 30 s
for both).  Usage: compile_time.py BUILD_DIR [--smoke] (a configured benchmark build, already
built).  --smoke (CI's check that the script runs): the sources compile side by side, and the
times, which then share the cores, are not reported as a measurement."""
import json
import subprocess
import sys
import time

build = sys.argv[1]
smoke = "--smoke" in sys.argv[2:]
jobs = [e for e in json.load(open(build + "/compile_commands.json"))
        if "bench_gen.p" in e["output"] and e["file"].endswith("_kernels.cpp")]
if smoke:
    t = time.time()
    running = [subprocess.Popen(e["command"], shell=True, cwd=e["directory"]) for e in jobs]
    if any(p.wait() != 0 for p in running):
        sys.exit("compile_time.py: a generated source failed to compile")
    print("compile both generated sources side by side (--smoke, not a measurement): %.2f s" % (time.time() - t))
    sys.exit(0)
total = 0.0
for e in jobs:
    t = time.time()
    subprocess.run(e["command"], shell=True, cwd=e["directory"], check=True)
    dt = time.time() - t
    total += dt
    print("compile %-40s %6.2f s" % (e["file"].split("/")[-1], dt))
print("compile both generated sources: %.2f s (budget 30 s)" % total)
