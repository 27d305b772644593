#!/usr/bin/env bash
# Issue 23's GPU target, in one call of a lent GPU machine (~6 minutes on an H200): Square's graph tests, then train the two
# adversarially trained models the target names (MNIST small-cnn PGD-10 AT at eps 0.3, the frontier's
# reference; CIFAR-10 vgg-cifar PGD-5 AT at 8/255 on the first 10,000 images, the CIFAR-10 frontier's), then
# advtune's standard suite against reference AutoAttack on the first 1000 test images of each
# (bench/eval_speed.py, both at evaluate's GPU batch of 1000), and once more on CIFAR-10 with Square's queries
# eager instead of CUDA graph replays (the ablation).
#
# Needs, beside the repository (nothing can be fetched there): ADVTUNE_DATA holding mnist/ and cifar10/
# (a cifar10.npz of the first 10,000 training and 1000 test images fits the 64 MiB a call carries), and
# pyautoattack's sources on PYTHONPATH (its wheel is 41 MB, 45 of them an example model: carry the .py files).
#     bench/gpu_eval_speed.sh <work folder> <output folder>
set -euo pipefail
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }  # the header above
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
[ $# -ge 2 ] || { usage >&2; exit 2; }
# the checkout's advtune (a bare machine has no install: `python -m advtune` failed "No module named advtune")
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
work=${1:?work folder}
out=${2:?output folder}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
n=${N:-1000}
smoke=()  # SMOKE=1: a minute's check of this script on any machine (tiny runs, numbers meaningless)
[ -n "${SMOKE:-}" ] && smoke=(--epochs 1 --limit 256)
mkdir -p "$work" "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L || true
$py -c "import torch, pyautoattack; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"

# Square's graph tests first (the CUDA-only one checks replays against eager queries); a failure is reported, not fatal
timeout 180 $py -m pytest -q -p no:cacheprovider -o addopts="" tests/test_attacks.py \
    -k "square_graph or square_chunks or square_falls or square_syncing" 2>&1 | tail -3 | tee "$out/pytest-square.txt" || true

train() {  # name, then advtune train's arguments; skipped when its model is there (a rerun resumes)
    local name=$1
    shift
    if [ ! -f "$work/$name/summary.json" ]; then
        local t0=$SECONDS
        $py -m advtune train --device "$device" --out "$work/$name" --overwrite --limit-test "$n" --quiet "$@" "${smoke[@]}"
        echo "$name: trained in $((SECONDS - t0)) s"
    fi
    cp "$work/$name/summary.json" "$out/$name-summary.json"
}
train mnist-at --dataset mnist --model small-cnn --limit 55000 --adversarial pgd:steps=10 --eps 0.3 \
    --eps-warmup 0.1 --epochs 10 --batch-size 128 --optimizer adam --lr 0.001
train cifar-at --dataset cifar10 --model vgg-cifar --limit 10000 --adversarial pgd:steps=5 --eps 8/255 \
    --eps-warmup 0.1 --epochs 6 --batch-size 128 --optimizer adam --lr 0.001 --schedule constant
tar -czf "$out/gpu-at-models.tgz" --exclude=checkpoint.pt -C "$work" mnist-at cifar-at  # to re-evaluate elsewhere

speed() {
    $py bench/eval_speed.py "$@" --device "$device" --n "$n" 2>&1 | grep -v Warning
}
speed "$work/mnist-at" --eps 0.3 --out "$out/eval-speed-gpu-mnist-at.json"
speed "$work/cifar-at" --eps 0.0313725 --out "$out/eval-speed-gpu-cifar10-at.json"
speed "$work/cifar-at" --eps 0.0313725 --square graphs=false --out "$out/eval-speed-gpu-cifar10-at-eager.json"
