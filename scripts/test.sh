#!/usr/bin/env bash
# Set up the environment and run the test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
# pytest exits with 5 when no test was collected: that fails this script too.
exec python -m pytest tests -q --durations=15 "$@"
