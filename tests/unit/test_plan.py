"""The planner: order, resources, memory/compute estimates against hand-computed numbers, the checks
that block a run (missing operators, capabilities, fit), and cache keys with their explanations.

Everything runs against a registry built here and a ``builtin://x`` test double with a fixed
fingerprint and parameter count; no Ray, no MLflow.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from forgeline.artifacts import ModelStore, StageStore
from forgeline.plan import Plan, Planner, StagePlan, topological_order
from forgeline.plan._estimates import (
    GiB,
    ModelShape,
    finetune_memory,
    gpu_hours,
    lora_params,
    shape_from_config,
    shape_from_name,
    stage_params,
)
from forgeline.registry import Capabilities, ModelSource, OperatorRegistry, OperatorSpec
from forgeline.spec import LoadedWorkflow, Workflow, load_workflow

N8B = 8_030_261_248  # Llama-3-8B
LLAMA3_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
}
SFT_ROWS = "".join(
    json.dumps({"prompt": f"Repeat after me:\nword{i}", "completion": f"word{i}"}) + "\n" for i in range(8)
)


def op(kind: str, backend: str | None = None, version: str = "1", **caps: object) -> OperatorSpec:
    """A fake operator of ``kind`` with the given capabilities and the shipped kind's plan hooks (GPUs,
    estimates, checks are the kind's own, as a real operator of that kind would declare them)."""
    from forgeline.registry import default_registry

    shipped = default_registry().operator(kind, backend)
    return OperatorSpec(
        kind=kind,
        entrypoint=f"tests.fake:{kind}",
        version=version,
        backend=backend,
        capabilities=Capabilities(**caps),  # type: ignore[arg-type]
        resources=shipped.resources if shipped else None,
        estimate=shipped.estimate if shipped else None,
        check=shipped.check if shipped else None,
    )


def source(fingerprint: str = "a" * 64, parameters: int = 1_000_000) -> ModelSource:
    return ModelSource(
        name="x", fingerprint=lambda: fingerprint, materialize=lambda path: None, parameters=parameters
    )


def registry(*ops: OperatorSpec, model: ModelSource | None = None) -> OperatorRegistry:
    default_ops = (
        op("finetune", "hf", gpu=True, data_parallel=True),
        op(
            "finetune", "megatron", gpu=True, tensor_parallel=True, pipeline_parallel=True, data_parallel=True
        ),
        op("evaluate", gpu=True),
        op("quantize", gpu=True, gpu_only_options=frozenset({"fp8", "nvfp4"})),
        op("register", gpu=True),
    )
    return OperatorRegistry(ops or default_ops, [model or source()])


