#!/usr/bin/env bash
# Fine-tune understanding only (i2t, v2t). Knobs: see scripts/launch.sh and the README.
# The mixture and switches are CONFIG_FILE's (here datasets/multi_und.yaml, model.visual_gen: false); a knob set
# overrides them (with another CONFIG_FILE, VISUAL_GEN=false leaves the generation path out).
CONFIG_FILE=${CONFIG_FILE:-$(dirname "$0")/../configs/multi_und.yaml}
source "$(dirname "$0")/launch.sh"
