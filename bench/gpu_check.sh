#!/bin/sh
# Everything issue 4 asks to check on a CUDA machine, in one go (about 3-5 minutes on an H100):
#   1. the gpu-marked tests,  2. bench.py --device cuda,  3. two epochs of train.py on CUDA.
# Each step writes its own report, so one failing step does not hide the others' results.
#
#     sh bench/gpu_check.sh [OUT_DIR]        # default: $OUT if set, else out/gpu
#
# Then copy the reports to bench/results/ as DATE-GPU-*.txt and add them to its README.
out=${1:-${OUT:-out/gpu}}
mkdir -p "$out"
status=0
{ date -u; nvidia-smi 2>&1 || echo "nvidia-smi: not found"; python -c "import cupy; cupy.show_config()" 2>&1; } > "$out/machine.txt"

echo "1/3 pytest -m gpu"
python -m pytest -m gpu -q -ra > "$out/gpu-tests.txt" 2>&1 || status=1
tail -n 3 "$out/gpu-tests.txt"

echo "2/3 bench.py --device cuda"
python bench/bench.py --device cuda --out "$out/bench-cuda.txt" > "$out/bench-cuda.log" 2>&1 || status=1
tail -n 12 "$out/bench-cuda.log"

echo "3/3 train.py --device=cuda --epochs=2 --warmup=0"
python train.py --device=cuda --epochs=2 --warmup=0 --out_dir="$out/train-run" > "$out/train-2-epochs.txt" 2>&1 || status=1
rm -f "$out/train-run/ckpt.npz"  # 20 MB of weights; the log and metrics are what matter
tail -n 6 "$out/train-2-epochs.txt"
exit $status