class Env:
    """A workflow directory and a Forgeline home under one tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "wf"
        self.dir.mkdir()
        self.home = tmp_path / "home"
        (self.dir / "sft.jsonl").write_text(SFT_ROWS)
        self.store = StageStore(self.home)

    def write(self, body: str, *, base: str = "builtin://x", model_extra: str = "") -> Path:
        text = (
            "name: demo\n"
            f"model: {{base: {json.dumps(base)}{model_extra}}}\n"
            "data:\n"
            "  sft: {path: sft.jsonl, format: sft}\n" + textwrap.dedent(body).strip() + "\n"
        )
        path = self.dir / "wf.yaml"
        path.write_text(text)
        return path

    def load(self, body: str, **kw: str) -> LoadedWorkflow:
        return load_workflow(self.write(body, **kw))

    def planner(self, body: str, reg: OperatorRegistry | None = None, **kw: str) -> Planner:
        reg = reg or registry()
        return Planner(self.load(body, **kw), reg, ModelStore(self.home, reg), self.store)

    def plan(self, body: str, reg: OperatorRegistry | None = None, **kw: str) -> Plan:
        return self.planner(body, reg, **kw).build()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def after(text: str, needle: str) -> tuple[int, int]:
    """1-based (line, col) just after the first ``needle`` in ``text``: where its value starts."""
    head = text[: text.index(needle) + len(needle)]
    return head.count("\n") + 1, len(head) - head.rfind("\n")


def problem_text(sp: StagePlan) -> list[str]:
    return [p.message + (f" ({p.hint})" if p.hint else "") for p in sp.problems]


# ------------------------------------------------------------------------------------ order


def test_topological_order_is_stable_by_declaration_order(env: Env) -> None:
    loaded = env.load(
        """
        stages:
          - {name: late, kind: evaluate, dataset: sft, needs: [early]}
          - {name: early, kind: evaluate, dataset: sft, needs: []}
          - {name: free, kind: evaluate, dataset: sft, needs: []}
          - {name: last, kind: evaluate, dataset: sft, needs: [free, late]}
        """
    )
    assert topological_order(loaded.workflow) == ["early", "late", "free", "last"]
    plan = Planner(loaded, registry(), ModelStore(env.home, registry()), env.store).build()
    assert [s.name for s in plan.stages] == ["early", "late", "free", "last"]
    assert [s.index for s in plan.stages] == [1, 0, 2, 3]  # positions in the YAML are kept


def test_topological_order_refuses_a_cycle() -> None:
    wf = Workflow.model_validate(
        {
            "name": "demo",
            "model": {"base": "builtin://x"},
            "stages": [
                {"name": "a", "kind": "evaluate", "dataset": "d", "needs": ["b"]},
                {"name": "b", "kind": "evaluate", "dataset": "d"},
            ],
        }
    )
    with pytest.raises(ValueError, match="dependency cycle among: a, b"):
        topological_order(wf)


# ------------------------------------------------------------------------------------ resources


FINETUNE_8GPU = """
resources: {device: gpu}
stages:
  - name: tune
    kind: finetune
    method: lora
    backend: megatron
    dataset: sft
    parallelism: {tp: 2, pp: 2, dp: 2}
  - {name: eval, kind: evaluate, dataset: sft}
  - {name: eval-2, kind: evaluate, dataset: sft, resources: {gpus: 3, cpus: 4}}
  - {name: register, kind: register, model: "${model}", registered_name: m}
