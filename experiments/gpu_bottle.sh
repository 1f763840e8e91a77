#!/usr/bin/env bash
# The GPU checks of issues 10 and 11 on MVTec AD bottle, for a one-GPU machine. Data in MVTec layout
# under $ANOMALIB_LITE_DATA (mvtec_ad/bottle, dtd_subset); logs and run folders (without
# checkpoints, tarred) land in OUT.
#   experiments/gpu_bottle.sh distillation OUT        STFPM (100 epochs, batch 32) and Reverse Distillation
#                                                     (200 epochs, batch 16) on EfficientNet-Lite2, 256 px, side by side
#   experiments/gpu_bottle.sh draem OUT EPOCHS        experiment=draem_paper (256 px, full widths, batch 8, DTD)
#   experiments/gpu_bottle.sh uninformed_students OUT  128 px, teachers distilled on dtd_subset (US_TEACHER_STEPS
#                                                     of 64 patches cut from 128 px textures), US_EPOCHS epochs, then the paper's single-scale
#                                                     and M = 1 rescorings; the teachers are cached in
#                                                     $ANOMALIB_LITE_CACHE/teachers (point it into OUT to keep them)
# MAX_TIME (Lightning's dd:hh:mm:ss) stops training early and still tests the best epoch so far.
set -euo pipefail
part=$1 out=$2
python=${PYTHON:-python3}
common="trainer=${TRAINER:-gpu} dataset.category=bottle dataset.num_workers=${WORKERS:-5} +trainer.max_time=${MAX_TIME:-00:00:08:00}"
train() {  # name, overrides...: a run in OUT/name, its log in OUT/name.log
  local name=$1; shift
  $python -m anomalib_lite "$@" $common hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1
}
pack() {  # name: tar the run (and its retests) without checkpoints, then remove it
  local name=$1
  tar --exclude='*.ckpt' -czf "$out/$name.tgz" -C "$out" $(cd "$out" && ls -d "$name" "$name"_retest_* 2>/dev/null) || true
  if [ "$(stat -c %s "$out/$name.tgz")" -gt 15000000 ]; then  # the device tool returns files up to 16 MB
    tar --exclude='*.ckpt' --exclude='*.png' -czf "$out/$name.tgz" -C "$out" $(cd "$out" && ls -d "$name" "$name"_retest_* 2>/dev/null) || true; fi
  rm -rf "${out:?}/$name" "${out:?}/$name"_retest_*
}
run() {  # name, overrides...: train and pack
  local name=$1 rc=0
  train "$@" || rc=$?
  pack "$name"
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
  uninformed_students)
    rc=0
    train uninformed_students method=uninformed_students dataset=mvtec dataset.image_size=${US_IMAGE_SIZE:-128} dataset.crop_size=null \
      dataset.batch_size=8 method.epochs=${US_EPOCHS:-20} method.teacher.steps=${US_TEACHER_STEPS:-1000} \
      method.teacher.batch_size=64 method.teacher.image_size=${US_TEACHER_IMAGE_SIZE:-128} 'method.teacher.images=${paths.data_dir}/dtd_subset' || rc=$?
    tail -n 4 "$out/uninformed_students.log"
    if [ $rc = 0 ]; then
      for knob in 'score_patch_sizes=[17]' 'score_patch_sizes=[33]' 'score_patch_sizes=[65]' score_students=1; do
        $python experiments/retest.py "$out/uninformed_students" "$knob" 2>&1 | tail -n 3; done
    fi
    pack uninformed_students
    exit $rc ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
