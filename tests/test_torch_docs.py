"""Runs every ```python block of the given markdown files as written (each in a fresh
namespace), so that the Python examples of the docs stay true."""
import re
import sys

blocks = 0
for path in sys.argv[1:]:
    text = open(path, encoding="utf-8").read()
    for i, code in enumerate(re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)):
        print("running %s, python block %d" % (path, i + 1))
        exec(compile(code, "%s[python %d]" % (path, i + 1), "exec"), {"__name__": "__doc_example__"})
        blocks += 1
assert blocks > 0, "no python blocks found"
print("%d blocks ran" % blocks)
