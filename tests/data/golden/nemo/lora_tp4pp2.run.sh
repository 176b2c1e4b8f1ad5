#!/bin/bash
# Rendered by Forgeline for wf-tune; runs in the trainer image on every node of the job.
set -euo pipefail
NODE_RANK="${JOB_COMPLETION_INDEX:-${NODE_RANK:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"  # nodes=1: the Job sets it to pod 0
export NODE_RANK MASTER_ADDR
if [ "$NODE_RANK" = 0 ]; then
  python /opt/Megatron-Bridge/examples/conversion/convert_checkpoints.py import --hf-model meta-llama/Meta-Llama-3-70B --megatron-path /mnt/forgeline/wf/work/megatron_base --torch-dtype bfloat16
  touch /mnt/forgeline/wf/work/.imported
else
  until [ -f /mnt/forgeline/wf/work/.imported ]; do sleep 10; done
fi
torchrun --nnodes=1 "--node_rank=${NODE_RANK}" --nproc_per_node=8 "--master_addr=${MASTER_ADDR}" --master_port=29500 /opt/Megatron-Bridge/scripts/training/run_recipe.py --recipe llama3_70b_peft_config --dataset llm-finetune-preloaded --seq_length 4096 --peft_scheme lora model.tensor_model_parallel_size=4 model.pipeline_model_parallel_size=2 model.seq_length=4096 mixed_precision=bf16_mixed train.train_iters=100 train.global_batch_size=8 train.micro_batch_size=1 optimizer.lr=0.0001 optimizer.min_lr=0.0 optimizer.weight_decay=0.0 scheduler.lr_decay_style=cosine scheduler.lr_warmup_iters=0 scheduler.lr_decay_iters=100 rng.seed=0 dataset.dataset_root=/mnt/forgeline/wf/data dataset.seq_length=4096 dataset.do_validation=true dataset.do_test=false checkpoint.pretrained_checkpoint=/mnt/forgeline/wf/work/megatron_base checkpoint.save=/mnt/forgeline/wf/work/checkpoints checkpoint.save_interval=50 checkpoint.load=/mnt/forgeline/wf/work/checkpoints model.recompute_granularity=full model.recompute_method=uniform model.recompute_num_layers=1 peft.dim=16 peft.alpha=32.0 peft.dropout=0.05 'peft.target_modules=[linear_qkv,linear_proj,linear_fc1,linear_fc2]' logger.mlflow_tracking_uri=http://mlflow.mlops:5000 logger.mlflow_experiment=wf logger.mlflow_run_name=finetune
if [ "$NODE_RANK" = 0 ]; then
  python /opt/Megatron-Bridge/examples/conversion/adapter/export_adapter.py --hf-model-path meta-llama/Meta-Llama-3-70B --lora-checkpoint /mnt/forgeline/wf/work/checkpoints --output /mnt/forgeline/wf/out/adapter
fi
