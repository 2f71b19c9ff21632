#!/bin/bash
# Build runner-agent_<version>_<arch>.deb from this checkout into OUTDIR.
#
#   packaging/build-deb.sh [--version V] [--nocheck] [--lintian] OUTDIR
#
# The build runs `dpkg-buildpackage -us -uc -b` in a scratch copy of the tree, so the checkout
# gets no debian/runner-agent/, build/ or egg-info and several builds can run at once.
#   --version V  build as version V (PEP 440): rewrites __version__ and adds a changelog entry in
#                the copy only. For upgrade tests; releases bump agent/__init__.py and
#                debian/changelog in the checkout (debian/check-version enforces that).
#   --nocheck    skip the unit tests that build_virtualenv runs against the built venv.
#   --lintian    run lintian on the result; errors fail the build, warnings are printed.
# Prints the path of the .deb as the last line of stdout. Needs network access to PyPI.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="" nocheck="" run_lintian=""
while [[ $# -gt 1 ]]; do
    case "$1" in
        --version) version="$2"; shift 2 ;;
        --nocheck) nocheck=1; shift ;;
        --lintian) run_lintian=1; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
if [[ $# -ne 1 || "$1" == -* ]]; then
    echo "usage: $0 [--version V] [--nocheck] [--lintian] OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"

log() { printf '[build-deb] %s\n' "$*" >&2; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# World-traversable: unit tests run during the build switch to `nobody` and execute the
# staged venv's python from under this directory.
chmod 0755 "$tmp"
src="$tmp/runner-agent"
mkdir "$src"
# The whole tree (the unit tests run during the build may read any of it); caches, VCS data,
# build products and test container roots stay behind.
tar -C "$REPO" -c \
    --exclude=./.git --exclude=__pycache__ --exclude='*.pyc' --exclude=.mypy_cache \
    --exclude=.ruff_cache --exclude=.pytest_cache --exclude=.hypothesis --exclude='*.egg-info' \
    --exclude=./build --exclude=./dist --exclude=./tests/system/roots \
    --exclude=./debian/runner-agent --exclude=./debian/.debhelper --exclude=./debian/files \
    --exclude='./debian/*.substvars' --exclude='./debian/*.log' \
    --exclude=./debian/debhelper-build-stamp \
    . | tar -C "$src" -x

if [[ -n "$version" ]]; then
    sed -i "s/^__version__ = .*/__version__ = \"$version\"/" "$src/agent/__init__.py"
    deb_version="$("$src/debian/check-version" --root "$src" --print)"
    maintainer="$(dpkg-parsechangelog -l "$src/debian/changelog" -S Maintainer)"
    distribution="$(dpkg-parsechangelog -l "$src/debian/changelog" -S Distribution)"
    {
        printf 'runner-agent (%s) %s; urgency=medium\n\n' "$deb_version" "$distribution"
        printf '  * Rebuild as version %s (packaging/build-deb.sh --version).\n\n' "$version"
        printf ' -- %s  %s\n\n' "$maintainer" "$(date -R)"
        cat "$src/debian/changelog"
    } > "$tmp/changelog"
    mv "$tmp/changelog" "$src/debian/changelog"
    log "building as version $deb_version"
fi

export DEB_BUILD_OPTIONS="${DEB_BUILD_OPTIONS:-}${nocheck:+ nocheck}"
(cd "$src" && dpkg-buildpackage -us -uc -b) >&2

shopt -s nullglob
debs=("$tmp"/runner-agent_*.deb)
if [[ ${#debs[@]} -ne 1 ]]; then
    log "expected one runner-agent_*.deb, found: ${debs[*]:-none}"
    exit 1
fi
mv "${debs[0]}" "$tmp"/runner-agent_*.buildinfo "$tmp"/runner-agent_*.changes "$OUT/"
deb="$OUT/$(basename "${debs[0]}")"

if [[ -n "$run_lintian" ]]; then
    log "lintian $deb"
    lintian --fail-on error --display-info "$deb" >&2
fi
echo "$deb"
