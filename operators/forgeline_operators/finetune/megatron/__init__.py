"""The ``megatron`` fine-tuning backend: megatron-core ``GPTModel`` with real tensor, pipeline and data
parallelism (gloo on CPU through :mod:`._cpu_compat`, NCCL on GPUs), HF Llama ⇄ megatron conversion,
SFT / TP-aware LoRA / DPO, resharding ``dist_checkpointing`` checkpoints, and HF (+ PEFT) outputs so
downstream stages never see megatron formats. Entry point: :func:`.operator.run`."""
