#!/usr/bin/env bash
# Every CUDA check of this project, on a GPU machine, in at most 9 minutes from a fresh checkout:
#
#     benchmarks/cuda_check.sh OUTDIR
#
# Made for lent GPU machines with no network access that bring Python 3 with PyTorch, torchvision,
# tensorboard, tqdm and pytest but not hydra-core, omegaconf or antlr4-python3-runtime. Nothing is installed
# from a registry: bring those three (pure-Python wheels) in the checkout's git-ignored .gpu-wheels/ folder,
#
#     mkdir -p .gpu-wheels && cp /path/to/wheels/*.whl .gpu-wheels/
#
# and the script installs them into a scratch folder put on PYTHONPATH (nothing else on the machine changes).
#
# Steps, each under its own time limit (seconds, in brackets); a step that fails or runs out of time is
# recorded and the next one still runs:
#   env           [20]  Python, torch, CUDA, cuDNN, the GPUs and the driver           -> env.log
#   install       [40]  .gpu-wheels/*.whl into the scratch folder                     -> install.log
#   cuda-tests   [165]  python -m pytest -m cuda on the test files that mark cuda tests -> cuda-tests.log, .xml
#   train         [50]  python train.py on the bundled demo data, trainer.device=cuda  -> train/ (a run dir)
#   train-graphs  [40]  the same with trainer.cuda_graphs=true (train/throughput side by side)  -> train-graphs/
#   evaluate      [30]  python evaluate.py on train/'s last.pt, device=cuda            -> eval/ (eval.json)
#   torchrun      [45]  one process under torchrun: NCCL, SyncBatchNorm (model=fastnet), the val/mistakes
#                       image gathered across ranks, and graphs left off under DDP      -> torchrun/
#   benchmark    [120]  python -m benchmarks.throughput --gpu-check --device cuda      -> benchmark.json, .md
# Every step's output goes to OUTDIR/STEP.log; summary.json lists each step's exit code, seconds and limit
# (124: out of time; the limits add up to 510 s and each is cut to what is left of that). The benchmark measures the GPU targets, bf16 against fp32 and CUDA graphs against
# eager steps (trainer.cuda_graphs=auto turned on from these figures; docs/performance.md "On a GPU").
#
# CUDA_CHECK_DEVICE=cpu runs the same steps on the CPU at smoke size (tests/test_cuda_check.py does, with
# CUDA_CHECK_SKIP=benchmark): the cuda tests then skip with their reason and train-graphs fails in one line.
# PYTHON picks the interpreter (default python3).

set -u
if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
PYTHON="${PYTHON:-python3}"
DEVICE="${CUDA_CHECK_DEVICE:-cuda}"
SKIP=",${CUDA_CHECK_SKIP:-},"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/cuda-check-site.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONPATH="$SCRATCH${PYTHONPATH:+:$PYTHONPATH}"
export HYDRA_FULL_ERROR=1  # a failed step's log keeps its traceback
cd "$ROOT" || exit 2

if [ "$DEVICE" = cpu ]; then  # a check of the script itself: smallest sizes, time limits x4 for 2 busy cores
    EPOCHS=1
    BENCH="--smoke --threads 1"
    SLOWER=4
else
    EPOCHS=10
    BENCH="--gpu-check"
    SLOWER=1
fi
export ROOT OUT PYTHON DEVICE SCRATCH EPOCHS BENCH

STARTED=$(date +%s)
DEADLINE=$((STARTED + 510 * SLOWER))  # 9 minutes, less the last kill's grace and the summary
SUMMARY=""

# step NAME LIMIT COMMAND...: run COMMAND (a program or a function below) under `timeout LIMIT` (cut to
# what is left of the 9 minutes) with its output in OUTDIR/NAME.log, and record its exit code; never
# stops the script.
step() {
    local name=$1 limit=$(($2 * SLOWER)) rc begun left
    shift 2
    begun=$(date +%s)
    left=$((DEADLINE - begun))
    [ "$left" -lt "$limit" ] && limit=$left
    if [[ "$SKIP" == *",$name,"* ]]; then
        rc='"skipped"'
    elif [ "$limit" -le 0 ]; then
        rc='"no time left"'
    else
        echo "== $name (at most ${limit} s)"
        timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" >"$OUT/$name.log" 2>&1
        rc=$?
    fi
    local seconds=$(($(date +%s) - begun))
    echo "   $name: exit $rc, ${seconds} s"
    SUMMARY="$SUMMARY${SUMMARY:+,}
  \"$name\": {\"exit\": $rc, \"seconds\": $seconds, \"limit\": $limit}"
}

