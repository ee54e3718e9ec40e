#!/usr/bin/env bash
# The benchmark on a lent GPU machine (no network there): install the carried wheels, then bench/run.py on CUDA.
# Prepare once here:  .gpu/wheels (cp312 wheels of TotalSegmentator, nnU-Net and what they import that the
# machine's image lacks), .gpu/sitk.tar.xz (SimpleITK unpacked, xz: its wheel alone is over the carry limit),
# .gpu/examples (example_ct*.nii.gz). Run with the device tool:  carry .gpu, command "bash bench/gpu.sh".
set -euo pipefail
site=/tmp/gpusite
mkdir -p "$site"
python3 -m pip install --quiet --no-index --no-deps --no-build-isolation --target "$site" .gpu/wheels/*
tar -xJf .gpu/sitk.tar.xz -C "$site"
export PYTHONPATH="$site:$PWD" BENCH_EXAMPLES="$PWD/.gpu/examples" PYTHONNOUSERSITE=1
python3 -c "import torch, SimpleITK, nnunetv2, totalsegmentator.nnunet, ray_app.core.segmenter; \
print('torch', torch.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
out="${OUT:-/tmp}"
python3 bench/run.py --device cuda --weights random --scans synthetic,example_ct --variants vanilla,ours \
    --repeats 3 --out "$out/gpu.json" | tee "$out/gpu_table.txt"
