#!/usr/bin/env bash
# The GPU checks of issues 10 and 11 on MVTec AD bottle, for a one-GPU machine. Data in MVTec layout
# under $ANOMALIB_LITE_DATA (mvtec_ad/bottle, dtd_subset); logs and run folders (without
# checkpoints, tarred) land in OUT.
#   experiments/gpu_bottle.sh distillation OUT        STFPM (100 epochs, batch 32) and Reverse Distillation
#                                                     (200 epochs, batch 16) on EfficientNet-Lite2, 256 px, side by side
#   experiments/gpu_bottle.sh draem OUT EPOCHS        experiment=draem_paper (256 px, full widths, batch 8, DTD)
# MAX_TIME (Lightning's dd:hh:mm:ss) stops training early and still tests the best epoch so far.
set -euo pipefail
part=$1 out=$2
python=${PYTHON:-python3}
common="trainer=gpu dataset.category=bottle dataset.num_workers=${WORKERS:-5} +trainer.max_time=${MAX_TIME:-00:00:08:00}"
run() {  # name, overrides...
  local name=$1; shift
  local rc=0
  $python -m anomalib_lite "$@" $common hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1 || rc=$?
  tar -C "$out" --exclude='*.ckpt' -czf "$out/$name.tgz" "$name" || true
  if [ "$(stat -c %s "$out/$name.tgz")" -gt 15000000 ]; then  # the device tool returns files up to 16 MB
    tar -C "$out" --exclude='*.ckpt' --exclude='*.png' -czf "$out/$name.tgz" "$name"; fi
  rm -rf "${out:?}/$name"
  echo "$name: exit $rc"; tail -n 4 "$out/$name.log"
  return $rc
}
case $part in
  distillation)
    size="dataset=mvtec dataset.image_size=256 dataset.crop_size=null backbone=efficientnet_lite2"
    run stfpm method=stfpm $size dataset.batch_size=32 method.epochs=${STFPM_EPOCHS:-100} &
    run reverse_distillation method=reverse_distillation $size dataset.batch_size=16 method.epochs=${RD_EPOCHS:-200} &
    wait ;;
  draem)
    run draem experiment=draem_paper method.epochs=$3 ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
