"""Helpers several stage kinds share, one module per concern: a leaf below every operator folder, so
stage folders need not import each other for them (``lint-imports`` holds lib to importing no stage
folder and not :mod:`forgeline_operators.kube`).

Statistics (``intervals``), scoring (``scoring``), training rows (``train_rows``), loading checkpoints
(``hf_checkpoint``), ModelOpt quantization (``modelopt_ptq``), OpenVINO IR export (``openvino_ir``),
TensorRT-LLM settings (``trtllm``) and the Kubernetes plumbing (``kube_client``, ``kube_crd``,
``kube_conditions``, ``kube_builtins``).
"""
