#!/usr/bin/env bash
# The GPU evidence of issues 10 and 9, as one command on a lent single-GPU machine.
#
#   OUT=logs/gpu bash exps/gpu_evidence.sh      # from the repository root
#
# It needs small copies of the shared data in .devpack/ (the device tool carries at most 64 MiB,
# counted per file, so they travel as one .devpack/data.tar.gz, unpacked here first):
#   .devpack/tiny32          tiny-imagenet-50 resized to 32 px (JPEG q92; boxes halved), the
#                            stored size of every tiny-imagenet config
#   .devpack/imagenette-sub  imagenette2, the first 90 training / 20 validation images per class
#   .devpack/noise           the tiny random diffusion pipeline's 100 images per class (the
#                            synthetic-replay cache the CPU noise arms used), as a replay folder
# Steps, each with its own time limit, so one failing step leaves the others' numbers:
#   1. CUDA smoke runs (LUCIR 2 phases; LUCIR + CIM 2 phases), 1 epoch per phase;
#   2. exps/bench_throughput.py: resnet32 at 32 px (tiny-imagenet-50, 10 classes in phase 0: with all 50
#      its six rows outlasted their 150 s on 2026-11-26) and
#      ResNet-18 at 224 px (the imagenette subset), plain loop vs framework vs framework + CIM, bf16 +
#      channels_last and float32; torch.compile on resnet32; decoding images/s per loader worker;
#   3. issue 9's FOSTER arms (none / oracle / noise x seeds 1993, 1994), six runs sharing the GPU;
# On 2026-11-26 (H100, torch 2.11) steps 1 and 2 ran (the resnet32 rows in a second call with 10
# classes); steps 3 and 4 did not fit the 15 minutes of device time. README "Speed on one GPU".
#   4. a 10-phase CIFAR-style LUCIR schedule on tiny-imagenet-50 at 32 px (B0, 5 classes per phase,
#      160 epochs per phase, cosine_resnet32, 20 exemplars per class), timed alone.
set -u
OUT=${OUT:-logs/gpu}
R=${RUNS:-logs/gpu-runs}
mkdir -p "$OUT" "$R"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
D=.devpack
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

[ -f $D/data.tar.gz ] && tar xzf $D/data.tar.gz -C $D
nvidia-smi -L
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"

say "1. CUDA smoke runs"
TINY="--set data_root=$D/tiny32 --set device=cuda --set checkpoints=none --set num_phases=2 --set init_epochs=1 --set epochs=1"
timeout 150 $PY main.py --config lucir-tinyimagenet50 $TINY --set cbf_epochs=1 --output $R/smoke-lucir > $R/smoke-lucir.out 2>&1; say "lucir smoke rc $?"
timeout 150 $PY main.py --config cim-lucir-tinyimagenet50 $TINY --set cbf_epochs=1 --output $R/smoke-cim-lucir > $R/smoke-cim-lucir.out 2>&1; say "cim-lucir smoke rc $?"
tail -n 3 $R/smoke-lucir.out $R/smoke-cim-lucir.out
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_augment.py -k cuda 2>&1 | tail -2

say "2. throughput"
B32="--config cim-lucir-tinyimagenet50 --set data_root=$D/tiny32 --set convnet_type=resnet32 --set batch_size=128 --set init_cls=10 --set compression=none"
timeout 150 $PY exps/bench_throughput.py $B32 --epochs 3 --precision bf16 fp32 --compare cim:compression=cim \
    --out $R/bench-resnet32.json > $R/bench-resnet32.out 2>&1; say "bench resnet32 rc $?"
B224="--config cim-lucir-imagenette-224 --set data_root=$D/imagenette-sub --set init_cls=10 --set compression=none"
timeout 150 $PY exps/bench_throughput.py $B224 --epochs 4 --precision bf16 fp32 --compare cim:compression=cim --profile \
    --out $R/bench-resnet18-224.json > $R/bench-resnet18-224.out 2>&1; say "bench resnet18 rc $?"
timeout 60 $PY exps/bench_throughput.py --decode --config cim-lucir-imagenette-224 --set data_root=$D/imagenette-sub \
    --workers 0 1 2 4 8 --decode_images 900 --out $R/bench-decode.json > $R/bench-decode.out 2>&1; say "decode rc $?"
timeout 150 $PY exps/bench_throughput.py $B32 --epochs 3 --precision bf16 --compare compiled:compile=true \
    --out $R/bench-resnet32-compile.json > $R/bench-resnet32-compile.out 2>&1; say "compile rc $?"
for f in $R/bench-*.out; do grep -A6 "^| row" "$f"; done

say "3. issue 9: FOSTER arms"
$PY exps/make_oracle_replay.py --data_root $D/tiny32 --per_class 100 --out $R/oracle32 > /dev/null
ORACLE="{\"source\": \"folder\", \"path\": \"$R/oracle32/replay\", \"per_class\": 100}"
NOISE='{"source": "folder", "path": ".devpack/noise", "per_class": 100, "num_inference_steps": 2, "gen_batch_size": 25}'
$PY -c "from utils.datasets import load_dataset as l; l('tinyimagenet', '$R/oracle32/data', image_size=32, cache_dir='.cache/data')" > /dev/null
for seed in 1993 1994; do
  for arm in none oracle noise; do
    extra=()
    [ $arm = oracle ] && extra=(--set "synthetic_replay=$ORACLE")
    [ $arm = noise ] && extra=(--set "synthetic_replay=$NOISE")
    timeout 300 $PY main.py --config foster-tinyimagenet50 --set seed=$seed --set data_root=$R/oracle32/data \
        --set device=cuda --set checkpoints=none ${extra[@]+"${extra[@]}"} --output $R/foster-$arm-$seed \
        > $R/foster-$arm-$seed.out 2>&1 &
  done
done
wait; say "FOSTER arms done"
for f in $R/foster-*.out; do echo "$f: $(grep -h 'avg' "$f" | tail -1)"; done

say "4. 10-phase schedule"
left=$(( 545 - ($(date +%s) - T0) )); [ $left -lt 20 ] && left=20
timeout $left $PY main.py --config lucir-cifar100 --set dataset=tinyimagenet \
    --set data_root=$D/tiny32 --set image_size=32 --set input_size=32 --set init_cls=5 --set increment=5 \
    --set device=cuda --set checkpoints=none --output $R/lucir-10phase > $R/lucir-10phase.out 2>&1
say "10-phase rc $?"
tail -4 $R/lucir-10phase.out

$PY - "$OUT" "$R" <<'EOF'
import glob, json, os, sys
out = {}
for r in sorted(glob.glob(os.path.join(sys.argv[2], "*", "results.json"))):
    res = json.load(open(r))
    out[os.path.basename(os.path.dirname(r))] = {
        "summary": {k: v for k, v in res["summary"].items() if "matrix" not in k},
        "phase_seconds": [p.get("seconds") for p in res["phases"]],
        "synthetic_replay": [p.get("synthetic_replay") for p in res["phases"]]}
for b in sorted(glob.glob(os.path.join(sys.argv[2], "bench-*.json"))):
    out[os.path.basename(b)] = json.load(open(b))
json.dump(out, open(os.path.join(sys.argv[1], "summary.json"), "w"), indent=1)
EOF
tar czf "$OUT/runs.tar.gz" --exclude='*.pt' --exclude='oracle32' "$R"
say "done"
