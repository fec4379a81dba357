#!/usr/bin/env bash
# Installs rift-ray on one cluster node; cluster.yaml's setup_commands run it on every node.
#   1. a venv, ~/rift-venv ($RIFT_VENV), reused when it exists;
#   2. torch and torchvision ($RIFT_TORCH) in the CUDA build that this node's NVIDIA driver
#      supports: the newest of cu130 / cu128 / cu126 not above the CUDA version nvidia-smi
#      reports, the CPU build where there is no driver ($RIFT_TORCH_INDEX: another wheel index
#      URL, or "pypi" for the default index);
#   3. the project from this tree (pip install -e), so every node runs the code you synced;
#   4. the venv activated in ~/.bashrc, where `ray exec` and the Ray processes find it.
# A node whose GPU torch cannot use stops here with the reason (driver vs CUDA build), instead
# of a sweep that would compute on its CPU.
set -euo pipefail
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RIFT_VENV:-$HOME/rift-venv}"
PY="${PYTHON:-python3}"
TORCH="${RIFT_TORCH:-torch==2.9.1 torchvision==0.24.1}"
INDEX="${RIFT_TORCH_INDEX:-}"
say() { echo "setup-node: $*" >&2; }

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
if [ -z "$INDEX" ]; then
    if [ "$gpu" = 1 ]; then
        cuda="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -1)"
        read -r major minor <<<"${cuda:-0 0}"
        v=$((major * 10 + minor))
        if [ "$v" -ge 130 ]; then tag=cu130
        elif [ "$v" -ge 128 ]; then tag=cu128
        elif [ "$v" -ge 126 ]; then tag=cu126
        else
            say "the NVIDIA driver here supports CUDA ${major}.${minor}; $TORCH needs a driver for CUDA 12.6 or newer (update the AMI, or set RIFT_TORCH / RIFT_TORCH_INDEX)"
            exit 1
        fi
    else
        tag=cpu
    fi
    INDEX="https://download.pytorch.org/whl/$tag"
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC2086  # $TORCH is a list of requirements
if [ "$INDEX" = pypi ]; then
    "$VENV/bin/pip" install -q $TORCH
else
    "$VENV/bin/pip" install -q $TORCH --index-url "$INDEX"
fi
"$VENV/bin/pip" install -q -e "$SRC"

"$VENV/bin/python" - "$gpu" <<'PY'
import sys

import torch

gpu = sys.argv[1] == "1"
usable = torch.cuda.is_available()
where = torch.cuda.get_device_name(0) if usable else "no usable GPU"
print(f"setup-node: torch {torch.__version__} (CUDA build {torch.version.cuda}), {where}", file=sys.stderr)
if gpu and not usable:
    sys.exit("setup-node: this node has an NVIDIA GPU but torch cannot use it (driver vs the CUDA build above)")
PY
line="source $VENV/bin/activate"
grep -qxF "$line" "$HOME/.bashrc" 2>/dev/null || echo "$line" >> "$HOME/.bashrc"
say "rift-ray $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("rift-ray"))') installed in $VENV from $SRC"
