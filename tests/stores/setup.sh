#!/usr/bin/env bash
# What tests/test_stores.py needs beside the Python packages of the `dev` extra (moto[server], mfusepy), installed
# idempotently: fuse3 (libfuse and fusermount3, for the FUSE volumes; apt, when root) and Azurite (npm, into the
# project-local, git-ignored .cache/stores).  A store whose piece is missing skips with the reason, so this script
# never fails the build: it says what it could not install.
#
#   tests/stores/setup.sh [PYTHON]     # PYTHON: the lane's interpreter, for the dev packages (default: none)
set -u
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${1:-}"

if [ -n "$python" ]; then
  "$python" -c 'import moto.server, mfusepy' 2>/dev/null ||
    uv pip install -q --python "$python" 'moto[server]>=5' 'mfusepy>=1' ||
    echo "stores setup: could not install moto[server] and mfusepy into $python" >&2
fi

if ! ldconfig -p 2>/dev/null | grep -q 'libfuse3\.so' || ! command -v fusermount3 >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q fuse3 >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q fuse3 >/dev/null 2>&1; } ||
      echo "stores setup: apt-get install fuse3 failed: the FUSE volume tests will skip" >&2
  else
    echo "stores setup: fuse3 missing and not root: the FUSE volume tests will skip" >&2
  fi
fi

azurite="$repo/.cache/stores/node_modules/.bin/azurite"
if [ ! -x "$azurite" ]; then
  if command -v npm >/dev/null; then
    mkdir -p "$repo/.cache/stores"
    (cd "$repo/.cache/stores" && npm install --no-audit --no-fund --silent azurite@3 >/dev/null 2>&1) ||
      echo "stores setup: npm install azurite failed: the Azure tests will skip" >&2
  else
    echo "stores setup: npm missing: the Azure tests will skip" >&2
  fi
fi
exit 0
