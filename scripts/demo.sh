#!/usr/bin/env bash
# Run the demo from a fresh Debian 12 machine (as root): set-up (scripts/setup.sh), then
# `python -m dask_lazycluster.demo` with any extra arguments ("$@").
set -euo pipefail
source "$(dirname "$0")/setup.sh"
exec "$PYTHON" -m dask_lazycluster.demo "$@"
