#!/bin/bash
# Developer entry point. Two commands matter (see README):
#   packaging/dev.sh demo   - local SQLite Prefect server + demo deployment + agent -> COMPLETED
#   packaging/dev.sh test   - ruff (check, format), mypy --strict, ansible-lint, then the pytest suite
# Both install what they need first (apt packages, cached venvs), so they work on a fresh Debian 12.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${RUNNER_AGENT_TEST_CACHE:-/var/cache/runner-agent-tests}"
PREFECT_PIN="prefect==3.8.8"
FASTAPI_PIN="fastapi==0.150.0"
# Prefect 3.8.8's scheduler service fails on SQLAlchemy 2.1 (no schedule ever makes a run).
SQLALCHEMY_PIN="sqlalchemy<2.1"
# The newest Prefect 3 release without the engine's control channel
# (prefect/_internal/control_listener.py arrived in 3.6.27): the older-engine tests run flows with it.
PREFECT_OLD_PIN="prefect==3.6.26"
# Debian's interpreter, not pyenv's: the venvs are also used inside the booted test container.
BASE_PYTHON="/usr/bin/python3"
APT_PACKAGES=(python3 python3-venv python3-dev git systemd-container debootstrap build-essential
              debhelper devscripts lintian fakeroot ansible-core psmisc iproute2 procps)

log() { printf '[dev.sh] %s\n' "$*" >&2; }

need_root() {
    if [[ $EUID -ne 0 ]]; then
        log "run as root (sudo): the test bed boots systemd containers and manages cgroups"
        exit 1
    fi
}

install_apt() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        log "apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# A venv is rebuilt when the hash of what defines it changes; the key is part of its path.
build_venv() {  # build_venv DIR PIP_ARGS...
    local dir="$1"; shift
    if [[ -x "$dir/bin/python" && -f "$dir/.complete" ]]; then
        return 0
    fi
    log "building venv $dir"
    rm -rf "$dir"
    "$BASE_PYTHON" -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
    touch "$dir/.complete"
}

prefect_venv() {
    local key
    key="$(printf '%s %s %s %s' "$PREFECT_PIN" "$FASTAPI_PIN" "$SQLALCHEMY_PIN" "$("$BASE_PYTHON" -V)" | sha256sum | cut -c1-12)"
    PREFECT_VENV="$CACHE/prefect-$key"
    build_venv "$PREFECT_VENV" "$PREFECT_PIN" "$FASTAPI_PIN" "$SQLALCHEMY_PIN"
    export RUNNER_AGENT_TEST_PREFECT_VENV="$PREFECT_VENV"
}

prefect_old_venv() {
    local key
    key="$(printf '%s %s %s' "$PREFECT_OLD_PIN" "$FASTAPI_PIN" "$("$BASE_PYTHON" -V)" | sha256sum | cut -c1-12)"
    PREFECT_OLD_VENV="$CACHE/prefect-old-$key"
    build_venv "$PREFECT_OLD_VENV" "$PREFECT_OLD_PIN" "$FASTAPI_PIN"
    export RUNNER_AGENT_TEST_PREFECT_OLD_VENV="$PREFECT_OLD_VENV"
}

agent_venv() {
    local key
    # Keyed on the dependency lists only, so unrelated pyproject edits keep the venv.
    key="$("$BASE_PYTHON" -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]; print(sys.version, p["dependencies"], p["optional-dependencies"])' "$REPO/pyproject.toml" | sha256sum | cut -c1-12)"
    AGENT_VENV="$CACHE/agent-$key"
    build_venv "$AGENT_VENV" -e "$REPO[test]"
    # The editable install points at this checkout; a fresh clone elsewhere re-points it.
    # From / and isolated, so a checkout in the current directory cannot answer for the venv.
    if ! (cd / && "$AGENT_VENV/bin/python" -I -c "import agent, sys; sys.exit(not agent.__file__.startswith('$REPO/'))") 2>/dev/null; then
        "$AGENT_VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e "$REPO"
    fi
    export RUNNER_AGENT_TEST_AGENT_VENV="$AGENT_VENV"
    # Venvs of older dependency sets are dead weight (about 150 MB each); keep the cache lean.
    find "$CACHE" -maxdepth 1 -name 'agent-*' -type d ! -path "$AGENT_VENV" -mtime +1 \
        -exec rm -rf {} + 2>/dev/null || true
}

# ansible-lint and the ansible-core it runs on, from a hashed lock (packaging/lock-requirements.sh).
# Its own venv: it would otherwise pin jinja2, pyyaml and packaging under the agent's tests.
ansible_lint_venv() {
    local lock="$REPO/packaging/ansible-lint-requirements.txt" key
    key="$( (cat "$lock"; "$BASE_PYTHON" -V) | sha256sum | cut -c1-12)"
    ANSIBLE_LINT_VENV="$CACHE/ansible-lint-$key"
    build_venv "$ANSIBLE_LINT_VENV" --require-hashes -r "$lock"
    find "$CACHE" -maxdepth 1 -name 'ansible-lint-*' -type d ! -path "$ANSIBLE_LINT_VENV" -mtime +1 \
        -exec rm -rf {} + 2>/dev/null || true
}

setup() {
    need_root
    install_apt
    mkdir -p "$CACHE"
    prefect_venv
    prefect_old_venv
    agent_venv
    ansible_lint_venv
}

cmd_test() {
    setup
    cd "$REPO"
    log "ruff check"
    "$AGENT_VENV/bin/ruff" check .
    log "ruff format --check"
    "$AGENT_VENV/bin/ruff" format --check .
    log "mypy --strict agent tests"
    "$AGENT_VENV/bin/mypy" --strict agent tests
    log "ansible-lint (production profile, packaging/ansible/.ansible-lint)"
    # PATH: its syntax check runs ansible-playbook, which must be the venv's, not Debian's.
    (cd packaging/ansible &&
        PATH="$ANSIBLE_LINT_VENV/bin:$PATH" "$ANSIBLE_LINT_VENV/bin/ansible-lint" --profile production --nocolor)
    log "pytest"
    "$AGENT_VENV/bin/python" -m pytest "$@"
}

cmd_demo() {
    setup
    exec "$AGENT_VENV/bin/python" "$REPO/packaging/demo.py" --prefect-venv "$PREFECT_VENV" "$@"
}

case "${1:-}" in
    test) shift; cmd_test "$@" ;;
    demo) shift; cmd_demo "$@" ;;
    setup) setup; echo "PREFECT_VENV=$PREFECT_VENV"; echo "AGENT_VENV=$AGENT_VENV"
           echo "ANSIBLE_LINT_VENV=$ANSIBLE_LINT_VENV" ;;
    *) echo "usage: $0 {demo|test [pytest args]|setup}" >&2; exit 2 ;;
esac
