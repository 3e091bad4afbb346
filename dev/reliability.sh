#!/usr/bin/env bash
# The reliability suite (issue: "green on a fresh machine, a sandbox that holds, a server that sheds load"),
# as one command. Each part prints its own summary and exits non-zero on a failure; this script runs all
# three, then says which failed.
#   bash dev/reliability.sh          # ~5-8 minutes on 2 cores
# Parts:
#   python -m scripts.sandbox_escapes   escape attempts against nanochat/execution.py (held / ESCAPED each)
#   python -m scripts.bad_cli           >= 60 bad command lines: one clear error each, no traceback
#   python -m scripts.web_fuzz          >= 1,000 bounded requests to chat_web on 127.0.0.1: counts per status,
#                                       no 5xx, no hang, an abandoned request frees the worker, a 300 MB POST
# Their small deterministic subsets run in the test suite (tests/test_execution.py, tests/test_cli_checks.py,
# tests/test_chat_web_guard.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
failed=()
for part in sandbox_escapes bad_cli web_fuzz; do
  echo "=== $part"
  $PY -m "scripts.$part" || failed+=("$part")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "dev/reliability.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "dev/reliability.sh: all three parts passed"
