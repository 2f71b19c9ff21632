#!/bin/bash
# Regenerate the pinned, hashed requirement files that packaging/build_virtualenv installs.
#   packaging/lock-requirements.sh            # re-resolve within pyproject's ranges, keep pins where possible
#   packaging/lock-requirements.sh --upgrade  # move every pin to the newest allowed version
# Needs network access to the index (default https://pypi.org/simple, or $RUNNER_AGENT_INDEX_URL).
# uv is installed into a throwaway venv; nothing here reads pip's or uv's user configuration.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INDEX_URL="${RUNNER_AGENT_INDEX_URL:-https://pypi.org/simple}"
PYTHON_VERSION="$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
UV_PIN="uv==0.13.9"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
/usr/bin/python3 -m venv "$tmp/uv"
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS='' "$tmp/uv/bin/pip" install -q --index-url "$INDEX_URL" "$UV_PIN"

compile() {  # compile OUTPUT INPUT...
    local out="$1"; shift
    "$tmp/uv/bin/uv" pip compile --no-config --quiet --generate-hashes "$@" \
        --index-url "$INDEX_URL" --python-version "$PYTHON_VERSION" --python-platform linux \
        --custom-compile-command "packaging/lock-requirements.sh" \
        --output-file "$out" ${UPGRADE:+--upgrade}
}

UPGRADE=""
[[ "${1:-}" == "--upgrade" ]] && UPGRADE=1

cd "$REPO"
# Runtime: exactly [project].dependencies of pyproject.toml.
compile packaging/requirements.txt pyproject.toml
# Build tools for the agent's own wheel and any sdist among the runtime pins.
compile packaging/build-requirements.txt packaging/build-requirements.in
# Test runner for the unit tests that build_virtualenv runs against the built venv.
compile packaging/test-requirements.txt packaging/test-requirements.in
# ansible-lint for packaging/dev.sh test (its own venv; not part of the package).
compile packaging/ansible-lint-requirements.txt packaging/ansible-lint-requirements.in
echo "updated packaging/{,build-,test-,ansible-lint-}requirements.txt" >&2
