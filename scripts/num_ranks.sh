#!/usr/bin/env bash
# Prints how many ranks to launch: every visible GPU, or 2 CPU ranks on a machine without one.
# --gpus: the visible GPUs alone (0 on a machine without one).
n=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${1:-}" = --gpus ]; then echo "${n:-0}"; exit 0; fi
[ "${n:-0}" -gt 0 ] && echo "$n" || echo 2
