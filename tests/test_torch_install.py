"""`meson install` gives a working `import volfuse`: installs the configured build into a
staging directory (DESTDIR) and imports the package from there, in a fresh interpreter that
cannot see the build tree, checking that the operators came from the installed library."""
import os
import pathlib
import subprocess
import sys
import tempfile

build_dir = sys.argv[1]
with tempfile.TemporaryDirectory() as stage:
    subprocess.run(["meson", "install", "-C", build_dir, "--no-rebuild", "--quiet", "--destdir", stage],
                   check=True, stdout=subprocess.DEVNULL)
    inits = [p for p in pathlib.Path(stage).rglob("volfuse/__init__.py")]
    assert len(inits) == 1, "installed package not found: " + str(inits)
    site = str(inits[0].parent.parent)
    assert (inits[0].parent / "_volfuse_ops.so").exists(), "operators' library not installed next to the package"
    code = (
        "import torch, volfuse\n"
        "assert volfuse.__file__.startswith(%r), volfuse.__file__\n"
        "assert volfuse.ops_library in torch.ops.loaded_libraries\n"
        "x = torch.randn(2, 3, 4, 4, 4)\n"
        "m, r = volfuse.BatchNorm3d(3), torch.nn.BatchNorm3d(3)\n"
        "torch.testing.assert_close(m(x), r(x), rtol=1e-5, atol=1e-5)\n"
        "print('installed volfuse ok')\n" % site)
    env = dict(os.environ, PYTHONPATH=site)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=stage)
