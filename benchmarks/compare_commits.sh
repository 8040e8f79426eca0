#!/usr/bin/env bash
# Is the CPU path no slower than before? Runs `hsci train <overrides>` from two commits in turn, three
# rounds, alternating so machine drift falls on both, and prints each run's mean training images/s
# (metrics.jsonl) and wall time.
#   benchmarks/compare_commits.sh 9f4c514 HEAD                    # the default experiment (digits, cnn)
#   benchmarks/compare_commits.sh 9f4c514 HEAD data=fake model=cnn trainer.epochs=3
set -euo pipefail
old=$1 new=$2; shift 2
repo=$(git rev-parse --show-toplevel)
python=${PYTHON:-$repo/.venv/bin/python}
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/old" >/dev/null 2>&1; git -C "$repo" worktree remove --force "$work/new" >/dev/null 2>&1; rm -rf "$work"' EXIT
git -C "$repo" worktree add -q --detach "$work/old" "$old"
git -C "$repo" worktree add -q --detach "$work/new" "$new"
cd "$work"
for round in 1 2 3; do
  for side in old new; do
    start=$(date +%s.%N)
    PYTHONPATH=$work/$side "$python" -m hsci train "$@" hydra.run.dir=runs/$side$round >/dev/null 2>&1
    end=$(date +%s.%N)
    "$python" - "$side" "runs/$side$round/metrics.jsonl" "$start" "$end" <<'PY'
import json, statistics, sys
side, path, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
rate = statistics.mean(json.loads(line)["train_img_per_s"] for line in open(path))
print(f"{side}  {rate:8.0f} img/s  {end - start:5.1f} s wall")
PY
  done
done
