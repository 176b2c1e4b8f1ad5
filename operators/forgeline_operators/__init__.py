"""Forgeline's built-in operators: one folder per stage kind, each with its stage model (``spec``), a
``run(ctx)`` entrypoint and its plan hooks.

``operator_specs()`` is what the ``forgeline.operators`` entry point returns: data only (kind,
backend, version, capabilities, the dotted paths of the stage model, the entrypoint and the plan
hooks), so validating and planning never import torch. The order here is the order of the kinds in
the workflow union and in ``forgeline schema``.
"""

from __future__ import annotations

from forgeline.registry import Capabilities, OperatorSpec

__all__ = ["operator_specs"]


def operator_specs() -> list[OperatorSpec]:
    return [
        OperatorSpec(
            kind="finetune",
            stage_model="forgeline_operators.finetune.spec:FinetuneStage",
            backend="hf",
            entrypoint="forgeline_operators.finetune.operator:run",
            version="2",  # 2: chat-template rendering of prompt/completion and preference rows
            capabilities=Capabilities(
                cpu=True,
                gpu=True,
                data_parallel=True,
                tensor_parallel=False,
                pipeline_parallel=False,
                spawns_workers=True,
            ),
            description="SFT, LoRA, QLoRA (bitsandbytes NF4) and DPO with trl + peft; dp over Ray Train.",
            resources="forgeline_operators.finetune.plan:resources",
            estimate="forgeline_operators.finetune.plan:estimate",
            check="forgeline_operators.finetune.plan:check",
        ),
        OperatorSpec(
            kind="finetune",
            stage_model="forgeline_operators.finetune.spec:FinetuneStage",
            backend="megatron",
            entrypoint="forgeline_operators.finetune.megatron.operator:run",
            version="2",  # 2: chat-template rendering (data.py)
            capabilities=Capabilities(
                cpu=True,
                gpu=True,
                data_parallel=True,
                tensor_parallel=True,
                pipeline_parallel=True,
                spawns_workers=True,
            ),
            description="megatron-core GPTModel SFT / TP-aware LoRA; TP x PP x DP on Ray Train; HF/PEFT out.",
            resources="forgeline_operators.finetune.plan:resources",
            estimate="forgeline_operators.finetune.plan:estimate",
            check="forgeline_operators.finetune.plan:check",
        ),
        OperatorSpec(
            kind="finetune",
            stage_model="forgeline_operators.finetune.spec:FinetuneStage",
            backend="nemo",
            entrypoint="forgeline_operators.finetune.nemo.operator:run",
            version="1",
            capabilities=Capabilities(
                cpu=False,
                gpu=True,
                requires_gpu=True,
                data_parallel=True,
                tensor_parallel=True,
                pipeline_parallel=True,
                # The GPUs belong to the container job it submits; the stage task only coordinates.
                spawns_workers=True,
            ),
            description="NeMo containers: Megatron-Bridge SFT/LoRA, NeMo-RL DPO; Ray job, RayJob or Job.",
            describe="forgeline_operators.finetune.nemo.describe:describe",
            render="forgeline_operators.finetune.nemo.render_k8s:render",
            resources="forgeline_operators.finetune.plan:resources",
            estimate="forgeline_operators.finetune.plan:estimate",
            check="forgeline_operators.finetune.plan:check",
        ),
        OperatorSpec(
            kind="evaluate",
            stage_model="forgeline_operators.evaluate.spec:EvaluateStage",
            entrypoint="forgeline_operators.evaluate.operator:run",
            # 2: chat-template rendering, paired intervals; 3: per-row sums + eval-set digest (promotion)
            version="3",
            capabilities=Capabilities(cpu=True, gpu=True),
            description="Perplexity, token accuracy and exact match with transformers; gates.",
            resources="forgeline_operators.evaluate.plan:resources",
            estimate="forgeline_operators.evaluate.plan:estimate",
        ),
        OperatorSpec(
            kind="quantize",
            stage_model="forgeline_operators.quantize.spec:QuantizeStage",
            entrypoint="forgeline_operators.quantize.operator:run",
            version="2",  # 2: calibration/gate rows in the dataset's rendering
            capabilities=Capabilities(cpu=True, gpu=True, gpu_only_options=frozenset({"nvfp4"})),
            description="ModelOpt PTQ (HF + TRT-LLM checkpoints) or NNCF OpenVINO weight compression; gated.",
            resources="forgeline_operators.quantize.plan:resources_quantize",
            estimate="forgeline_operators.quantize.plan:estimate_quantize",
            check="forgeline_operators.quantize.plan:check_quantize",
        ),
        OperatorSpec(
            kind="build",
            stage_model="forgeline_operators.build.spec:BuildStage",
            backend="openvino",
            entrypoint="forgeline_operators.build.operator:run_openvino",
            version="1",
            capabilities=Capabilities(cpu=True, gpu=True, target_bound=True),
            description="OpenVINO IR (optimum-intel export, NNCF weights, tokenizer IRs) for OpenVINO GenAI.",
            resources="forgeline_operators.build.plan:resources",
            check="forgeline_operators.build.plan:check",
        ),
        OperatorSpec(
            kind="build",
            stage_model="forgeline_operators.build.spec:BuildStage",
            backend="tensorrt-llm",
            entrypoint="forgeline_operators.build.operator:run_tensorrt_llm",
            version="1",
            capabilities=Capabilities(
                cpu=True, gpu=True, tensor_parallel=True, pipeline_parallel=True, target_bound=True
            ),
            description="trtllm-build command + LLM-API YAML, validated; builds where tensorrt_llm imports",
            render="forgeline_operators.build.render_k8s:render",
            resources="forgeline_operators.build.plan:resources",
            check="forgeline_operators.build.plan:check",
        ),
        OperatorSpec(
            kind="register",
            stage_model="forgeline_operators.register.spec:RegisterStage",
            entrypoint="forgeline_operators.register.operator:run",
            version="2",  # 2: upstream quality metrics as version tags
            capabilities=Capabilities(cpu=True, gpu=True),
            description="Register a directory as an MLflow model version (by reference) and set an alias.",
            cache_check="forgeline_operators.register.operator:cache_check",
        ),
        OperatorSpec(
            kind="serve",
            stage_model="forgeline_operators.serve.spec:ServeStage",
            check="forgeline_operators.serve.plan:check",
            describe="forgeline_operators.serve.plan:describe",
            entrypoint="forgeline_operators.serve.operator:run",
            version="2",
            capabilities=Capabilities(cpu=True, gpu=True),
            description=(
                "Triton model repository: OpenVINO GenAI continuous batching in a python model (CPU), "
                "TensorRT-LLM inflight_batcher_llm / llmapi (GPU)."
            ),
        ),
        OperatorSpec(
            kind="deploy",
            stage_model="forgeline_operators.deploy.spec:DeployStage",
            backend="triton",
            entrypoint="forgeline_operators.deploy.operator:run",
            version="1",
            # gpu=True: on `target: kubernetes` the stage only applies a ModelEndpoint; its pods get GPUs.
            capabilities=Capabilities(cpu=True, gpu=True, target_bound=True),
            description="Local endpoint: detached tritonserver + OpenAI-compatible front.",
            render="forgeline_operators.deploy.render_k8s:render",
            cache_check="forgeline_operators.deploy.operator:cache_check",
        ),
        OperatorSpec(
            kind="deploy",
            stage_model="forgeline_operators.deploy.spec:DeployStage",
            backend="nim",
            entrypoint="forgeline_operators.deploy.operator:run",
            version="1",
            capabilities=Capabilities(cpu=True, gpu=True, target_bound=True),
            description="Kubernetes only: a ModelEndpoint whose revisions are NIMServices (NIM operator).",
            render="forgeline_operators.deploy.render_k8s:render",
        ),
        OperatorSpec(
            kind="promote",
            stage_model="forgeline_operators.promote.spec:PromoteStage",
            entrypoint="forgeline_operators.promote.operator:run",
            version="1",
            capabilities=Capabilities(cpu=True, gpu=True, target_bound=True),
            cache_check="forgeline_operators.promote.operator:cache_check",
            description=(
                "Gates (metrics vs production/parent, quantization delta, SLO benchmark, approval), then "
                "the production endpoint switches to the version and the alias moves."
            ),
        ),
        OperatorSpec(
            kind="distill",
            stage_model="forgeline_operators.distill.spec:DistillStage",
            entrypoint="forgeline_operators.distill.operator:run",
            version="2",  # 2: chat-template rendering (data.py)
            capabilities=Capabilities(cpu=True, gpu=False),
            description="Distillation: KL on T-scaled teacher logits (+ hard labels) into a student.",
            estimate="forgeline_operators.distill.plan:estimate",
        ),
        OperatorSpec(
            kind="prune",
            stage_model="forgeline_operators.prune.spec:PruneStage",
            entrypoint="forgeline_operators.prune.operator:run",
            version="2",  # 2: calibration rows in the dataset's rendering
            capabilities=Capabilities(cpu=True, gpu=False),
            description="Structured pruning (MLP width, GQA-consistent heads, depth) by activation score.",
            estimate="forgeline_operators.prune.plan:estimate",
        ),
    ]
