#!/usr/bin/env bash
# The TPU path of train.py (--device=xla), tested for real on XLA's CPU backend.
#
#   tests/xla/run.sh          # from anywhere; "xla: N passed, M failed", then "notebook: ..."
#
# torch_xla 2.9.0 needs torch 2.9.0 (a CUDA build, ~7 GB), so it lives in its own venv,
# .venv-xla at the repository root (override with XLA_VENV), made here if missing (~2 min).
# Then it executes colab_tpu.ipynb (tests/xla/run_notebook.py).
# Exit status: 0 all passed, or skipped because pip finds no torch_xla (no network, or no
# wheel for this platform); anything else, a failed install included, is a failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${XLA_VENV:-.venv-xla}
PACKAGES=(torch==2.9.0 torch_xla==2.9.0 numpy)  # what train.py, gpt.py and the check import

if ! "$VENV/bin/python" -c "import torch_xla, numpy" 2>/dev/null; then
    echo "xla: making $VENV with ${PACKAGES[*]}"
    start=$SECONDS
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    pip_log=$(mktemp)
    if ! "$VENV/bin/python" -m pip install -q "${PACKAGES[@]}" 2>&1 | tee "$pip_log"; then
        rm -rf "$VENV"
        # skip only when pip finds no such package (no network, or no wheel for this platform);
        # any other failure of the install (a full disk, a broken wheel) fails the lane
        if grep -q "No matching distribution found" "$pip_log"; then
            echo "xla: SKIPPED: pip cannot find ${PACKAGES[*]} here (no network or no wheel for this platform)"
            exit 0
        fi
        echo "xla: pip install failed: $(grep -m1 "ERROR" "$pip_log" || tail -1 "$pip_log")"
        if grep -q "No space left on device" "$pip_log"; then  # the venv and pip's downloads take ~10 GB at once
            echo "xla: $(df -h --output=avail "$PWD" | tail -1 | tr -d ' ') free here; the lane needs ~10 GB: free some disk (old clones' .venv-xla, /tmp/pip-unpack-*) and rerun tests/xla/run.sh"
        fi
        exit 1
    fi
    echo "xla: venv made in $((SECONDS - start)) s"
fi

# its own inductor cache: this venv's torch 2.9 must not load kernels another torch (or a
# concurrent run) left in the shared /tmp/torchinductor_<user> ("file too short" .so files)
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d -t xla-lane-inductor-XXXXXX)}"
PJRT_DEVICE=CPU "$VENV/bin/python" tests/xla/check_xla.py

# the Colab notebook, executed top to bottom on XLA's CPU backend (its install cell adds what
# requirements.txt lists to the venv the first time, as it would on Colab)
if ! "$VENV/bin/python" -c "import nbclient, ipykernel" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q nbclient ipykernel
fi
"$VENV/bin/python" tests/xla/run_notebook.py
