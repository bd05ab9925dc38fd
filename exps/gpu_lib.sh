# Shared set-up of the GPU evidence scripts (exps/gpu_evidence.sh, exps/gpu_cim_speed.sh): source it
# after setting BUDGET (seconds for all steps together). It sets OUT (files to bring back), R (the
# runs), D (the carried data, unpacked here: the device tool replaces a carried folder in every call),
# DEV, PY and T0, and defines
#   say TEXT   print TEXT after the seconds since the start
#   limit N    N seconds, or what is left of the budget if that is less (at least 5)
OUT=${OUT:-logs/gpu}
R=${RUNS:-logs/gpu-runs}
D=${DEVPACK:-.devpack}
DEV=${DEVICE:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT" "$R"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
limit() { local l=$(( BUDGET - ($(date +%s) - T0) )); [ "$1" -lt "$l" ] && l=$1; [ "$l" -lt 5 ] && l=5; echo $l; }
[ -f "$D/data.tar.gz" ] && tar xzf "$D/data.tar.gz" -C "$D"
nvidia-smi -L 2>/dev/null
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
