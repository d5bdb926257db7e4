#!/usr/bin/env bash
# Fails unless every control-plane process started by the Rust tests (state dirs
# /tmp/kmm-rs-test-<pid>) is gone. Their watchdog stops them when the test
# binary exits, which takes a moment, so wait up to a deadline.
set -euo pipefail
deadline=$(( $(date +%s) + ${1:-30} ))
while pgrep -f "/kmm-rs-test-[0-9]" >/dev/null; do
  if (( $(date +%s) > deadline )); then
    echo "check-stopped.sh: test control-plane processes still running:" >&2
    pgrep -af "/kmm-rs-test-[0-9]" >&2 || true
    exit 1
  fi
  sleep 0.2
done
echo "check-stopped.sh: no test control-plane process left"
