#!/usr/bin/env bash
# Installs volfuse into a scratch prefix and builds tests/consumer against it three ways:
# through the installed volfuse.pc, as a meson subproject found through its wrap file, and
# through the installed CMake package; each generates kernels for net.arch with the generator
# it found and runs.  Usage: check.sh SRC SCRATCH
set -euo pipefail
src=$(cd "$1" && pwd); scratch=$2
rm -rf "$scratch"; mkdir -p "$scratch"
# -Dtorch=disabled: the torch package's install is tests/test_torch_install.py's.
# -Doptimization=0: only volfuse_gen is compiled here (the headers are installed as they are),
# and it generates without tuning; unoptimized it compiles several times faster.
meson setup "$scratch/lib" "$src" --prefix="$scratch/prefix" -Dtests=disabled -Dbenchmarks=disabled \
  -Doptimization=0 -Dtorch=disabled >/dev/null
meson install -C "$scratch/lib" --quiet
pc=$(dirname "$(find "$scratch/prefix" -name volfuse.pc)")
[ "$(PKG_CONFIG_PATH="$pc" pkg-config --variable=volfuse_gen volfuse)" = "$scratch/prefix/bin/volfuse_gen" ]
PKG_CONFIG_PATH="$pc" meson setup "$scratch/pc" "$src/tests/consumer" --wrap-mode=nofallback >/dev/null
meson test -C "$scratch/pc" --quiet
mkdir -p "$scratch/sub" && cp "$src"/tests/consumer/{meson.build,consumer.cpp,net.arch} "$scratch/sub/"
mkdir -p "$scratch/sub/subprojects" && ln -s "$src" "$scratch/sub/subprojects/volfuse"
cp "$src/tests/consumer/volfuse.wrap" "$scratch/sub/subprojects/"
meson setup "$scratch/sub/build" "$scratch/sub" -Dvolfuse:tests=disabled -Dvolfuse:benchmarks=disabled >/dev/null
meson test -C "$scratch/sub/build" --quiet
cmake -S "$src/tests/consumer" -B "$scratch/cmake" -DCMAKE_PREFIX_PATH="$scratch/prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$scratch/cmake" >/dev/null
"$scratch/cmake/consumer"
echo "installed headers + volfuse.pc, the subproject through its wrap, and the CMake package all build and run"
