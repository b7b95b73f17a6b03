#!/usr/bin/env python3
"""Counts test cases over meson build directories: each Catch2 test writes an XML report
(OverallResultsCases); a test that crashed or wrote no report counts as one failed case,
and a non-Catch test (a script) as one case; `--steps FILE` adds CI's script steps, one line
each ('ok NAME' or 'fail NAME').  Prints 'N passed, N failed'."""
import json
import os
import sys
import xml.etree.ElementTree as ET

passed = failed = 0
args = sys.argv[1:]
if args[:1] == ["--steps"]:
    for line in open(args[1]):
        if line.strip():
            ok = line.startswith("ok ")
            passed += ok
            failed += not ok
    args = args[2:]
for build in args:
    log = os.path.join(build, "meson-logs", "testlog.json")
    if not os.path.exists(log):
        print("%s: no test log" % build)
        failed += 1
        continue
    for line in open(log):
        t = json.loads(line)
        ok = t["result"] in ("OK", "EXPECTEDFAIL", "SKIP")
        xml_out = None
        cmd = t.get("command", [])
        if "--out" in cmd:
            xml_out = cmd[cmd.index("--out") + 1]
        cases = None
        if xml_out and os.path.exists(xml_out):
            try:
                r = ET.parse(xml_out).getroot().find("OverallResultsCases")
                cases = (int(r.get("successes")), int(r.get("failures")) + int(r.get("expectedFailures", 0)))
            except Exception:
                cases = None
        if cases is None:
            cases = (1, 0) if ok else (0, 1)
        elif not ok and cases[1] == 0:
            cases = (cases[0], 1)  # the process failed although every case passed (e.g. a sanitizer at exit)
        passed += cases[0]
        failed += cases[1]
print("%d passed, %d failed" % (passed, failed))
sys.exit(1 if failed else 0)
