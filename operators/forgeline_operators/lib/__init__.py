"""Helpers several stage kinds share, one module per concern: a leaf below every operator folder, so
stage folders need not import each other for them (``lint-imports`` holds lib to importing no stage
folder and not :mod:`forgeline_operators.kube`).

Statistics (``intervals``), scoring (``scoring``), training rows (``train_rows``), loading checkpoints
(``hf_checkpoint``), ModelOpt quantization (``modelopt_ptq``) and the Kubernetes plumbing
(``kube_client``, ``kube_crd``, ``kube_conditions``, ``kube_builtins``). What is particular to a serving
engine (the OpenVINO IR export, TensorRT-LLM settings) lives in that engine's folder under
:mod:`forgeline_operators.engines`, one layer above this one.
"""
