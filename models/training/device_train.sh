#!/usr/bin/env bash
# A training run of the learned codec's network on a lent GPU, in one call of the `device`
# tool. Why a script: a lent machine has minutes, reaches no registry and has no pydicom, so
# everything it needs is prepared here first and carried with the working tree in .device/
# (git-ignored): the training and validation images packed into one file (the held-out images
# never leave this machine: they are measured here, with bench/learned.py, after the run) and
# the constriction wheel for the device's Python 3.12 (the coding tables' module imports it).
# Torch, numpy, tqdm and onnx are on its image.
#
#   here:        bash models/training/device_train.sh prepare
#   the device:  run(command="bash models/training/device_train.sh run", carry=[".device"])
#   here again:  adopt the returned model only if its validation figures (run/summary.json, and
#                the whole validation images) beat the shipped model's; then retire the old one
#                to models/retired/, measure with bench/learned.py --write-heldout and update
#                models/MODEL_CARD.md.
#
# Settings (environment): FLOAT_STEPS, QAT_STEPS, BATCH, CHANNELS, BLOCKS, INNER, LR, QAT_LR,
# THREADS, DEVICE (cuda), PYTHON (python3), DEVICE_DIR (.device: what prepare writes),
# TIME_LIMIT (seconds, default 480: the run is then interrupted and checkpointed, inside the
# call's 10 minutes), OUT (the results; the device sets it: run/ holds summary.json and
# final.pt or a checkpoint, model/ the exported files).
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-}
PYTHON=${PYTHON:-python3}
dir=${DEVICE_DIR:-.device}

case "$mode" in
prepare)
    mkdir -p "$dir/wheels"
    .venv/bin/python -m compacs.models.training.data "$dir/images.npz"
    .venv/bin/pip download -q --no-deps --only-binary :all: --python-version 3.12 \
        --platform manylinux_2_17_x86_64 -d "$dir/wheels" constriction
    ls -l "$dir" "$dir/wheels"
    ;;
run)
    : "${OUT:?OUT must name a folder for the results (the device tool sets it)}"
    [ -f "$dir/images.npz" ] || { echo "no $dir/images.npz: run 'bash $0 prepare' here first" >&2; exit 2; }
    site=$(mktemp -d)
    # The package as compacs.models without installing compacs (whose other dependencies the
    # device does not have): models/ (training/ and the serving modules it reads) is all that
    # training and export import.
    mkdir -p "$site/compacs"
    touch "$site/compacs/__init__.py"
    ln -s "$PWD/models" "$site/compacs/models"
    if ! "$PYTHON" -c "import constriction" 2>/dev/null; then
        "$PYTHON" -m pip install -q --no-deps --no-index --target "$site" "$dir"/wheels/*.whl
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    mkdir -p "$OUT/run"
    # A run stopped by TIME_LIMIT in an earlier call resumes when its checkpoint is carried
    # back as $dir/checkpoint.pt (with the same settings).
    [ -f "$dir/checkpoint.pt" ] && cp "$dir/checkpoint.pt" "$OUT/run/checkpoint.pt"
    status=0
    # SIGINT makes train checkpoint and exit 130; --preserve-status keeps that code (timeout's
    # own 124 reads as a killed call to the device tool), and -k ends a run that ignores it.
    timeout --preserve-status -k 30 -s INT "${TIME_LIMIT:-480}" "$PYTHON" -m compacs.models.training.train \
        --images "$dir/images.npz" --device "${DEVICE:-cuda}" --work "$OUT/run" \
        --float-steps "${FLOAT_STEPS:-40000}" --qat-steps "${QAT_STEPS:-10000}" \
        --batch "${BATCH:-16}" --channels "${CHANNELS:-40}" --blocks "${BLOCKS:-5}" \
        --inner "${INNER:-1}" --lr "${LR:-0.002}" --qat-lr "${QAT_LR:-0.0003}" \
        --threads "${THREADS:-8}" || status=$?
    if [ "$status" = 0 ] && [ -f "$OUT/run/final.pt" ]; then
        "$PYTHON" -m compacs.models.training.export --weights "$OUT/run/final.pt" --out "$OUT/model"
        rm -f "$OUT/run/checkpoint.pt" # 8 files come back from $OUT: final.pt replaces it
    else
        echo "stopped before the last step (exit $status): copy the returned run/checkpoint.pt" \
            "to $dir/checkpoint.pt here and run again with the same settings to continue" >&2
    fi
    exit "$status"
    ;;
*)
    echo "usage: bash $0 prepare (here) | run (on the device, with .device carried)" >&2
    exit 2
    ;;
esac
