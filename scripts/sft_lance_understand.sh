#!/usr/bin/env bash
# Fine-tune understanding only (i2t, v2t). Knobs: see scripts/launch.sh and the README.
CONFIG_FILE=${CONFIG_FILE:-configs/multi_und.yaml}
DATASET_CONFIG_FILE=${DATASET_CONFIG_FILE:-configs/datasets/multi_und.yaml}
VISUAL_UND=${VISUAL_UND:-true}
VISUAL_GEN=${VISUAL_GEN:-false}
source "$(dirname "$0")/launch.sh"
