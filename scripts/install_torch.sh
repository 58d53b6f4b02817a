#!/bin/sh
# Install torch==VERSION into the environment of PYTHON, the right build for this machine:
#   * $TORCH_INDEX_URL set            -> from that index (e.g. https://download.pytorch.org/whl/cu126)
#   * an NVIDIA GPU visible           -> PyPI's default build (a CUDA build on Linux)
#   * macOS / Windows                 -> PyPI's default build (CPU, MPS on Apple silicon)
#   * Linux without a GPU             -> the CPU build: taken from the configured package sources when they already
#                                        resolve torch==VERSION to a +cpu wheel (a local wheel directory, a mirror),
#                                        else from the CPU wheel index https://download.pytorch.org/whl/cpu
#                                        (PyPI's Linux wheel is a CUDA build of several GB).
# Usage: sh scripts/install_torch.sh PYTHON VERSION
set -eu
py=$1
ver=$2
pipi() { "$py" -m pip install -q "$@"; }
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "torch $ver from $TORCH_INDEX_URL"
    pipi "torch==$ver" --index-url "$TORCH_INDEX_URL"
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "NVIDIA GPU found: torch $ver, PyPI's CUDA build"
    pipi "torch==$ver"
    exit 0
fi
if [ "$(uname -s)" != Linux ]; then
    echo "torch $ver from PyPI ($(uname -s))"
    pipi "torch==$ver"
    exit 0
fi
resolved=$("$py" -m pip install --dry-run --quiet --report - "torch==$ver" 2>/dev/null | "$py" -c '
import json, sys
try:
    report = json.load(sys.stdin)
except ValueError:
    sys.exit(0)
print(next((i["metadata"]["version"] for i in report.get("install", [])
            if i["metadata"]["name"].lower() == "torch"), ""))' || true)
case "$resolved" in
    *+cpu)
        echo "no GPU: torch $resolved (CPU build) from the configured package sources"
        pipi "torch==$ver" ;;
    *)
        echo "no GPU: torch $ver, CPU build from https://download.pytorch.org/whl/cpu"
        pipi "torch==$ver" --index-url https://download.pytorch.org/whl/cpu ;;
esac
