#!/usr/bin/env bash
# Fine-tune on the unified mixture (all six tasks). Knobs: see scripts/launch.sh and the README.
# The mixture and switches are CONFIG_FILE's (here datasets/unified.yaml, both paths); a knob set overrides them.
CONFIG_FILE=${CONFIG_FILE:-$(dirname "$0")/../configs/unified.yaml}
source "$(dirname "$0")/launch.sh"
