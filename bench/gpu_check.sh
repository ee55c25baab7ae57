#!/bin/sh
# Everything issue 4 asks to check on a CUDA machine, in one go (about 3-5 minutes on an H100):
#   1. the gpu-marked tests,  2. bench.py --device cuda,  3. two epochs of train.py on CUDA.
# Each step writes its own report, so one failing step does not hide the others' results.
#
#     sh bench/gpu_check.sh [OUT_DIR]        # default: $OUT if set, else out/gpu
#
# A lent GPU machine gives a session 15 minutes in all, its start-up included, and at most
# 10 minutes a command. So each step has its own time limit (270 + 150 + 120 s = 9 min at
# most): a step that hangs is stopped and reported as such (exit 124 in summary.txt), and the
# later steps still run. Give the command that runs this script a limit of 590 s or more.
# LIMIT_TESTS, LIMIT_BENCH and LIMIT_TRAIN (seconds) override the three limits.
#
# It writes seven files into OUT_DIR (the device tool brings back at most 8).
# Then copy the reports to bench/results/ as DATE-GPU-*.txt and add them to its README.
out=${1:-${OUT:-out/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1  # a step stopped at its limit keeps what it printed
status=0
: > "$out/summary.txt"

# step NAME LIMIT REPORT COMMAND...: run COMMAND with a time limit, its output into REPORT,
# and one line into summary.txt: the exit code (124 = stopped at the limit) and the seconds
step() {
  name=$1; limit=$2; report=$3; shift 3
  echo "$name (limit ${limit} s)"
  start=$(date +%s)
  timeout "$limit" "$@" > "$report" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || status=1
  [ "$rc" -eq 124 ] && echo "stopped after ${limit} s" >> "$report"
  echo "$name: exit $rc, $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
}

{ date -u; nvidia-smi 2>&1 || echo "nvidia-smi: not found"; python -c "import cupy; cupy.show_config()" 2>&1; } > "$out/machine.txt"

# Without a working CUDA device every gpu test is skipped and pytest exits 0: that must not
# read as passed. This line names what is missing (CuPy, the driver, a device).
python -c "import autograd, sys; sys.exit(0 if autograd.cuda_available() else
  'no CUDA: ' + autograd.cuda_problem())" > "$out/cuda.txt" 2>&1 \
  && echo "CUDA: available" | tee -a "$out/summary.txt" \
  || { status=1; echo "CUDA: NOT available, the GPU tests will all skip: $(cat "$out/cuda.txt")" \
       | tee -a "$out/summary.txt"; }

step "1/3 pytest -m gpu" "${LIMIT_TESTS:-270}" "$out/gpu-tests.txt" \
  python -m pytest -m gpu -q -ra
tail -n 3 "$out/gpu-tests.txt"

step "2/3 bench.py --device cuda" "${LIMIT_BENCH:-150}" "$out/bench-cuda.log" \
  python bench/bench.py --device cuda --out "$out/bench-cuda.txt"
tail -n 12 "$out/bench-cuda.log"

# The last epoch's evaluation (L_1000 on the first 500 test images) and the final L_5000 on
# the first 1000 test images are in the log: on all 10000 (train.py's default, 5e7 passes
# through the model) the final bound alone could outlast the step's limit. The run's folder
# stays outside OUT_DIR: the device tool brings back at most 8 files, and the log holds
# every figure of the run.
run_dir="${TMPDIR:-/tmp}/lvae-gpu-check-run"
rm -rf "$run_dir"  # a checkpoint left by an earlier check would make this run resume, not train
step "3/3 train.py --device=cuda --epochs=2 --warmup=0" "${LIMIT_TRAIN:-120}" "$out/train-2-epochs.txt" \
  python train.py --device=cuda --epochs=2 --warmup=0 --eval_lk_images=500 \
  --final_lk_images=1000 --out_dir="$run_dir"
tail -n 6 "$out/train-2-epochs.txt"
exit $status
