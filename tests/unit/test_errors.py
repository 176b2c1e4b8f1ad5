"""One exception tree: every error Forgeline raises on purpose is a ``ForgelineError``, and the two
faces turn one into its message (the CLI: exit 1, no traceback; the API: the one error body, with a
status by the error's place in the tree)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from forgeline.api._auth import TokenFileError
from forgeline.api._errors import ApiError, install_error_handlers
from forgeline.artifacts import PathEscapeError, UriError
from forgeline.errors import ForgelineError
from forgeline.plan import SelectionError
from forgeline.runtime import NotCancellableHere, RunNotFound
from forgeline.runtime._driver import StageFailed
from forgeline.runtime.context import GateFailed, OperatorError
from forgeline.spec import Problem, WorkflowError


@pytest.mark.parametrize(
    "cls",
    [
        WorkflowError,
        UriError,
        PathEscapeError,
        SelectionError,
        OperatorError,
        GateFailed,
        StageFailed,
        RunNotFound,
        NotCancellableHere,
        TokenFileError,
        ApiError,
    ],
)
def test_every_platform_error_is_a_forgeline_error(cls: type[Exception]) -> None:
    assert issubclass(cls, ForgelineError)


def test_the_cli_turns_a_forgeline_error_into_its_message_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from forgeline import cli

    def boom() -> None:
        raise OperatorError("dataset 'd' has rendering: auto ...; set data.d.rendering to raw")

    monkeypatch.setattr(cli, "app", boom)
    monkeypatch.setattr("sys.argv", ["forgeline", "run", "wf.yaml"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error: dataset 'd' has rendering: auto" in err and "Traceback" not in err

    def bug() -> None:
        raise KeyError("a bug keeps its traceback")

    monkeypatch.setattr(cli, "app", bug)
    with pytest.raises(KeyError):
        cli.main()


def test_the_api_maps_forgeline_errors_by_their_place_in_the_tree() -> None:
    app = FastAPI()
    install_error_handlers(app)
    errors: dict[str, Exception] = {
        "run": RunNotFound("no workflow run abc"),
        "host": NotCancellableHere("abc", "other-host"),
        "workflow": WorkflowError(
            [Problem("unknown stage 'x'", file="wf.yaml", line=3, col=5, field="needs[0]")]
        ),
        "gate": GateFailed("gate max_regression failed", {"perplexity": 9.0}),
        "other": ForgelineError("something the user can fix"),
    }

    def raising(exc: Exception) -> Callable[[], None]:
        def route() -> None:
            raise exc

        return route

    for name, exc in errors.items():
        app.add_api_route(f"/{name}", raising(exc))
    client = TestClient(app, raise_server_exceptions=False)
    got = {name: client.get(f"/{name}") for name in errors}
    assert {n: r.status_code for n, r in got.items()} == {
        "run": 404,
        "host": 409,
        "workflow": 422,
        "gate": 409,
        "other": 400,
    }
    body = got["workflow"].json()["error"]
    assert body["code"] == "invalid_workflow" and body["details"][0]["field"] == "needs[0]"
    assert got["gate"].json()["error"]["details"] == {"perplexity": 9.0}
    assert got["other"].json()["error"]["message"] == "something the user can fix"