"""


def test_gpus_are_tp_times_pp_times_dp_for_finetune_on_gpu(env: Env) -> None:
    plan = env.plan(FINETUNE_8GPU)
    assert {s.name: s.gpus for s in plan.stages} == {"tune": 8, "eval": 1, "eval-2": 3, "register": 0}
    assert plan.stage("eval-2").cpus == 4 and plan.stage("eval").cpus == 1
    assert plan.problems() == []


def test_no_gpus_on_cpu(env: Env) -> None:
    plan = env.plan(FINETUNE_8GPU.replace("device: gpu", "device: cpu"), registry(*_cpu_ops()))
    assert [s.gpus for s in plan.stages] == [0, 0, 3, 0]  # an explicit resources.gpus still wins


def _cpu_ops() -> tuple[OperatorSpec, ...]:
    return (
        op("finetune", "megatron", tensor_parallel=True, pipeline_parallel=True),
        op("evaluate"),
        op("register"),
    )


# ------------------------------------------------------------------------------------ estimates


def llama3_8b() -> ModelShape:
    return shape_from_config(LLAMA3_8B)


def test_llama3_8b_shape_and_lora_counts_match_published_numbers() -> None:
    shape = llama3_8b()
    assert shape.parameters == N8B
    assert lora_params(shape, 16, "all-linear") == 41_943_040
    assert lora_params(shape, 16, ["q_proj", "v_proj"]) == 6_815_744
    assert lora_params(shape, 16, ["q_proj", "no_such_module"]) == 32 * 16 * (4096 + 4096)


def test_shape_from_config_counts_like_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        tie_word_embeddings=False,
    )
    for tied in (False, True):
        cfg = transformers.LlamaConfig(**{**config, "tie_word_embeddings": tied})
        model = transformers.LlamaForCausalLM(cfg)
        assert shape_from_config(cfg.to_dict()).parameters == model.num_parameters(), f"tied={tied}"


def memory(method: str, **kw: object) -> dict[str, int]:
    args: dict[str, object] = dict(
        precision="bf16",
        lora_r=16,
        lora_targets="all-linear",
        lora_for_dpo=False,
        double_quant=True,
        seq_len=2048,
        micro_batch=1,
        gradient_checkpointing=False,
        tp=1,
        pp=1,
    )
    args.update(kw)
    return finetune_memory(llama3_8b(), method, **args).parts  # type: ignore[arg-type]


def activations(s: int, b: int, precision_bytes: int = 2) -> int:
    """Llama-3-8B's saved tensors per layer: 6h + 4h + 5I elements per token at tp1, times layers; the
    s x s attention probabilities (a*s more) only in fp32, where attention runs unfused."""
    h, inter, a, layers = 4096, 14336, 32, 32
    scores = a * s if precision_bytes == 4 else 0
    return int(layers * s * b * (10 * h + 5 * inter + scores) * precision_bytes)


def test_full_finetune_memory_is_16_bytes_per_param_plus_activations() -> None:
    parts = memory("sft")
    assert parts["weights + grads + adam"] == 16 * N8B
    assert parts["activations"] == activations(2048, 1)
    assert parts["logits"] == 2 * 4 * 2048 * 128256
    fp32 = memory("sft", precision="fp32")
    assert fp32["weights + grads + adam"] == 16 * N8B  # 4 + 4 + 8 in fp32 is 16 too
    assert fp32["activations"] == activations(2048, 1, precision_bytes=4)


def test_lora_memory_is_frozen_weights_plus_adapter_training_state() -> None:
    parts = memory("lora")
    assert parts["weights (frozen)"] == 2 * N8B
    assert parts["adapters + grads + adam"] == 16 * 41_943_040
    assert memory("lora", precision="fp32")["weights (frozen)"] == 4 * N8B


def test_qlora_memory_is_half_a_byte_per_param_plus_constants() -> None:
    parts = memory("qlora")
    assert parts["weights (nf4)"] == N8B // 2
    assert parts["quant constants"] == int(N8B * 0.127 / 8)
    assert memory("qlora", double_quant=False)["quant constants"] == int(N8B * 0.5 / 8)
    assert parts["adapters + grads + adam"] == 16 * 41_943_040


def test_dpo_doubles_sequences_and_adds_a_reference_unless_adapters() -> None:
    full = memory("dpo")
    assert full["reference model"] == 2 * N8B
    assert full["activations"] == activations(2048, 2)
    adapters = memory("dpo", lora_for_dpo=True)
    assert "reference model" not in adapters and "weights (frozen)" in adapters


def test_checkpointing_keeps_layer_inputs_plus_one_layer() -> None:
    s, h = 2048, 4096
    one_layer = activations(s, 1) // 32
    assert memory("sft", gradient_checkpointing=True)["activations"] == 32 * 2 * s * h + one_layer


def test_model_state_follows_megatrons_tp_pp_split() -> None:
    """Weights: the busier pipeline stage's share of the layers, divided by tp, with the embedding on the
    first stage (bf16 = 2 bytes). Activations shrink with tp; the first stage holds no logits."""
    single, split = memory("lora"), memory("lora", tp=2, pp=4)
    assert split["weights (frozen)"] == 2 * stage_params(llama3_8b(), 2, 4).first
    assert single["weights (frozen)"] / 8 < split["weights (frozen)"] < single["weights (frozen)"] / 4
    # the norms' inputs and outputs (6h of the 10h + 5I per token) are replicated across tp
    assert split["activations"] < 0.65 * single["activations"]
    assert "logits" not in split


def test_planner_estimates_full_vs_qlora_fit_on_one_80gb_gpu(env: Env) -> None:
    model_dir = env.dir / "llama8b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA3_8B))
    plan = env.plan(
        """
        resources: {device: gpu, gpu_memory_gb: 80}
        stages:
          - {name: full, kind: finetune, method: sft, dataset: sft, training: {precision: bf16}}
          - {name: qlora, kind: finetune, method: qlora, dataset: sft, needs: [], training: {precision: bf16}}
        """,
        base="./llama8b",
    )
    full, qlora = plan.stage("full"), plan.stage("qlora")
    assert full.shape is not None and full.shape.parameters == N8B and full.shape.source == "config.json"
    assert full.memory is not None and qlora.memory is not None
    assert full.memory.per_device_bytes > 128 * 10**9
    assert qlora.memory.per_device_bytes < 80 * GiB
    (too_big,) = full.problems
    assert "more than gpu_memory_gb=80" in too_big.message and "qlora" in (too_big.hint or "")
    assert (too_big.line, too_big.col) == after(plan.loaded.text, "  - ")
    assert too_big.field == "stages[0]"
    assert qlora.problems == []


def test_host_memory_is_checked_on_cpu(env: Env) -> None:
    plan = env.plan(
        """
        resources: {device: cpu, memory_gb: 4}
        stages:
          - {name: full, kind: finetune, method: sft, dataset: sft}
        """,
        reg=registry(model=source(parameters=N8B)),
    )
    (problem,) = plan.stage("full").problems
    assert "GiB of host memory; 4.0 GiB available" in problem.message


def test_compute_estimates_use_6n_for_full_and_4n_for_adapters(env: Env) -> None:
    plan = env.plan(
        """
        resources: {gpu_tflops: 100, mfu: 0.5}
        stages:
          - {name: full, kind: finetune, method: sft, dataset: sft, training: {epochs: 2}}
          - {name: lora, kind: finetune, method: lora, dataset: sft, needs: []}
        """,
        reg=registry(model=source(parameters=1_000_000)),
    )
    full, lora = plan.stage("full"), plan.stage("lora")
    rows, nbytes = 8, len(SFT_ROWS.encode())
    per_row = nbytes // rows // 4
    assert full.tokens == 2 * rows * per_row and lora.tokens == rows * per_row
    assert full.flops == 6 * 1_000_000 * full.tokens
    assert lora.flops == 4 * 1_000_000 * lora.tokens
    assert full.gpu_hours == pytest.approx(full.flops / (100e12 * 0.5) / 3600)
    assert gpu_hours(3600 * 1e12, 1, 1) == pytest.approx(1.0)


def test_declared_parameters_beat_a_guess_from_the_name(env: Env) -> None:
    body = "stages:\n  - {name: tune, kind: finetune, method: lora, dataset: sft}\n"
    hf = "hf://meta-llama/Llama-3.1-8B"
    guessed = env.plan(body, base=hf).stage("tune").shape
    assert guessed == shape_from_name("meta-llama/Llama-3.1-8B") == ModelShape(8 * 10**9, source="name")
    declared = env.plan(body, base=hf, model_extra=f", parameters: {N8B}").stage("tune").shape
    assert declared == ModelShape(N8B, source="declared")
    # A declared count is the fallback for a remote model whose name says nothing.
    unnamed = env.plan(body, base="hf://org/chat-model", model_extra=f", parameters: {N8B}").stage("tune")
    assert unnamed.shape == ModelShape(N8B, source="declared")
    assert env.plan(body, base="hf://org/chat-model").stage("tune").shape is None


def test_unpinned_hub_models_are_flagged(env: Env) -> None:
    body = "stages:\n  - {name: tune, kind: finetune, method: lora, dataset: sft}\n"
    unpinned = env.plan(body, base="hf://meta-llama/Llama-3.1-8B").stage("tune").warnings
    assert any("hf://meta-llama/Llama-3.1-8B is not pinned" in w and "@REVISION" in w for w in unpinned)
    pinned = env.plan(body, base="hf://meta-llama/Llama-3.1-8B@0e9e39f2").stage("tune").warnings
    assert not any("not pinned" in w for w in pinned)


def test_stage_outputs_inherit_the_shape_of_their_input(env: Env) -> None:
    plan = env.plan(
        """
        stages:
          - {name: tune, kind: finetune, method: lora, dataset: sft}
          - {name: eval, kind: evaluate, dataset: sft, model: "${stages.tune.outputs.merged}"}
        """,
        reg=registry(model=source(parameters=123_456)),
    )
    assert plan.stage("eval").shape == ModelShape(123_456, source="builtin")
    assert plan.stage("eval").memory is not None


# ------------------------------------------------------------------------------------ checks


def test_operator_not_installed_is_a_located_problem_listing_installed_ones(env: Env) -> None:
    reg = registry(op("evaluate"), op("finetune", "hf"))
    plan = env.plan(
        """
        stages:
          - {name: eval, kind: evaluate, dataset: sft}
          - name: squeeze
            kind: quantize
            format: int8
            needs: []
          - {name: tune, kind: finetune, method: lora, backend: megatron, dataset: sft}
        """,
        reg,
    )
    (squeeze,) = plan.stage("squeeze").problems
    line, col = after(plan.loaded.text, "    kind: ")
    assert str(squeeze) == (
        f"{plan.loaded.path}:{line}:{col}: stages[1].kind: operator not installed for kind 'quantize' "
        "(installed: evaluate, finetune/hf)"
    )
    (tune,) = plan.stage("tune").problems
    assert tune.message == "operator not installed for kind 'finetune' with backend 'megatron'"
    assert plan.stage("eval").problems == []
    assert plan.stage("squeeze").key is not None  # keyed anyway, as "not-installed"
    assert plan.stage("squeeze").key_inputs.operator_version == "not-installed"  # type: ignore[union-attr]


def test_requires_gpu_on_a_cpu_workflow(env: Env) -> None:
    reg = registry(op("evaluate", gpu=True, requires_gpu=True))
    plan = env.plan("stages:\n  - {name: eval, kind: evaluate, dataset: sft}\n", reg)
    (p,) = plan.stage("eval").problems
    assert (p.field, (p.line, p.col)) == ("stages[0].kind", after(plan.loaded.text, "kind: "))
    assert p.message == "evaluate needs a GPU" and p.hint == "set resources.device: gpu"


def test_cpu_only_operator_on_a_gpu_workflow(env: Env) -> None:
    reg = registry(op("evaluate", gpu=False))
    plan = env.plan(
        "resources: {device: gpu}\nstages:\n  - {name: eval, kind: evaluate, dataset: sft}\n", reg
    )
    assert problem_text(plan.stage("eval")) == ["evaluate does not run on GPUs"]
    hf = registry(op("finetune", "hf", gpu=False))
    tune = env.plan(
        "resources: {device: gpu}\nstages:\n  - {name: t, kind: finetune, method: lora, dataset: sft}\n", hf
    )
    assert problem_text(tune.stage("t")) == ["finetune (hf) does not run on GPUs"]


def test_gpu_only_option_on_cpu(env: Env) -> None:
    plan = env.plan(
        """
        stages:
          - name: squeeze
            kind: quantize
            format: nvfp4
          - {name: ok, kind: quantize, format: int8, needs: []}
        """
    )
    (p,) = plan.stage("squeeze").problems
    assert (p.field, (p.line, p.col)) == ("stages[0].format", after(plan.loaded.text, "    format: "))
    assert p.message == "format 'nvfp4' needs CUDA" and p.hint == "set resources.device: gpu"
    assert plan.stage("ok").problems == []
    on_gpu = env.plan(
        "resources: {device: gpu}\nstages:\n  - {name: squeeze, kind: quantize, format: nvfp4}\n"
    )
    assert on_gpu.problems() == []


def test_parallel_degrees_the_backend_cannot_do(env: Env) -> None:
    plan = env.plan(
        """
        resources: {device: gpu}
        stages:
          - name: tune
            kind: finetune
            method: lora
            dataset: sft
            parallelism:
              tp: 2
              dp: 4
        """
    )
    (p,) = plan.stage("tune").problems  # the hf backend does data parallel only
    assert (p.field, (p.line, p.col)) == ("stages[0].parallelism.tp", after(plan.loaded.text, "tp: "))
    assert p.message == "backend 'hf' does not support tp > 1" and "megatron" in (p.hint or "")
    assert plan.stage("tune").gpus == 8


def test_unknown_builtin_model_is_a_plan_problem(env: Env) -> None:
    plan = env.plan("stages:\n  - {name: eval, kind: evaluate, dataset: sft}\n", base="builtin://nope")
    (p,) = plan.stage("eval").problems
    assert "unknown builtin model 'nope' (known: x)" in p.message
    assert plan.stage("eval").key is None


# ------------------------------------------------------------------------------------ cache keys


KEYED = """
stages:
  - name: tune
    kind: finetune
    method: lora
    dataset: sft
    lora: {r: 8}
