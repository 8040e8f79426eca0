#!/usr/bin/env bash
# The GPU checks of issues 4, 8 and 9 in one go, on a machine with a CUDA GPU and no network, from the repository
# root:  bash benchmarks/gpu.sh
#
# Installs hydra-core, omegaconf and antlr4 from the wheels in .whl/ (/work/shared/make-wheels.sh) when python
# lacks them, runs the GPU tests (tests/test_gpu.py), measures the H200 figures of benchmarks/RESULTS.md and
# prints a table of them, each against its target, last. Every part has a time limit and the whole stays within
# GPU_SH_BUDGET seconds (default 330); a part that fails or hangs is a row of the table, not the end of the
# script. In $OUT (default: a new folder under /tmp): gpu_sh.log, every part's full output, written as each part
# ends; table.md; and parts.tar.gz, each part's output and the training runs' records as files.
#
# A dry run without a GPU, sized to take a few minutes on two cores, exercises the script and its table:
#   GPU_SH_DEVICE=cpu PYTHON=.venv/bin/python bash benchmarks/gpu.sh
set -uo pipefail

PYTHON=${PYTHON:-python3}
DEVICE=${GPU_SH_DEVICE:-cuda}
OUT=${OUT:-$(mktemp -d /tmp/gpu_sh.XXXXXX)}
END=$((SECONDS + ${GPU_SH_BUDGET:-330}))
WORK=$(mktemp -d /tmp/gpu_sh_work.XXXXXX)  # data and run directories, too big to send back
PARTS=$WORK/parts  # a NAME.txt and NAME.rc per part, read by benchmarks/gpu_table.py
mkdir -p "$OUT" "$PARTS"
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # output kept if a part is cut

# part NAME LIMIT_S RESERVE_S COMMAND...: COMMAND's output to $PARTS/NAME.txt (and gpu_sh.log), its exit status
# to $PARTS/NAME.rc ("skipped" when no time is left); at most LIMIT_S seconds, never into the RESERVE_S seconds
# kept for the parts after it.
part() {
    local name=$1 limit=$2 reserve=$3
    shift 3
    local left=$((END - SECONDS - reserve))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "not run: the time budget was spent" >"$PARTS/$name.txt"
        echo skipped >"$PARTS/$name.rc"
        return
    fi
    echo "[${SECONDS}s] $name (at most ${limit}s)"
    timeout -k 10 "$limit" "$@" >"$PARTS/$name.txt" 2>&1  # SIGTERM to the part's whole process group
    local rc=$?
    echo $rc >"$PARTS/$name.rc"
    printf '=== %s (exit %s): %s\n' "$name" "$rc" "$*" >>"$OUT/gpu_sh.log"
    cat "$PARTS/$name.txt" >>"$OUT/gpu_sh.log"
}

if [[ $DEVICE == cpu ]]; then  # a dry run: the same commands on small sizes
    R18_BATCH=16 R50_BATCH=2 CIFAR_PER_FILE=200
    R18_STEPS=(--steps 2 --rounds 1) R50_STEPS=(--steps 1 --rounds 1)
    LOADER_RUN=(--images 2048 --steps 4 --rounds 1 --workers 2) TORCH_WORKERS=2
    EPOCHS=(trainer.epochs=2 trainer.limit_batches=2) BENCH_STEPS=(steps=2 warmup=1) DDP_RUN=(--batches 2 --rounds 1)
else
    R18_BATCH=512 R50_BATCH=256 CIFAR_PER_FILE=10000
    R18_STEPS=(--steps 50 --rounds 5) R50_STEPS=(--steps 20 --rounds 3)
    LOADER_RUN=(--images 50000 --steps 40 --rounds 3 --workers 8) TORCH_WORKERS=8
    EPOCHS=(trainer.epochs=3) BENCH_STEPS=(steps=30 warmup=5) DDP_RUN=(--batches 30 --rounds 15)
