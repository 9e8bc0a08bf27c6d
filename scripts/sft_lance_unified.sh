#!/usr/bin/env bash
# Fine-tune on the unified mixture (all six tasks). Knobs: see scripts/launch.sh and the README.
CONFIG_FILE=${CONFIG_FILE:-configs/unified.yaml}
DATASET_CONFIG_FILE=${DATASET_CONFIG_FILE:-configs/datasets/unified.yaml}
VISUAL_UND=${VISUAL_UND:-true}
VISUAL_GEN=${VISUAL_GEN:-true}
source "$(dirname "$0")/launch.sh"