"""


def key(env: Env, body: str = KEYED, reg: OperatorRegistry | None = None) -> str:
    k = env.plan(body, reg).stages[0].key
    assert k is not None
    return k


def test_same_inputs_give_the_same_key(env: Env) -> None:
    first = key(env)
    assert key(env) == first
    assert len(first) == 64


@pytest.mark.parametrize(
    "change",
    [
        "name: tune-renamed",
        "needs: []",
        "timeout_minutes: 30",
        "cache: false",
        "resources: {cpus: 2}",
    ],
)
def test_bookkeeping_fields_do_not_change_the_key(env: Env, change: str) -> None:
    before = key(env)
    body = KEYED + f"    {change}\n"
    if change.startswith("name:"):
        body = KEYED.replace("name: tune", change)
    assert key(env, body) == before


@pytest.mark.parametrize(
    "change", ["lora: {r: 16}", "training: {lr: 0.001}", "method: qlora", "eval_dataset: sft"]
)
def test_params_change_the_key(env: Env, change: str) -> None:
    before = key(env)
    field = change.split(":")[0]
    lines = [ln for ln in KEYED.splitlines() if not ln.strip().startswith(f"{field}:")]
    assert key(env, "\n".join(lines) + f"\n    {change}\n") != before


def test_a_dataset_byte_changes_the_key(env: Env) -> None:
    before = key(env)
    data = env.dir / "sft.jsonl"
    data.write_text(data.read_text().replace("word7", "word8"))
    assert key(env) != before


def test_the_model_fingerprint_changes_the_key(env: Env) -> None:
    before = key(env, reg=registry(model=source(fingerprint="a" * 64)))
    assert key(env, reg=registry(model=source(fingerprint="a" * 64))) == before
    assert key(env, reg=registry(model=source(fingerprint="b" * 64))) != before


def test_the_operator_version_changes_the_key(env: Env) -> None:
    v1 = registry(op("finetune", "hf", version="1"))
    v2 = registry(op("finetune", "hf", version="2"))
    assert key(env, reg=v1) != key(env, reg=v2)


TWO_STAGES = """
stages:
  - {name: up, kind: quantize, format: int8}
  - {name: down, kind: evaluate, dataset: sft, model: "${stages.up.outputs.checkpoint}", max_samples: 4}
