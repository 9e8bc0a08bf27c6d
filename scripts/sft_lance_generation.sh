#!/usr/bin/env bash
# Fine-tune generation only (t2i, t2v, i2i, v2v). Knobs: see scripts/launch.sh and the README.
CONFIG_FILE=${CONFIG_FILE:-configs/multi_gen.yaml}
DATASET_CONFIG_FILE=${DATASET_CONFIG_FILE:-configs/datasets/multi_gen.yaml}
VISUAL_UND=${VISUAL_UND:-true}
VISUAL_GEN=${VISUAL_GEN:-true}
source "$(dirname "$0")/launch.sh"
