#!/usr/bin/env bash
# CIM's bilevel step on one GPU (issue 10): eager vs replayed as a CUDA graph, and what it costs a
# training phase. One command on a lent machine (the data as for exps/gpu_evidence.sh):
#
#   OUT=logs/gpu bash exps/gpu_cim_speed.sh      # from the repository root
#
#   1. exps/bench_bilevel.py, ResNet-18 at 224 px on the Imagenette subset, phase 0 with 10 classes
#      (5 bilevel iterations per epoch): eager and graphed rows for the float32 step and the bf16
#      autocast step (bilevel_autocast), each profiled, and the graphed row's φ against the eager one's;
#   2. exps/bench_throughput.py, bf16: plain loop, framework without CIM, framework with CIM
#      (graphed bilevel step, the default) and with the eager step (bilevel_cuda_graph false).
set -u
OUT=${OUT:-logs/gpu}
R=${RUNS:-logs/gpu-runs}
D=${DEVPACK:-.devpack}
DEV=${DEVICE:-cuda}
BUDGET=${BUDGET:-250}
B1_ARGS=${B1_ARGS:---epochs 3 --precision bf16 fp32}
B2_ARGS=${B2_ARGS:---epochs 4 --precision bf16}
mkdir -p "$OUT" "$R"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
limit() { local l=$(( BUDGET - ($(date +%s) - T0) )); [ "$1" -lt "$l" ] && l=$1; [ "$l" -lt 5 ] && l=5; echo $l; }
[ -f $D/data.tar.gz ] && tar xzf $D/data.tar.gz -C $D
nvidia-smi -L 2>/dev/null
I224="--config cim-lucir-imagenette-224 --set data_root=$D/imagenette-sub --set device=$DEV --set init_cls=10"
say "1. bilevel step alone: eager vs graphed"
timeout $(limit 120) $PY exps/bench_bilevel.py $I224 $B1_ARGS --profile --out $R/bench-bilevel.json \
    > $R/bench-bilevel.out 2>&1; say "1 rc $?"
grep '^{' $R/bench-bilevel.out; grep "profiled" $R/bench-bilevel.out
say "2. a training phase with CIM: graphed vs eager bilevel step"
timeout $(limit 130) $PY exps/bench_throughput.py $I224 --set compression=none $B2_ARGS \
    --compare cim:compression=cim --compare cim-eager:compression=cim,bilevel_cuda_graph=false \
    --out $R/bench-cim-rows.json > $R/bench-cim-rows.out 2>&1; say "2 rc $?"
grep -A8 "^| row" $R/bench-cim-rows.out
cp $R/bench-*.json $R/*.out "$OUT"/ 2>/dev/null
say "done"
