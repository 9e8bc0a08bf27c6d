#!/usr/bin/env bash
# Prints how many ranks to launch: every visible GPU, or 2 CPU ranks on a machine without one.
n=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
[ "${n:-0}" -gt 0 ] && echo "$n" || echo 2
