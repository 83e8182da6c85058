#!/usr/bin/env bash
# Builds the Python environment for the scripts in bench/peer (PyTorch, torchvision, OpenCV,
# scikit-learn, safetensors; CPU use only).
#
#   bash bench/peer/setup.sh
#
# Where: $PEER_VENV, by default $HOME/.cache/derm-peer-venv (where `cargo xtask bench --peer`
# looks unless given --peer-venv). Running it again upgrades the packages in place.
#
# PEER_TORCH_INDEX=https://download.pytorch.org/whl/cpu installs the CPU-only torch wheels
# (about 1 GB instead of about 6 GB); the default is plain PyPI, whose torch wheel bundles CUDA
# but runs on the CPU all the same (that is what bench/peer/README.md's numbers used).
set -euo pipefail

venv="${PEER_VENV:-$HOME/.cache/derm-peer-venv}"
python="${PYTHON:-python3}"

echo "peer environment: $venv"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip

if [ -n "${PEER_TORCH_INDEX:-}" ]; then
    "${pip[@]}" install --quiet --index-url "$PEER_TORCH_INDEX" torch torchvision
fi
"${pip[@]}" install --quiet torch torchvision opencv-python-headless numpy scipy \
    scikit-image scikit-learn safetensors

"$venv/bin/python" - <<'PY'
import cv2, numpy, safetensors, sklearn, torch, torchvision
print(f"torch {torch.__version__} (threads {torch.get_num_threads()}), torchvision {torchvision.__version__}, "
      f"opencv {cv2.__version__}, numpy {numpy.__version__}, scikit-learn {sklearn.__version__}, "
      f"safetensors {safetensors.__version__}")
PY