fi
# The anchors' setting (../shared/gpu-anchors.md): SGD with Nesterov momentum, label smoothing, bf16, channels_last.
ANCHOR=(optimizer=sgd loss.label_smoothing=0.1 "trainer.device=$DEVICE" trainer.precision=bf16
        trainer.channels_last=true)
R18=(model=resnet18 data=cifar10 "data.batch_size=$R18_BATCH" "${ANCHOR[@]}")
DATA=$WORK/data

# Random CIFAR-10-shaped files in the real format (5 training batches, 1 test batch), for the real loaders.
WRITE_CIFAR='
import pickle, sys
from pathlib import Path
import numpy as np
folder, n = Path(sys.argv[1]) / "cifar-10-batches-py", int(sys.argv[2])
folder.mkdir(parents=True)
rng = np.random.default_rng(0)
for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
    (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
(folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}, protocol=2))
print(f"{6 * n} images in {folder}")'

# A run's records, to $PARTS/<name>/ (its checkpoints stay behind).
keep() {
    mkdir -p "$PARTS/$1"
    cp "$WORK/$1"/{summary.json,metrics.jsonl,train.log} "$PARTS/$1/" 2>/dev/null
}

part nvidia-smi 20 300 nvidia-smi
if ! "$PYTHON" -c "import hydra, omegaconf, antlr4, yaml" 2>/dev/null; then
    part install 60 270 "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
part versions 30 260 "$PYTHON" -c "import sys, torch, hydra, omegaconf; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'hydra', hydra.__version__, \
'omegaconf', omegaconf.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else '(no CUDA)')"
# -v: a line per test as it ends, so what finished is known even if the time limit cuts the run short
PYTEST=("$PYTHON" -m pytest -v -rs --durations=0)
"$PYTHON" -c "import xdist" 2>/dev/null && PYTEST+=(-n 4)  # the CLI tests are processes of their own
part tests 200 145 "${PYTEST[@]}" -m gpu tests/test_gpu.py
part r18 45 120 "$PYTHON" benchmarks/step_vs_bare.py "${R18[@]}" "${R18_STEPS[@]}"
part loaders 40 100 "$PYTHON" benchmarks/step_vs_bare.py --loaders "${R18[@]}" "${LOADER_RUN[@]}"
part r50 60 75 "$PYTHON" benchmarks/step_vs_bare.py model=resnet50 data=fake 'data.image_shape=[3,224,224]' \
    "data.batch_size=$R50_BATCH" "${ANCHOR[@]}" "${R50_STEPS[@]}"
# Issue 9: the DDP path of one process (NCCL; gloo in the dry run) against the plain path, whole epochs alternating.
part ddp 45 50 "$PYTHON" benchmarks/ddp_vs_plain.py --device "$DEVICE" --model resnet18 "${R18[@]}" "${DDP_RUN[@]}"
part cifar 30 45 "$PYTHON" -c "$WRITE_CIFAR" "$DATA" "$CIFAR_PER_FILE"
TRAIN=("$PYTHON" -m hsci train "${R18[@]}" "data.root=$DATA" data.download=false "${EPOCHS[@]}")
part train_gpu 50 25 "${TRAIN[@]}" data.loader=gpu "hydra.run.dir=$WORK/train_gpu"
keep train_gpu
part train_torch 50 12 "${TRAIN[@]}" data.loader=torch "data.num_workers=$TORCH_WORKERS" \
    "hydra.run.dir=$WORK/train_torch"
keep train_torch
part bench 40 0 "$PYTHON" -m hsci bench "${R18[@]}" "data.root=$DATA" data.download=false "${BENCH_STEPS[@]}"
if ((END - SECONDS >= 60)); then  # the CPU-device loader tests too, on this machine's torch, if time is left
    part loader_tests 120 5 "${PYTEST[@]}" -m "not slow" tests/test_loaders.py
fi
tar -czf "$OUT/parts.tar.gz" -C "$WORK" parts
echo "[${SECONDS}s] done; outputs in $OUT"
"$PYTHON" benchmarks/gpu_table.py "$PARTS" "$DEVICE" | tee "$OUT/table.md"
rm -rf "$WORK"
