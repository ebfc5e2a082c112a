#!/usr/bin/env bash
# The TPU path of train.py (--device=xla), tested for real on XLA's CPU backend.
#
#   tests/xla/run.sh          # from anywhere; "xla: N passed, M failed", then "notebook: ..."
#
# torch_xla 2.9.0 needs torch 2.9.0 (a CUDA build, ~7 GB), so it lives in its own venv,
# .venv-xla at the repository root (override with XLA_VENV), made here if missing (~2 min).
# Then it executes colab_tpu.ipynb (tests/xla/run_notebook.py).
# Exit status: 0 all passed, or skipped because pip cannot reach torch_xla (no network, or
# no wheel for this platform); anything else is a failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${XLA_VENV:-.venv-xla}
PACKAGES=(torch==2.9.0 torch_xla==2.9.0 numpy)  # what train.py, gpt.py and the check import

if ! "$VENV/bin/python" -c "import torch_xla, numpy" 2>/dev/null; then
    echo "xla: making $VENV with ${PACKAGES[*]}"
    start=$SECONDS
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    if ! "$VENV/bin/python" -m pip install -q "${PACKAGES[@]}"; then
        # skip only when the package cannot be had at all; a failed install of a reachable one fails
        if ! "$VENV/bin/python" -m pip index versions torch_xla 2>/dev/null | grep -q "2\.9\.0"; then
            echo "xla: SKIPPED: pip cannot reach torch_xla==2.9.0 (no network or no wheel for this platform)"
            rm -rf "$VENV"
            exit 0
        fi
        echo "xla: pip install failed although torch_xla==2.9.0 is reachable"
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
