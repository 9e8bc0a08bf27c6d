#!/usr/bin/env bash
# Fine-tune generation only (t2i, t2v, i2i, v2v). Knobs: see scripts/launch.sh and the README.
# The mixture and switches are CONFIG_FILE's (here datasets/multi_gen.yaml, both paths: the ViT encodes edit
# sources); a knob set overrides them.
CONFIG_FILE=${CONFIG_FILE:-$(dirname "$0")/../configs/multi_gen.yaml}
source "$(dirname "$0")/launch.sh"