environment() {
    "$PYTHON" - <<'EOF'
import importlib.metadata, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(f"gpu {i}", torch.cuda.get_device_name(i), "capability", torch.cuda.get_device_capability(i))
# The installed versions, read without importing them (~1.5 s of CPU): the cuda-tests step imports them all.
for name in ("torchvision", "tensorboard", "tqdm", "pytest"):
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(name, "missing")
EOF
    nvidia-smi || echo "nvidia-smi not available"
}

install_wheels() {
    shopt -s nullglob
    local wheels=("$ROOT"/.gpu-wheels/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "no wheels in .gpu-wheels/: using what $PYTHON already has"
    elif "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SCRATCH" "${wheels[@]}" || return 1
    else  # a pure-Python wheel is a zip of its files: unpacked, it imports the same
        for wheel in "${wheels[@]}"; do "$PYTHON" -m zipfile -e "$wheel" "$SCRATCH" || return 1; done
    fi
    "$PYTHON" -c "import hydra, omegaconf, antlr4; print('hydra', hydra.__version__, hydra.__file__)"
}

train_run() {  # train_run NAME [overrides...]: a run in OUTDIR/NAME on the bundled demo data
    local name=$1
    shift
    "$PYTHON" train.py trainer.device="$DEVICE" trainer.epochs=$EPOCHS trainer.progress=false \
        hydra.run.dir="$OUT/$name" "$@"
}

evaluate_run() {  # the checkpoint scored on its own validation split must give the run's val/acc
    "$PYTHON" evaluate.py checkpoint="$OUT/train/checkpoints/last.pt" device="$DEVICE" hydra.run.dir="$OUT/eval" || return 1
    "$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
run, scored = json.loads((out / "train/metrics.json").read_text()), json.loads((out / "eval/eval.json").read_text())
print(f"run val/acc {run['val/acc']}, evaluate.py acc {scored['acc']}")
sys.exit(0 if scored["acc"] == run["val/acc"] else 1)
EOF
}

torchrun_run() {  # a one-process torchrun takes the same NCCL/gloo path as a larger one (training/distributed.py)
    local model=fastnet  # BatchNorm layers: SyncBatchNorm on CUDA
    [ "$DEVICE" = cpu ] && model=tutorial_cnn  # fastnet trains at ~64 samples/s on 2 CPU cores
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 train.py trainer.device="$DEVICE" \
        trainer.epochs=2 trainer.progress=false model=$model hydra.run.dir="$OUT/torchrun" || return 1
    "$PYTHON" - "$OUT/torchrun" "$DEVICE" <<'EOF'
import sys
from pathlib import Path
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run = Path(sys.argv[1])
log = (run / "train.log").read_text()
board = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
checks = {"val/mistakes image": "val/mistakes" in board.Tags()["images"],
          "graphs off under DDP": "cuda_graphs=False" in log and ("not under torchrun" in log or "cuda" not in sys.argv[2]),
          "two epochs": torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2}
print(checks)
sys.exit(0 if all(checks.values()) else 1)
EOF
}

benchmark() {
    # shellcheck disable=SC2086  # BENCH is a list of flags
    "$PYTHON" -m benchmarks.throughput $BENCH --device "$DEVICE" --out "$OUT/benchmark.json" >"$OUT/benchmark.md"
}
export -f environment install_wheels train_run evaluate_run torchrun_run benchmark

step env 20 environment
step install 40 install_wheels
# -p no:xdist: one GPU wants one worker (tests/conftest.py turns on -n auto wherever pytest-xdist is installed;
# the GPU machines have none, and naming a plugin that is absent is no error). Only the files that mark a test
# `pytest.mark.cuda` are collected: collecting the whole suite to pick those out costs ~2 s of CPU more
# (tests/test_cuda_check.py checks that every cuda test lives in a file this finds).
mapfile -t CUDA_TEST_FILES < <(grep -l 'pytest\.mark\.cuda' tests/test_*.py)
step cuda-tests 165 "$PYTHON" -m pytest -p no:xdist -m cuda -rs -p no:cacheprovider --junitxml="$OUT/cuda-tests.xml" \
    "${CUDA_TEST_FILES[@]}"
step train 50 train_run train
step train-graphs 40 train_run train-graphs trainer.cuda_graphs=true
step evaluate 30 evaluate_run
step torchrun 45 torchrun_run
step benchmark 120 benchmark

printf '{\n  "device": "%s",\n  "seconds": %d,\n  "steps": {%s\n  }\n}\n' \
    "$DEVICE" $(($(date +%s) - STARTED)) "$SUMMARY" >"$OUT/summary.json"
echo "summary: $OUT/summary.json"
