#!/usr/bin/env bash
# The prepared GPU suite (issue 17): one table of DINO/MAE img/s and MFU, views, image-folder decode, k-NN,
# MaskCut, torch.compile and trainer=fsdp, within 8 minutes on one H100/H200. Arguments go to bench/gpu_suite.py (--help);
# `bash bench/gpu_suite.sh --device cpu --tiny` is the CPU smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu_suite.py "$@"
