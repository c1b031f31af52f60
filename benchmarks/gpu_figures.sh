#!/usr/bin/env bash
# The GPU figures of docs/performance.md ("On a GPU") in one run, since a lent GPU's minutes are
# few: the real `train` command against the bare loop (benchmarks/train_at_scale.py) for SD 1.5 at
# 512 px and SDXL at 1024 px, fp16, gradient checkpointing, 8-bit AdamW, batch 1; then the
# black-image experiment on the shipped base at 64 x 64 latents (128 px; its own size is 32 x 32).
# Each part has its own time limit, so one that fails or runs long leaves the others' figures.
#
#   bash benchmarks/gpu_figures.sh OUT_DIR
#
# Writes OUT_DIR/gpu-figures.log (everything printed, the card and package versions first), one
# JSON per scale run and the experiment's results.json and grid.
set -u
out=${1:-gpu-figures}
mkdir -p "$out"
log="$out/gpu-figures.log"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
work=$(mktemp -d)

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, its output into the log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit $limit s): $*" | tee -a "$log"
  local start=$SECONDS
  # tqdm's bars redraw with carriage returns: one line each, the redraws dropped
  timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep --line-buffered -v -E '(it/s|s/it)\]$' | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
"$python" - <<'EOF' 2>&1 | tee -a "$log"
import importlib.metadata as m, torch, datasets, diffusers
print("torch", torch.__version__, "CUDA", torch.version.cuda, "|",
      ", ".join(f"{p} {m.version(p)}" for p in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "pyarrow")))
EOF
optimizer=adamw8bit
if ! "$python" -c "import bitsandbytes as bnb, torch
p = torch.nn.Parameter(torch.ones(4096, device='cuda'))
o = bnb.optim.AdamW8bit([p]); p.grad = torch.ones_like(p); o.step(); torch.cuda.synchronize()" >>"$log" 2>&1; then
  optimizer=adamw
  echo "bitsandbytes' AdamW8bit does not run here: the scale runs use --optimizer adamw" | tee -a "$log"
fi
scale="$python benchmarks/train_at_scale.py --gradient_checkpointing --optimizer $optimizer --cache $work/models"
part sd15-512 ${SD15_LIMIT:-160} $scale --arch sd15 --steps 12 --json "$out/sd15-512.json"
part sdxl-1024 ${SDXL_LIMIT:-240} $scale --arch sdxl --steps 8 --json "$out/sdxl-1024.json"
part black-image-64x64-latents ${BLACK_LIMIT:-120} "$python" -m dreambooth_offset experiment black-image \
  --resolution 128 --output_dir "$work/black-image"
cp "$work/black-image/results.json" "$out/black-image-128px-results.json" 2>/dev/null
cp "$work/black-image/grid-0.png" "$out/black-image-128px-grid.png" 2>/dev/null
cp "$work/black-image/report.md" "$out/black-image-128px-report.md" 2>/dev/null
rm -rf "$work"
