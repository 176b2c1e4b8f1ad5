"""The engine registry: both shipped engines come through the ``forgeline.engines`` entry point, each
accepts only its own artifact (a real OpenVINO IR from the one exporter, a real TensorRT-LLM build
output from the build operator), and ``select`` picks one engine per artifact or device, visibly.

The real-IR test exports the tiny model once (~15 s) and is marked slow; the rest takes well under a
second and uses test doubles of the protocol where the real engines are not the point.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from forgeline.runtime.context import OperatorError
from forgeline_operators.build.operator import write_spec
from forgeline_operators.build.spec import BuildStage
from forgeline_operators.engines import (
    ENTRY_POINT_GROUP,
    Engine,
    EngineCapabilities,
    EngineError,
    EngineRegistry,
    Repository,
    ServerRequirement,
    ServingSettings,
    default_engines,
)
from forgeline_operators.models.tiny_llama import CHECKPOINT_DIR


def test_both_engines_are_discovered_through_the_entry_point() -> None:
    declared = {e.name: e.value for e in entry_points(group=ENTRY_POINT_GROUP)}
    assert declared == {
        "openvino": "forgeline_operators.engines.openvino:ENGINE",
        "tensorrt-llm": "forgeline_operators.engines.tensorrt_llm:ENGINE",
    }
    registry = default_engines()
    assert registry.names() == ["openvino", "tensorrt-llm"]
    for engine in registry:
        assert isinstance(engine, Engine)
        assert engine.server.name == "tritonserver"
    ov, trt = registry.get("openvino"), registry.get("tensorrt-llm")
    assert ov.capabilities == EngineCapabilities(frozenset({"cpu"}), lora=True, speculative_decoding=True)
    assert trt.capabilities.devices == frozenset({"gpu"}) and ov.server.runs_here and not trt.server.runs_here


@pytest.fixture(scope="module")
def trtllm_build_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the build stage's ``engine: tensorrt-llm`` writes for an HF checkpoint (LLM-API profile)."""
    out = tmp_path_factory.mktemp("trt") / "artifact"
    stage = BuildStage.model_validate(
        {"name": "b", "kind": "build", "engine": "tensorrt-llm", "from": "${model}"}
    )
    write_spec(stage, CHECKPOINT_DIR, out)
    return out


@pytest.fixture(scope="module")
def openvino_ir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real IR, made by the OpenVINO engine's ``prepare`` (the one exporter) from the tiny model."""
    return default_engines().get("openvino").prepare(CHECKPOINT_DIR, tmp_path_factory.mktemp("ov"), threads=2)


def test_accepts_is_exclusive_on_a_tensorrt_llm_build_output(trtllm_build_output: Path) -> None:
    registry = default_engines()
    assert [e.name for e in registry.accepting(trtllm_build_output)] == ["tensorrt-llm"]
    assert registry.select(trtllm_build_output, "cpu").name == "tensorrt-llm"  # the artifact decides
    assert registry.accepting(CHECKPOINT_DIR) == []  # an HF checkpoint is nobody's artifact: by device
    assert registry.select(CHECKPOINT_DIR, "cpu").name == "openvino"
    assert registry.select(CHECKPOINT_DIR, "gpu").name == "tensorrt-llm"
    assert registry.select(CHECKPOINT_DIR, "gpu", name="openvino").name == "openvino"


@pytest.mark.slow
def test_accepts_is_exclusive_on_a_real_openvino_ir(openvino_ir: Path, trtllm_build_output: Path) -> None:
    registry = default_engines()
    assert [e.name for e in registry.accepting(openvino_ir)] == ["openvino"]
    assert registry.select(openvino_ir, "gpu").name == "openvino"
    ov = registry.get("openvino")
    assert ov.prepare(openvino_ir, Path("/nonexistent")) == openvino_ir  # an IR is served as it is
    repo = ov.write_repository(openvino_ir.parent / "repo", openvino_ir, ServingSettings(name="m"))
    assert (repo.path / "m" / "1" / "engine" / "openvino_model.xml").is_file()
    assert repo.params["engine_threads"] == 1
    with pytest.raises(ValueError, match="not an OpenVINO IR"):
        ov.write_repository(openvino_ir.parent / "repo2", trtllm_build_output, ServingSettings(name="m"))


