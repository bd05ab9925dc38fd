#!/usr/bin/env bash
# CIM's bilevel step on one GPU (issue 10): eager vs replayed as a CUDA graph, what it costs a
# training phase, and whole CIM runs whose later phases record it too. One command on a lent
# machine (the data as for exps/gpu_evidence.sh: `python exps/make_devpack.py` first):
#
#   OUT=logs/gpu bash exps/gpu_cim_speed.sh      # from the repository root
#
#   1. exps/bench_bilevel.py, ResNet-18 at 224 px on the Imagenette subset, phase 0 with 10 classes
#      (5 bilevel iterations per epoch), bf16 training: eager and graphed rows of the float32 step,
#      each with the PAUs differentiated by autograd and by the fused Triton kernels (pau_kernel),
#      each profiled, and every row's φ against the first row's (the bf16 autocast step saved no
#      device time in the last lease: B1_ARGS without --no_autocast_step brings its rows back);
#   2. exps/bench_throughput.py, bf16 (the GPU default): plain loop, framework without CIM, with
#      CIM as by default (graphed bilevel step, fused PAU kernels: pau_kernel auto), with autograd's
#      PAUs (pau_kernel autograd) and with the eager step (bilevel_cuda_graph false).
#      Then the framework and CIM rows again on the subset with each training image 4 times
#      (exps/tile_folder.py: 1200 images per class, near ImageNet's 1300): the bilevel step's cost
#      per epoch follows the classes and the training's the images, so this is CIM's ratio at
#      ImageNet's images per class (the fourth lease could only compute it: about 0.87×);
#   3. DER and FOSTER with cim, tiny-imagenet-50 at 32 px, two phases of two epochs: phase 0's graph
#      records after the trainer drops the last step's graph (it failed there in the last lease),
#      and phase 1's holds the old backbones;
#   4. configs/cim-lucir-imagenette-224.json on the subset with compression cim (5 phases: the
#      graph is recorded again in every phase, with LUCIR's distillation in the loss from phase 1);
#   5. exps/bench_stream_decode.py: stream_decode "device" finishing a batch of 256 subset files
#      re-encoded to 8 shapes with a 500 px long side, by resize chunk (2^0: image by image; the
#      GPU default 2^24 is not measured yet);
#   6. the first 2 phases of step 4 streamed (in_memory false, 4 workers): the graph records while a
#      loader's pin-memory thread fills the bilevel batches;
#   7. exps/bench_throughput.py for resnet32 at 32 px, bf16: eager beside compile_mode
#      "reduce-overhead" (torch.compile with CUDA graphs), for what is left of the budget.
# The steps run in this order of need and share BUDGET seconds; a later step gets what is left.
# Each run's results.json says per phase how many iterations were replayed (graph_replays) and why
# recording failed where it did (graph_fallback).
set -u
BUDGET=${BUDGET:-540}
B1_ARGS=${B1_ARGS:---epochs 3 --precision bf16 --pau_kernels autograd fused --no_autocast_step}
C_ARGS=${C_ARGS:-}
T_ARGS=${T_ARGS:---set init_epochs=2 --set epochs=2}
B2_ARGS=${B2_ARGS:---epochs 4 --precision bf16}
B7_ARGS=${B7_ARGS:---epochs 4 --precision bf16}
source "$(dirname "$0")/gpu_lib.sh"
# the runs so far, packed after each step, so that a call stopped at its limit still brings them back
pack() { tar czf "$OUT/runs.tar.gz" --exclude='*.pt' --exclude='exemplars_phase_*.png' "$R"; }
I224="--config cim-lucir-imagenette-224 --set data_root=$D/imagenette-sub --set device=$DEV"
say "1. bilevel step alone: eager vs graphed, autograd vs fused PAU kernels"
timeout -k 10 $(limit 120) $PY exps/bench_bilevel.py $I224 --set init_cls=10 $B1_ARGS --profile --out $R/bench-bilevel.json \
    > $R/bench-bilevel.out 2>&1; say "1 rc $?"; pack
$PY - "$R/bench-bilevel.json" <<'PYEOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except (OSError, ValueError) as exc:
    rows = []
    print("no bench-bilevel.json:", exc)
for r in rows:
    prof = r.get("profile") or {}
    print(r.get("step"), "|", r.get("row"), "|", r.get("pau_kernels_run", r.get("pau_kernel")), "| ms/it", r.get("ms_per_iteration"),
          "| train ms/step", r.get("train_ms_per_step"), "| device ms/it", prof.get("device_ms_per_step"), "busy", prof.get("device_busy"),
          "| saved MB", r.get("saved_for_backward_mb"), "| phi diff", r.get("phi_max_abs_diff"), "of", r.get("phi_max_abs_move"),
          "| replays", r.get("graph_replays"), r.get("graph_fallback") or "", r.get("error", ""))
