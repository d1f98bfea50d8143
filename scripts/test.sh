#!/usr/bin/env bash
# Run the test suite from a fresh Debian 12 machine (as root): set-up (scripts/setup.sh), then
# pytest with any extra arguments ("$@"). Exits with pytest's status.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
exec "$PYTHON" -m pytest "$@"
