#!/bin/bash
# Rendered by Forgeline for wf-tune; runs in the trainer image on every node of the job.
set -euo pipefail
NODE_RANK="${JOB_COMPLETION_INDEX:-${NODE_RANK:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"  # nodes=1: the Job sets it to pod 0
export NODE_RANK MASTER_ADDR
cd /opt/nemo-rl
uv run python examples/run_dpo.py --config /mnt/forgeline/wf/job/dpo.yaml
if [ "$NODE_RANK" = 0 ]; then
  uv run --extra mcore python examples/converters/convert_megatron_to_hf.py --config "/mnt/forgeline/wf/work/checkpoints/$(ls /mnt/forgeline/wf/work/checkpoints | grep '^step_' | sort -t_ -k2 -n | tail -1)/config.yaml" --megatron-ckpt-path "/mnt/forgeline/wf/work/checkpoints/$(ls /mnt/forgeline/wf/work/checkpoints | grep '^step_' | sort -t_ -k2 -n | tail -1)/policy/weights/iter_0000000" --hf-ckpt-path /mnt/forgeline/wf/out/merged
fi