PYEOF
grep -h "Traceback\|Error" $R/bench-bilevel.out | head -3
say "2. a training phase with CIM, bf16: the default (graphed, fused PAU kernels) vs autograd PAUs vs eager"
timeout -k 10 $(limit 140) $PY exps/bench_throughput.py $I224 --set init_cls=10 --set compression=none $B2_ARGS \
    --compare cim:compression=cim --compare cim-autograd:compression=cim,pau_kernel=autograd \
    --compare cim-eager:compression=cim,bilevel_cuda_graph=false \
    --out $R/bench-cim-rows-bf16.json > $R/bench-cim-rows-bf16.out 2>&1; say "2 rc $?"; pack
grep -A8 "^| row" $R/bench-cim-rows-bf16.out
$PY exps/tile_folder.py $D/imagenette-sub $D/imagenette-x4 4
timeout -k 10 $(limit 120) $PY exps/bench_throughput.py --config cim-lucir-imagenette-224 --set data_root=$D/imagenette-x4 \
    --set device=$DEV --set init_cls=10 --set compression=none $B2_ARGS --compare cim:compression=cim \
    --out $R/bench-cim-x4-bf16.json > $R/bench-cim-x4-bf16.out 2>&1; say "2 x4 rc $?"; pack
grep -A6 "^| row" $R/bench-cim-x4-bf16.out
say "3. DER and FOSTER with cim, two phases at 32 px"
for m in der foster; do
    extra=""; [ $m = foster ] && extra="--set compression_epochs=2"
    timeout -k 10 $(limit 50) $PY main.py --config $m-tinyimagenet50 $extra --set data_root=$D/tiny32 --set device=$DEV \
        --set init_cls=25 --set increment=25 --set compression=cim --set checkpoints=none $T_ARGS \
        --output $R/$m-cim > $R/$m-cim.out 2>&1; say "3 $m rc $?"
done
say "4. cim-lucir-imagenette-224 with cim"
timeout -k 10 $(limit 130) $PY main.py $I224 --set checkpoints=none --set compression=cim $C_ARGS \
    --output $R/i224-cim > $R/i224-cim.out 2>&1; say "4 rc $?"; pack
grep -h "no CUDA graph\|Traceback\|Error" $R/*-cim.out | head -5
$PY - "$R" <<'PYEOF'
import glob, json, os, sys
for r in sorted(glob.glob(os.path.join(sys.argv[1], "*", "results.json"))):
    res = json.load(open(r))
    for p in res["phases"]:
        b = p.get("compression", {}).get("bilevel", {})
        print(os.path.basename(os.path.dirname(r)), "phase", p.get("phase"), "cnn", p.get("cnn", {}).get("top1"),
              "exemplars", p.get("memory", {}).get("exemplars"), "seconds", p.get("seconds"), "bilevel", json.dumps(b))
PYEOF
say "5. stream_decode device: resize chunks on the GPU"
timeout -k 10 $(limit 30) $PY exps/bench_stream_decode.py --files "$D/imagenette-sub/train/*/*" --long_side 500 \
    --sizes 224 256 --chunks 0 18 20 22 24 --device $DEV --out $R/bench-stream-decode.json \
    > $R/bench-stream-decode.out 2>&1; say "5 rc $?"; pack
tail -12 $R/bench-stream-decode.out
say "6. two phases of step 4 streamed"
timeout -k 10 $(limit 70) $PY main.py $I224 --set checkpoints=none --set compression=cim --set num_phases=2 \
    --set in_memory=false --set num_workers=4 --output $R/i224-streamed-cim > $R/i224-streamed-cim.out 2>&1
say "6 rc $?"; pack
grep -h "no CUDA graph\|Traceback\|Error\|graph_replays" $R/i224-streamed-cim.out | head -5
say "7. torch.compile reduce-overhead, resnet32 at 32 px"
timeout -k 10 $(limit 110) $PY exps/bench_throughput.py --config cim-lucir-tinyimagenet50 --set data_root=$D/tiny32 \
    --set device=$DEV --set convnet_type=resnet32 --set batch_size=128 --set init_cls=10 --set compression=none \
    $B7_ARGS --compare reduce-overhead:compile=true,compile_mode=reduce-overhead \
    --out $R/bench-resnet32-reduce-overhead.json > $R/bench-resnet32-reduce-overhead.out 2>&1; say "7 rc $?"; pack
grep -A8 "^| row" $R/bench-resnet32-reduce-overhead.out
say "done"
