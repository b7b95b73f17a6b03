#!/usr/bin/env python3
"""The ```cpp blocks of README.md and docs/ are complete programs; the tests compile and run each
one exactly as written (tests/meson.build).

  extract_examples.py --list MD...     the examples' names, one per line (<file>_<n>)
  extract_examples.py OUTDIR MD...     writes OUTDIR/<file>_<n>.cpp, each block byte for byte
"""
import os
import re
import sys


def examples(paths):
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        text = open(path, encoding="utf-8").read()
        for i, m in enumerate(re.finditer(r"^```cpp\n(.*?)^```", text, re.S | re.M)):
            yield "%s_%d" % (stem, i + 1), m.group(1)


if sys.argv[1] == "--list":
    for name, _ in examples(sys.argv[2:]):
        print(name)
else:
    for name, code in examples(sys.argv[2:]):
        with open(os.path.join(sys.argv[1], name + ".cpp"), "w", encoding="utf-8") as f:
            f.write(code)
