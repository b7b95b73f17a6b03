#!/usr/bin/env bash
# Installs volfuse into a scratch prefix and builds tests/consumer against it twice:
# through the installed volfuse.pc, and as a meson subproject.  Usage: check.sh SRC SCRATCH
set -euo pipefail
src=$(cd "$1" && pwd); scratch=$2
rm -rf "$scratch"; mkdir -p "$scratch"
meson setup "$scratch/lib" "$src" --prefix="$scratch/prefix" -Dtests=disabled -Dbenchmarks=disabled >/dev/null
meson install -C "$scratch/lib" --quiet
pc=$(dirname "$(find "$scratch/prefix" -name volfuse.pc)")
PKG_CONFIG_PATH="$pc" meson setup "$scratch/pc" "$src/tests/consumer" --wrap-mode=nofallback >/dev/null
meson test -C "$scratch/pc" --quiet
cp -r "$src/tests/consumer" "$scratch/sub"
mkdir -p "$scratch/sub/subprojects" && ln -s "$src" "$scratch/sub/subprojects/volfuse"
meson setup "$scratch/sub/build" "$scratch/sub" --wrap-mode=forcefallback >/dev/null
meson test -C "$scratch/sub/build" --quiet
echo "installed headers + volfuse.pc and the subproject both build and run"
