#!/usr/bin/env bash
# Create .venv (if needed) and install requirements.txt into it. Idempotent: re-installs only when
# requirements.txt changed. Usage: source scripts/setup.sh   (or: bash scripts/setup.sh)
#
# Sourced from an interactive shell, it must not change that shell's options (no `set -e` left behind,
# which would close the terminal at the next failing command): the work runs in a subshell with strict
# options, and only PATH is changed in the calling shell.
_dn_detr_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_dn_detr_venv="${VENV:-$_dn_detr_root/.venv}"
if (
    set -euo pipefail
    PYTHON="${PYTHON:-python3}"
    if [ ! -x "$_dn_detr_venv/bin/python" ]; then
        echo "[setup] creating $_dn_detr_venv"
        "$PYTHON" -m venv "$_dn_detr_venv"
    fi
    STAMP="$_dn_detr_venv/.requirements.sha256"
    WANT="$(sha256sum "$_dn_detr_root/requirements.txt" | cut -d' ' -f1)"
    if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
        echo "[setup] installing requirements.txt (torch and torchvision come from local disk where available)"
        "$_dn_detr_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$_dn_detr_root/requirements.txt"
        echo "$WANT" > "$STAMP"
    fi
); then
    export PATH="$_dn_detr_venv/bin:$PATH"
    unset _dn_detr_root _dn_detr_venv
else
    echo "[setup] failed: see the messages above" >&2
    unset _dn_detr_root _dn_detr_venv
    # `return` when sourced, `exit` when run as a script.
    return 1 2>/dev/null || exit 1
fi
