#!/usr/bin/env bash
# The GPU evidence of issue 10, as one command on a lent single-GPU machine (15 minutes of device
# time in all, the machine's start included, so the steps share a budget of BUDGET seconds):
#
#   OUT=logs/gpu bash exps/gpu_evidence.sh      # from the repository root
#
# It needs small copies of the shared data in .devpack/data.tar.gz (the device tool carries at most
# 64 MiB with the working tree): `python exps/make_devpack.py` writes it (the device tool replaces a carried folder in every
# call, so the script unpacks it each time)
#   tiny32          tiny-imagenet-50 re-encoded at 32 px (the stored size of every tiny-imagenet config)
#   imagenette-sub  imagenette2's first 300 training / 50 validation images per class (224 px)
# Steps, in order of what the issue needs most, each under its own time limit (so one that overruns
# leaves the others' numbers):
#   A. exps/bench_throughput.py, ResNet-18 at 224 px on the 3000 Imagenette images: plain loop,
#      plain + augment, framework, framework + CIM, bf16 + channels_last and float32; then (A2) the
#      bf16 rows without CIM again under --profile (a second call, so that a slow profile cannot
#      cost the table);
#   A3. the bf16 rows again under --profile with a CIM row whose artifact augmentation runs from
#      the first epoch (cam_update_interval 1): its host syncs per step (expected: none; added after
#      the 2026-11-27 lease, whose profile had no CIM step);
#   B. the same bench with the training set streamed from disk: Pillow in 8 loader workers vs
#      stream_decode "device" (bytes in 8 workers, decode_jpeg on the GPU), bf16;
#   C. configs/cim-lucir-imagenette-224.json on the subset, compression none, then cim (accuracy,
#      exemplars, seconds per phase);
#   D. a 10-phase CIFAR-style LUCIR schedule on tiny-imagenet-50 at 32 px (B0, 5 classes per phase,
#      160 epochs per phase, cosine_resnet32, 20 exemplars per class) for the seconds left to it:
#      its metrics.jsonl holds every epoch's wall time, from which the whole schedule's time follows;
#   E. torch.compile's steady-state gain on resnet32 at 32 px (bench, bf16, the rest of the budget).
# DEVPACK, DEVICE, BUDGET and the *_ARGS variables let the same script run on a CPU with tiny data
# and epochs (how it is checked before a lease).
set -u
BUDGET=${BUDGET:-575}
A_ARGS=${A_ARGS:---epochs 6}
B_ARGS=${B_ARGS:---epochs 3}
C_ARGS=${C_ARGS:-}
D_ARGS=${D_ARGS:-}
E_ARGS=${E_ARGS:---epochs 4}
source "$(dirname "$0")/gpu_lib.sh"

I224="--config cim-lucir-imagenette-224 --set data_root=$D/imagenette-sub --set device=$DEV"
say "A. throughput, ResNet-18 at 224 px"
timeout $(limit 110) $PY exps/bench_throughput.py $I224 --set init_cls=10 --set compression=none $A_ARGS \
    --precision bf16 fp32 --compare cim:compression=cim \
    --out $R/bench-resnet18-224.json > $R/bench-resnet18-224.out 2>&1; say "A rc $?"
say "A2. where the bf16 step time goes (--profile; bf16, no CIM)"
timeout $(limit 60) $PY exps/bench_throughput.py $I224 --set init_cls=10 --set compression=none $A_ARGS \
    --precision bf16 --profile --out $R/bench-resnet18-224-profile.json > $R/bench-resnet18-224-profile.out 2>&1
say "A2 rc $?"

say "B. streamed training set: Pillow workers vs decoding on the device"
timeout $(limit 70) $PY exps/bench_throughput.py $I224 --set init_cls=10 --set compression=none --set stored_form=crop \
    $B_ARGS --precision bf16 --compare streamed-pillow:in_memory=false,num_workers=8 \
    --compare streamed-device:in_memory=false,num_workers=8,stream_decode=device \
    --out $R/bench-streamed-224.json > $R/bench-streamed-224.out 2>&1; say "B rc $?"

say "A3. host syncs of CIM steps with artifact augmentation (--profile, cam_update_interval 1)"
timeout $(limit 60) $PY exps/bench_throughput.py $I224 --set init_cls=10 --set compression=none $A_ARGS \
    --precision bf16 --profile --compare cim-artifacts:compression=cim,cam_update_interval=1 \
    --out $R/bench-resnet18-224-cim-profile.json > $R/bench-resnet18-224-cim-profile.out 2>&1
say "A3 rc $?"

say "C. cim-lucir-imagenette-224, compression none vs cim"
timeout $(limit 90) $PY main.py $I224 --set checkpoints=none --set compression=none $C_ARGS \
    --output $R/i224-none > $R/i224-none.out 2>&1; say "C none rc $?"
timeout $(limit 150) $PY main.py $I224 --set checkpoints=none --set compression=cim $C_ARGS \
    --output $R/i224-cim > $R/i224-cim.out 2>&1; say "C cim rc $?"
grep -h "avg\|exemplars" $R/i224-*.out | tail -6

say "D. 10-phase LUCIR schedule at 32 px"
timeout $(limit 95) $PY main.py --config lucir-cifar100 --set dataset=tinyimagenet --set data_root=$D/tiny32 \
    --set image_size=32 --set input_size=32 --set init_cls=5 --set increment=5 --set device=$DEV \
    --set checkpoints=none $D_ARGS --output $R/lucir-10phase > $R/lucir-10phase.out 2>&1
say "D rc $? (124: stopped at its limit, as planned when the schedule is longer)"

say "E. torch.compile, resnet32 at 32 px"
timeout $(limit 120) $PY exps/bench_throughput.py --config cim-lucir-tinyimagenet50 --set data_root=$D/tiny32 \
    --set device=$DEV --set convnet_type=resnet32 --set batch_size=128 --set init_cls=10 --set compression=none \
    $E_ARGS --precision bf16 --compare compiled:compile=true \
    --out $R/bench-resnet32-compile.json > $R/bench-resnet32-compile.out 2>&1; say "E rc $?"
for f in $R/bench-*.out; do echo "== $f"; grep -A12 "^| row" "$f"; done

$PY - "$OUT" "$R" <<'EOF'
import glob, json, os, sys
out = {}
for r in sorted(glob.glob(os.path.join(sys.argv[2], "*", "results.json"))):
    res = json.load(open(r))
    out[os.path.basename(os.path.dirname(r))] = {
        "summary": {k: v for k, v in res["summary"].items() if "matrix" not in k},
        "phases": [{k: v for k, v in p.items() if "matrix" not in k} for p in res["phases"]]}
for m in sorted(glob.glob(os.path.join(sys.argv[2], "*", "metrics.jsonl"))):
    epochs = [json.loads(line) for line in open(m) if line.strip()]
    out.setdefault(os.path.basename(os.path.dirname(m)), {})["epoch_seconds"] = [
        (e["phase"], e["stage"], e["epoch"], e["seconds"]) for e in epochs]
for b in sorted(glob.glob(os.path.join(sys.argv[2], "bench-*.json"))):
    out[os.path.basename(b)] = json.load(open(b))
json.dump(out, open(os.path.join(sys.argv[1], "summary.json"), "w"), indent=1)
EOF
tar czf "$OUT/runs.tar.gz" --exclude='*.pt' --exclude='exemplars_phase_*.png' "$R"   # under the tool's 16 MiB a file
say "done"
