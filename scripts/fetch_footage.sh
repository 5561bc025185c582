#!/usr/bin/env bash
# Fetches real recordings that nobody here made, for the benchmarks and tests that need real footage: the
# sample videos of Debian's opencv-doc package (vtest.avi, Megamind.avi, tree.avi, box.mp4, cup.mp4), unpacked
# from the package without installing it. They are never committed (the folder is in .gitignore).
# Usage: bash scripts/fetch_footage.sh [DIR]   (default: .cache/footage; MIXMALMM_FOOTAGE overrides it)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-${MIXMALMM_FOOTAGE:-.cache/footage}}
want="vtest.avi Megamind.avi tree.avi box.mp4 cup.mp4"
missing=0
for f in $want; do [ -s "$dir/$f" ] || missing=1; done
if [ "$missing" = 0 ]; then
    echo "footage: already in $dir"
    exit 0
fi
mkdir -p "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
# apt-get download needs the package lists; a fresh machine may have none yet.
( cd "$work" && apt-get download opencv-doc >/dev/null 2>&1 ) || {
    $SUDO apt-get update -qq
    ( cd "$work" && apt-get download opencv-doc >/dev/null 2>&1 )
}
dpkg -x "$work"/opencv-doc_*.deb "$work/x"
doc="$work/x/usr/share/doc/opencv-doc"
cp "$doc"/examples/data/{vtest.avi,Megamind.avi,tree.avi} "$dir/"
for f in box cup; do gunzip -c "$doc/opencv4/html/$f.mp4.gz" > "$dir/$f.mp4"; done
echo "footage: $want in $dir"
