#!/usr/bin/env bash
# Build spattn._C into the source tree and check it imports: CPU code always, CUDA code (for
# SPATTN_CUDA_ARCHS, default 80;90) when $PY's torch is a CUDA build, even without a GPU, so the
# GPU code cannot silently rot. A failed build fails this script.
#
#   PY=/path/to/venv/bin/python bash .ci/build_ext.sh
#
# Needs torch already installed in $PY's environment; installs ninja/setuptools there if missing.
set -euo pipefail
PY=${PY:-python}
cd "$(dirname "$0")/.."

"$PY" -c "import ninja, setuptools, wheel" 2>/dev/null || "$PY" -m pip install -q ninja setuptools wheel
cuda=$("$PY" -c "import torch; print(1 if torch.version.cuda else 0)")
export SPATTN_REQUIRE_EXT=1
[ "$cuda" = 1 ] && export SPATTN_FORCE_CUDA=1

log=$(mktemp)
t0=$(date +%s)
if ! "$PY" -m pip install -v --no-build-isolation --no-deps -e . >"$log" 2>&1; then
    grep -E "error|Error|FAILED" "$log" | head -40 || true
    tail -40 "$log"
    echo "build_ext.sh: building spattn._C failed (full log: $log)"
    exit 1
fi
grep "spattn setup:" "$log" || true
echo "build_ext.sh: spattn._C built in $(( $(date +%s) - t0 ))s (torch CUDA build: $cuda)"

"$PY" - "$cuda" <<'PYEOF'
import sys

from spattn import _ext

mod = _ext.load(required=True)  # raises with the rebuild command if missing or stale
want_cuda = sys.argv[1] == "1"
assert mod.cuda_compiled() == want_cuda, f"spattn._C cuda_compiled()={mod.cuda_compiled()}, expected {want_cuda}"
print(f"build_ext.sh: import ok ({mod.__file__}, cuda_compiled={mod.cuda_compiled()}, source {mod.SOURCE_HASH})")
PYEOF
