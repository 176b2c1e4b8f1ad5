"""The ``finetune`` stage, backend ``hf``: SFT, LoRA, QLoRA and DPO with trl + peft + bitsandbytes.

``operator.run`` is the entrypoint; ``sft`` and ``dpo`` each own one trainer; ``_train`` holds the
functions they share, ``_ray_train`` the data-parallel launch, ``_checkpoints`` the durable,
resumable checkpoint directory and ``_job`` the picklable job every worker runs. Importing this
package imports nothing heavy.
"""
