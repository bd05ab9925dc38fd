#!/usr/bin/env bash
# CIM's bilevel step on one GPU (issue 10): eager vs replayed as a CUDA graph, what it costs a
# training phase, and whole CIM runs whose later phases record it too. One command on a lent
# machine (the data as for exps/gpu_evidence.sh: `python exps/make_devpack.py` first):
#
#   OUT=logs/gpu bash exps/gpu_cim_speed.sh      # from the repository root
#
#   1. exps/bench_bilevel.py, ResNet-18 at 224 px on the Imagenette subset, phase 0 with 10 classes
#      (5 bilevel iterations per epoch), bf16 training: eager and graphed rows for the float32 step
#      and the bf16 autocast step (bilevel_autocast), each with the PAUs differentiated by autograd
#      and by the fused Triton kernels (pau_kernel), each profiled, and every row's φ against the
#      first row's;
#   2. configs/cim-lucir-imagenette-224.json on the subset with compression cim (5 phases: the
#      graph is recorded again in every phase, with LUCIR's distillation in the loss from phase 1);
#      then its first 2 phases streamed (in_memory false, 4 workers): the graph records while a
#      loader's pin-memory thread fills the bilevel batches;
#   3. DER and FOSTER with cim, tiny-imagenet-50 at 32 px, two phases of two epochs (their graphs
#      in phase 1 hold the old backbones);
#   4. exps/bench_stream_decode.py: stream_decode "device" finishing a batch of 256 subset files
#      re-encoded to 8 shapes with a 500 px long side, by resize chunk (2^0: image by image; the
#      GPU default 2^24 is not measured yet);
#   5. exps/bench_throughput.py, float32: plain loop, framework without CIM, with CIM (graphed
#      bilevel step, the default), with the eager step (bilevel_cuda_graph false) and with the
#      graphed step on the fused PAU kernels (pau_kernel fused);
#   6. the same bench for resnet32 at 32 px, bf16: eager beside compile_mode "reduce-overhead"
#      (torch.compile with CUDA graphs) for the rest of the budget.
# Each run's results.json says per phase how many iterations were replayed (graph_replays) and why
# recording failed where it did (graph_fallback).
set -u
BUDGET=${BUDGET:-540}
B1_ARGS=${B1_ARGS:---epochs 3 --precision bf16 --pau_kernels autograd fused}
C_ARGS=${C_ARGS:-}
T_ARGS=${T_ARGS:---set init_epochs=2 --set epochs=2}
B4_ARGS=${B4_ARGS:---epochs 4 --precision fp32}
B5_ARGS=${B5_ARGS:---epochs 4 --precision bf16}
source "$(dirname "$0")/gpu_lib.sh"
I224="--config cim-lucir-imagenette-224 --set data_root=$D/imagenette-sub --set device=$DEV"
say "1. bilevel step alone: eager vs graphed"
timeout $(limit 150) $PY exps/bench_bilevel.py $I224 --set init_cls=10 $B1_ARGS --profile --out $R/bench-bilevel.json \
    > $R/bench-bilevel.out 2>&1; say "1 rc $?"
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
          "| device ms/it", prof.get("device_ms_per_step"), "busy", prof.get("device_busy"), "| saved MB",
          r.get("saved_for_backward_mb"), "| phi diff", r.get("phi_max_abs_diff"), "of", r.get("phi_max_abs_move"),
          "| replays", r.get("graph_replays"), r.get("graph_fallback") or "", r.get("error", ""))
PYEOF
say "2. cim-lucir-imagenette-224 with cim"
timeout $(limit 150) $PY main.py $I224 --set checkpoints=none --set compression=cim $C_ARGS \
    --output $R/i224-cim > $R/i224-cim.out 2>&1; say "2 rc $?"
timeout $(limit 70) $PY main.py $I224 --set checkpoints=none --set compression=cim --set num_phases=2 \
    --set in_memory=false --set num_workers=4 --output $R/i224-streamed-cim > $R/i224-streamed-cim.out 2>&1
say "2 streamed rc $?"
say "3. DER and FOSTER with cim, two phases at 32 px"
for m in der foster; do
    extra=""; [ $m = foster ] && extra="--set compression_epochs=2"
    timeout $(limit 50) $PY main.py --config $m-tinyimagenet50 $extra --set data_root=$D/tiny32 --set device=$DEV \
        --set init_cls=25 --set increment=25 --set compression=cim --set checkpoints=none $T_ARGS \
        --output $R/$m-cim > $R/$m-cim.out 2>&1; say "3 $m rc $?"
done
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
say "4. stream_decode device: resize chunks on the GPU"
timeout $(limit 40) $PY exps/bench_stream_decode.py --files "$D/imagenette-sub/train/*/*" --long_side 500 \
    --sizes 224 256 --chunks 0 18 20 22 24 --device $DEV --out $R/bench-stream-decode.json \
    > $R/bench-stream-decode.out 2>&1; say "4 rc $?"
cat $R/bench-stream-decode.out | tail -12
say "5. a training phase with CIM, float32: graphed vs eager bilevel step"
timeout $(limit 130) $PY exps/bench_throughput.py $I224 --set init_cls=10 --set compression=none $B4_ARGS \
    --compare cim:compression=cim --compare cim-eager:compression=cim,bilevel_cuda_graph=false \
    --compare cim-fused:compression=cim,pau_kernel=fused \
    --out $R/bench-cim-rows-fp32.json > $R/bench-cim-rows-fp32.out 2>&1; say "5 rc $?"
grep -A8 "^| row" $R/bench-cim-rows-fp32.out
say "6. torch.compile reduce-overhead, resnet32 at 32 px"
timeout $(limit 110) $PY exps/bench_throughput.py --config cim-lucir-tinyimagenet50 --set data_root=$D/tiny32 \
    --set device=$DEV --set convnet_type=resnet32 --set batch_size=128 --set init_cls=10 --set compression=none \
    $B5_ARGS --compare reduce-overhead:compile=true,compile_mode=reduce-overhead \
    --out $R/bench-resnet32-reduce-overhead.json > $R/bench-resnet32-reduce-overhead.out 2>&1; say "6 rc $?"
grep -A8 "^| row" $R/bench-resnet32-reduce-overhead.out
tar czf "$OUT/runs.tar.gz" --exclude='*.pt' --exclude='exemplars_phase_*.png' "$R"
say "done"
