"""The ``nemo`` fine-tuning backend: Megatron-Bridge (sft, lora) and NeMo-RL (dpo) as container jobs.

Pure renderers (:mod:`.render`: trainer configs and the job script; :mod:`.launch`: Ray job, KubeRay
RayJob, Kubernetes Job), validation against the real schemas (:mod:`.keys`, :mod:`.validate`) and the
stage entrypoint (:mod:`.operator`). Importing this package imports neither torch nor ray.
"""