def test_tensorrt_llm_builds_no_engine_at_serving_time(tmp_path: Path, trtllm_build_output: Path) -> None:
    trt = default_engines().get("tensorrt-llm")
    assert trt.prepare(trtllm_build_output, tmp_path) == trtllm_build_output
    assert trt.prepare(CHECKPOINT_DIR, tmp_path) == CHECKPOINT_DIR  # the llmapi model loads HF weights
    with pytest.raises(OperatorError, match="built by the build stage"):
        trt.prepare(tmp_path, tmp_path)
    with pytest.raises(ValueError, match="CPU-runtime settings"):
        trt.check(ServingSettings(name="m", adapters={"sql": tmp_path}))
    repo = trt.write_repository(tmp_path / "repo", trtllm_build_output, ServingSettings(name="m"))
    assert repo.params["layout"] == "llmapi" and (repo.path / "tensorrt_llm" / "1" / "model.yaml").is_file()


@dataclass
class _Double:
    """The cheapest Engine: accepts a directory holding a marker file named after it."""

    name: str
    devices: frozenset[str] = frozenset({"cpu"})

    def __post_init__(self) -> None:
        self.server = ServerRequirement("tritonserver", ("python",), runs_here=True)
        self.capabilities = EngineCapabilities(self.devices)  # type: ignore[arg-type]

    def accepts(self, path: Path) -> bool:
        return (path / self.name).is_file()

    def prepare(self, model_dir: Path, work_dir: Path, threads: int = 1) -> Path:
        return model_dir

    def check(self, settings: ServingSettings) -> None:
        return None

    def write_repository(self, dest: Path, artifact: Path, settings: ServingSettings) -> Repository:
        return Repository(dest)


def test_a_registry_of_doubles_selects_visibly(tmp_path: Path) -> None:
    registry = EngineRegistry([_Double("a"), _Double("b")])
    (tmp_path / "a").write_text("")
    assert registry.select(tmp_path).name == "a"
    (tmp_path / "b").write_text("")
    with pytest.raises(EngineError, match="accepted by several engines: a, b"):
        registry.select(tmp_path)
    with pytest.raises(EngineError, match=r"no single engine serves .* on cpu .*: a, b"):
        registry.select(tmp_path / "missing")
    with pytest.raises(EngineError, match=r"no single engine .* on gpu .*: none"):
        registry.select(tmp_path / "missing", "gpu")
    with pytest.raises(EngineError, match="unknown engine 'c'; known: a, b"):
        registry.get("c")
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(_Double("a"))
    with pytest.raises(TypeError, match="does not implement the Engine protocol"):
        registry.add(object())  # type: ignore[arg-type]


def test_a_named_engine_refuses_another_engines_artifact(tmp_path: Path) -> None:
    registry = EngineRegistry([_Double("a"), _Double("b")])
    (tmp_path / "a").write_text("")
    assert registry.select(tmp_path, name="a").name == "a"
    with pytest.raises(EngineError, match="is a's artifact, not b's: serve it with engine 'a'"):
        registry.select(tmp_path, name="b")
    assert registry.select(tmp_path / "missing", name="b").name == "b"  # a checkpoint b prepares


def test_the_serve_stages_engine_field_is_checked_and_shown_by_the_plan() -> None:
    from types import SimpleNamespace

    from forgeline_operators.serve.plan import check, describe
    from forgeline_operators.serve.spec import ServeStage

    cpu = SimpleNamespace(resources=SimpleNamespace(device="cpu"))
    caps = None
    given = ServeStage(name="s", kind="serve", model="${stages.b.outputs.artifact}", engine="openvino")
    assert check(given, cpu, caps) == []  # type: ignore[arg-type]
    assert describe(given, cpu) == ["engine: openvino (given)"]
    inferred = ServeStage(name="s", kind="serve", model="${stages.b.outputs.artifact}")
    assert describe(inferred, cpu) == [
        "engine: chosen at run time: the engine whose artifact stage 'b''s output is, "
        "else openvino, the engine for cpu"
    ]
    [wrong_device] = check(  # type: ignore[arg-type]
        ServeStage(name="s", kind="serve", model="${model}", engine="tensorrt-llm"), cpu, caps
    )
    assert wrong_device.field == "engine" and "runs on gpu, not on the workflow's device cpu" in (
        wrong_device.message
    )
    assert wrong_device.hint == "set resources.device: gpu or engine: openvino"
    [unknown] = check(ServeStage(name="s", kind="serve", model="${model}", engine="vllm"), cpu, caps)  # type: ignore[arg-type]
    assert "unknown engine 'vllm'" in unknown.message and unknown.hint == "use one of: openvino, tensorrt-llm"