"""


def publish(env: Env, sp: StagePlan, content: str) -> None:
    assert sp.key is not None
    staging = env.store.staging(sp.key)
    (staging / "checkpoint").mkdir()
    (staging / "checkpoint" / "weights.bin").write_text(content)
    env.store.publish(sp.key, staging, values={}, metrics={"loss": 1.0}, meta={"stage": sp.name})


def test_downstream_key_is_unknown_until_its_upstream_has_run(env: Env) -> None:
    plan = env.plan(TWO_STAGES)
    up, down = plan.stage("up"), plan.stage("down")
    assert up.key is not None and up.status == "run"
    assert down.key is None and down.key_inputs is None
    assert down.reasons == ["runs after up (their outputs are part of its key)"]

    publish(env, up, "weights v1")
    plan = env.plan(TWO_STAGES)
    up2, down2 = plan.stage("up"), plan.stage("down")
    assert up2.status == "cached" and up2.key == up.key
    assert down2.key is not None and down2.status == "run"
    assert down2.key_inputs is not None and up2.cached is not None
    assert down2.key_inputs.upstream == {"model": up2.cached.output_digest("checkpoint")}


def test_downstream_key_follows_upstream_content_not_upstream_key(env: Env) -> None:
    up = env.plan(TWO_STAGES).stage("up")
    publish(env, up, "weights v1")
    first = env.plan(TWO_STAGES).stage("down").key
    # A new quantize operator version: a new upstream key; the upstream reruns with identical bytes.
    reg = registry(op("evaluate"), op("quantize", version="2"))
    up_v2 = env.plan(TWO_STAGES, reg).stage("up")
    assert up_v2.key != up.key
    publish(env, up_v2, "weights v1")
    assert env.plan(TWO_STAGES, reg).stage("down").key == first  # early cutoff: nothing downstream reruns
    # Different upstream bytes (in a fresh store) give the downstream stage a different key.
    env.store = StageStore(env.home / "other")
    publish(env, env.plan(TWO_STAGES, reg).stage("up"), "weights v2")
    assert env.plan(TWO_STAGES, reg).stage("down").key != first


def test_needs_only_dependencies_contribute_their_digest(env: Env) -> None:
    body = """
    stages:
      - {name: up, kind: quantize, format: int8}
      - {name: down, kind: evaluate, dataset: sft}
    """
    up = env.plan(body).stage("up")
    publish(env, up, "weights")
    down = env.plan(body).stage("down")
    assert down.key_inputs is not None
    assert list(down.key_inputs.upstream) == ["after:up"]


# ------------------------------------------------------------------------------------ explain


def test_explain_names_the_component_that_changed(env: Env) -> None:
    first = env.plan(KEYED).stages[0]
    assert first.reasons == [f"never ran (key {first.key[:12]})"]  # type: ignore[index]
    assert first.key is not None and first.key_inputs is not None
    env.store.remember("demo", "tune", first.key, first.key_inputs.components())

    assert env.plan(KEYED).stages[0].reasons == ["its last result is gone from the store"]
    changed = env.plan(KEYED.replace("r: 8", "r: 16")).stages[0]
    assert changed.reasons == ["params changed"]

    data = env.dir / "sft.jsonl"
    data.write_text(data.read_text() + data.read_text())
    assert env.plan(KEYED).stages[0].reasons == ["dataset:dataset changed"]


def test_explain_for_cache_off_and_no_cache(env: Env) -> None:
    assert env.plan(KEYED + "    cache: false\n").stages[0].reasons == ["cache: false"]
    sp = env.planner(KEYED).build(use_cache=False).stages[0]
    assert sp.reasons == ["--no-cache"]


def test_a_cached_stage_says_so_and_plan_json_is_serialisable(env: Env) -> None:
    up = env.plan(TWO_STAGES).stage("up")
    publish(env, up, "weights")
    plan = env.plan(TWO_STAGES)
    assert plan.stage("up").reasons == [f"cached (key {up.key[:12]})"]  # type: ignore[index]
    data = json.loads(json.dumps(plan.to_json()))
    assert [s["name"] for s in data["stages"]] == ["up", "down"]
    assert data["stages"][0]["status"] == "cached" and data["problems"] == []
    assert set(data["datasets"]) == {"sft"}


def test_cluster_stages_hold_no_local_gpus_on_the_kubernetes_target(tmp_path: Path) -> None:
    """An EngineBuild or a NeMo RayJob asks the cluster for GPUs; the local task that submits it holds none
    (on a CPU-only driver machine it would otherwise wait for GPUs forever)."""
    from forgeline.registry import default_registry

    loaded = load_workflow(Path(__file__).resolve().parents[2] / "workflows/examples/llama3-8b-lora-k8s.yaml")
    reg = default_registry()
    plan = Planner(loaded, reg, ModelStore(tmp_path, reg), StageStore(tmp_path / "stages")).build()
    by_name = {s.name: s for s in plan.stages}
    assert by_name["sft"].gpus == 8 and by_name["sft"].remote and by_name["sft"].task_resources[1] == 0
    assert by_name["engine"].gpus == 1 and by_name["engine"].task_resources == (by_name["engine"].cpus, 0)
