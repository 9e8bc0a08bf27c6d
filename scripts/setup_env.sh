#!/usr/bin/env bash
# Creates .venv with the pinned stack and lance_ds installed editable; re-running is a no-op until a
# requirements file changes. Keeps a torch already installed in .venv (GPU users install their own CUDA build
# there first); otherwise installs $LANCE_TORCH or requirements-cpu.txt's pin torch==2.13.0 (never a bare `torch`).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.lance_ds_stamp
want=$(cat requirements*.txt setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip >/dev/null
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q ${LANCE_TORCH:--r requirements-cpu.txt}
  fi
  # Pin whatever torch is installed so that no other package can swap it for a CUDA build.
  torch_pin=$(python -c "import torch; print('torch==' + torch.__version__.split('+')[0])")
  python -m pip install -q -r requirements.txt -r requirements-dev.txt -c <(echo "$torch_pin")
  python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi

# DeepSpeed JIT-builds its shared-memory communication op on first use (~35 s): do it once here, not in each rank.
python - <<'PY' 2>&1 | grep -v -i warning || true
import torch
if not torch.cuda.is_available():
    from deepspeed.comm.torch import build_shm_op
    build_shm_op()
PY
