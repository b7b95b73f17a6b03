#!/usr/bin/env python3
"""Checks gen/volfuse_gen on good and bad architecture descriptions: good input writes both
files; every bad input fails with FILE:LINE:COLUMN: error: <what> and writes nothing.
Usage: check_gen.py VOLFUSE_GEN"""
import os
import subprocess
import sys
import tempfile

GEN = sys.argv[1]

BAD = [
    ("frobnicate x in=1\n", "1:1: error: unknown op 'frobnicate': expected conv, conv_bn_relu, batch_norm or bn_relu"),
    ("conv\n", "1:5: error: expected a layer name after 'conv'"),
    ("conv 1x in=1 out=2 kernel=3\n", "1:6: error: layer name '1x' is not an identifier (letters, digits, _)"),
    ("conv a in=1 out=2\n", "1:18: error: missing key 'kernel' for conv"),
    ("conv a in=1 out=2 kernel=3 in=4\n", "1:28: error: duplicate key 'in' (first at column 8)"),
    ("conv a in=1 out=2 kernel=3 colour=red\n",
     "1:28: error: unknown key 'colour' for conv: expected one of dilation, in, input, kernel, layout, out, padding, stride"),
    ("conv a in=0 out=2 kernel=3\n", "1:11: error: in must be a positive integer, got '0'"),
    ("conv a in=1 out=2 kernel=3,3\n",
     "1:26: error: kernel must be a positive integer or three of them as d,h,w, got '3,3'"),
    ("conv a in=1 out=2 kernel=3 stride=0\n",
     "1:35: error: stride must be a positive integer or three of them as d,h,w, got '0'"),
    ("conv a in=1 out=2 kernel=3 padding=-1\n",
     "1:36: error: padding must be a non-negative integer or three of them as d,h,w, got '-1'"),
    ("conv a in=1 out=2 kernel=3 layout=nchw\n", "1:35: error: layout must be ncdhw or ndhwc, got 'nchw'"),
    ("batch_norm b\n", "1:13: error: missing key 'channels' for batch_norm"),
    ("conv a in=1 out=2 kernel=3\n# ok\nbn_relu a channels=2\n", "3:9: error: duplicate layer name 'a' (first on line 1)"),
    ("conv a in=1 out=2 kernel=3 oops\n", "1:28: error: expected key=value, got 'oops'"),
    ("# nothing\n\n", "1:1: error: no layers"),
]

failures = 0
with tempfile.TemporaryDirectory() as d:
    cpp, hpp = os.path.join(d, "out.cpp"), os.path.join(d, "out.hpp")
    for text, expected in BAD:
        arch = os.path.join(d, "bad.arch")
        with open(arch, "w") as f:
            f.write(text)
        r = subprocess.run([GEN, arch, cpp, hpp], capture_output=True, text=True)
        want = arch + ":" + expected
        if r.returncode == 0 or not r.stderr.startswith(want) or os.path.exists(cpp) or os.path.exists(hpp):
            failures += 1
            print("FAIL %r\n  want: %s\n  got (%d): %s" % (text, want, r.returncode, r.stderr.strip()))
    good = os.path.join(d, "good.arch")
    with open(good, "w") as f:
        f.write("conv_bn_relu c1 in=3 out=8 kernel=1,3,3 stride=1,2,2 padding=0,1,1 layout=ndhwc  # ok\n"
                "bn_relu b1 channels=8\n")
    r = subprocess.run([GEN, good, cpp, hpp, "--namespace", "net"], capture_output=True, text=True)
    src = open(cpp).read() if os.path.exists(cpp) else ""
    hdr = open(hpp).read() if os.path.exists(hpp) else ""
    if r.returncode != 0 or "using c1_t = volfuse::ConvBnReLU3d<c1_spec, 8>;" not in hdr \
            or "using b1_t = volfuse::BatchNorm3d<8>;" not in hdr \
            or '"good.arch:1 (c1)"' not in src or ".stride = {1, 2, 2}" not in hdr:
        failures += 1
        print("FAIL good input:", r.returncode, r.stderr)
    checks = 1
    # Command line: --help succeeds; bad options say what is wrong (exit 2) and write nothing.
    for args, code, text in [
            (["--help"], 0, "usage: volfuse_gen ARCH OUT.cpp OUT.hpp"),
            ([good, cpp + "2", hpp + "2", "--namespace", "9lives"], 2,
             "volfuse_gen: error: --namespace '9lives' is not an identifier"),
            ([good, cpp + "2", hpp + "2", "--namespace"], 2, "volfuse_gen: error: --namespace needs a C++ namespace name"),
            ([good, cpp + "2", hpp + "2", "--namespace", "dup"], 2,
             "volfuse_gen: error: --namespace 'dup' is a name the C library or POSIX declares in the global namespace"),
            ([good, cpp + "2", hpp + "2", "--namespace", "class"], 2,
             "volfuse_gen: error: --namespace 'class' is a C++ keyword"),
            ([good, cpp + "2", hpp + "2", "--namespace", "_Net"], 2,
             "volfuse_gen: error: --namespace '_Net' is reserved to the implementation"),
            ([good, cpp + "2", hpp + "2", "--namespace", "std"], 2,
             "volfuse_gen: error: --namespace 'std' is the name of a namespace"),
            ([good, cpp + "2", hpp + "2", "--frob"], 2, "volfuse_gen: error: unknown option '--frob'"),
            ([good, cpp + "2"], 2, "volfuse_gen: error: expected ARCH OUT.cpp OUT.hpp, got 2 file arguments"),
            ([good, cpp + "2", hpp + "2", "--tune", "--tune-batch", "0"], 2,
             "volfuse_gen: error: --tune-batch must be a positive integer, got '0'")]:
        checks += 1
        r = subprocess.run([GEN] + args, capture_output=True, text=True)
        out = r.stdout if code == 0 else r.stderr
        if r.returncode != code or not out.startswith(text) or os.path.exists(cpp + "2"):
            failures += 1
            print("FAIL %s\n  want (%d): %s\n  got (%d): %s" % (args, code, text, r.returncode, out.strip()))
    # --tune: every conv layer gets a measured schedule in its registration; input= is accepted.
    checks += 1
    with open(good, "w") as f:
        f.write("conv_bn_relu c1 in=3 out=8 kernel=3 padding=1 layout=ndhwc input=2,5,6\n"
                "conv c2 in=8 out=20 kernel=1 input=1,1,9\nbn_relu b1 channels=8\n")
    r = subprocess.run([GEN, good, cpp, hpp, "--tune"], capture_output=True, text=True)
    src = open(cpp).read()
    if r.returncode != 0 or src.count("e.schedule = volfuse::conv_schedule{.tile_vectors = ") != 2 \
            or '.origin = "tuned by volfuse_gen --tune on ' not in src or "c1 [1, 3, 2, 5, 6]" not in r.stderr:
        failures += 1
        print("FAIL --tune:", r.returncode, r.stderr[-2000:])
print("%d passed, %d failed" % (len(BAD) + checks - failures, failures))
sys.exit(1 if failures else 0)
