#!/usr/bin/env bash
# Refreshes constraints/ci.txt: a new venv WITHOUT the constraints (the newest releases, no pip cache),
# the README's test command, and, only if it passes, the freeze of that venv (torch and this package left out).
#   bash constraints/refresh.sh [python]      (about as long as the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
venv=$(mktemp -d)/venv
"$python" -m venv "$venv"
. "$venv/bin/activate"
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,extract]"
python -m pytest -q tests/
{ sed -n '/^# /p' constraints/ci.txt; pip freeze --exclude-editable | grep -v -i -E '^(torch|mcncl[-_]fast)=='; } \
  > constraints/ci.txt.new
mv constraints/ci.txt.new constraints/ci.txt
echo "constraints/ci.txt refreshed from $(python -c 'import sys; print(sys.version.split()[0])') in $venv"
