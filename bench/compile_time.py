#!/usr/bin/env python3
"""Compile time of the sources volfuse_gen generated for the seed networks, with the
benchmark build's own flags (-O3 -march=native), one after the other (issue 5's budget: 30 s
for both).  Usage: compile_time.py BUILD_DIR (a configured benchmark build, already built)."""
import json
import subprocess
import sys
import time

build = sys.argv[1]
total = 0.0
for e in json.load(open(build + "/compile_commands.json")):
    if "bench_gen.p" in e["output"] and e["file"].endswith("_kernels.cpp"):
        t = time.time()
        subprocess.run(e["command"], shell=True, cwd=e["directory"], check=True)
        dt = time.time() - t
        total += dt
        print("compile %-40s %6.2f s" % (e["file"].split("/")[-1], dt))
print("compile both generated sources: %.2f s (budget 30 s)" % total)
