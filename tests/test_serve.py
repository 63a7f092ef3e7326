"""The query service over a small index: every endpoint against the Python API's own answer, errors and limits,
and following LATEST while requests go on (nothing fails, every answer names its build)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tracin_index import BuildConfig, ProjectionSpec, build_index, load_model, open_index
from tracin_index.query import TracinIndex
from tracin_index.serve.app import create_app
from tracin_index.store import latest_build

from .conftest import Trained
from .serving import running


def _build(trained: Trained, home: Path, dim: int = 1024, force: bool = False) -> str:
    config = BuildConfig(projection=ProjectionSpec(dim=dim))
    build_index(load_model(trained.directory), home, checkpoints=trained.checkpoints, config=config, force=force)
    build = latest_build(home)
    assert build is not None
    return build.name


def _plain(value: Any) -> Any:
    """What the value reads as once sent as JSON."""
    return json.loads(json.dumps(value))


@pytest.fixture(scope="module")
def home(conve_inverse: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "idx"
    _build(conve_inverse, out)
    return out


@pytest.fixture(scope="module")
def api(home: Path) -> TracinIndex:
    return open_index(home)


@pytest.fixture(scope="module")
def client(home: Path) -> Iterator[TestClient]:
    with TestClient(create_app(home, poll=0)) as c:
        yield c


def _ok(response: httpx.Response, home: Path) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    build = latest_build(home)
    assert build is not None and body["build"] == build.name
    return body


def test_info_names_the_build_and_its_settings(client: TestClient, home: Path, api: TracinIndex) -> None:
    body = _ok(client.get("/api/info"), home)
    attrs = api.info()
    assert body["num_rows"] == api.num_rows == 1592
    assert body["model_class"] == "ConvE" and body["loss"] == attrs["loss"] and body["layers"] == attrs["layers"]
    assert body["projection"] == {"kind": "sparse", "dim": 1024, "seed": 0}
    assert body["checkpoints"] == [{"name": Path(c["name"]).name, "lr": c["lr"]} for c in attrs["checkpoints"]]
    assert body["tracked"] == [p["name"] for p in attrs["tracked"]]
    assert body["num_entities"] == 14 and body["following"] is False


def test_labels_complete_prefixes(client: TestClient, home: Path) -> None:
    assert _ok(client.get("/api/labels", params={"kind": "entity", "prefix": "br"}), home)["labels"] == ["brazil"]
    body = _ok(client.get("/api/labels", params={"kind": "relation", "prefix": "COMMONBLOC", "limit": 2}), home)
    assert body["labels"] == ["commonbloc0", "commonbloc1"]
    # prefix matches first, then labels that contain the text elsewhere
    body = _ok(client.get("/api/labels", params={"kind": "relation", "prefix": "intergovorgs", "limit": 5}), home)
    assert body["labels"][:2] == ["intergovorgs", "intergovorgs3"] and "relintergovorgs" in body["labels"]
    everything = _ok(client.get("/api/labels", params={"limit": 1000}), home)["labels"]
    assert len(everything) == 14 and everything == sorted(everything)
    assert client.get("/api/labels", params={"kind": "person"}).status_code == 422


@pytest.mark.parametrize("body", [
    {"triples": ["brazil commonbloc1 india", "usa intergovorgs uk"], "k": 5},
    {"triples": ["brazil commonbloc1 india"], "k": 3, "mode": "cosine", "relations": ["commonbloc1", "conferences"]},
    {"triples": ["brazil commonbloc1 india"], "k": 4, "mode": "abs", "neighbourhood": True},
])
def test_query_answers_as_the_python_api(client: TestClient, home: Path, api: TracinIndex, body: dict[str, Any]) -> None:
    got = _ok(client.post("/api/query", json=body), home)["results"]
    expected = api.query(body["triples"], body["k"], mode=body.get("mode", "dot"), relations=body.get("relations"),
                         neighbourhood=body.get("neighbourhood", False))
    assert got == _plain([r.to_dict() for r in expected])
    assert len(got) == len(body["triples"])


def test_predict_explain_contrast_and_self_influence_answer_as_the_python_api(client: TestClient, home: Path,
                                                                             api: TracinIndex) -> None:
    question = "brazil commonbloc1 ?"
    body = _ok(client.post("/api/predict", json={"question": question, "n": 5}), home)
    assert body["predictions"] == _plain(api.predict(question, n=5, filtered=True))
    assert [p["rank"] for p in body["predictions"]] == list(range(1, len(body["predictions"]) + 1))
    unfiltered = _ok(client.post("/api/predict", json={"question": "? commonbloc1 india", "n": 3, "filtered": False}), home)
    assert unfiltered["predictions"] == _plain(api.predict("? commonbloc1 india", n=3, filtered=False))

    body = _ok(client.post("/api/explain", json={"question": question, "predictions": 2, "k": 4}), home)
    expected = api.explain_prediction(question, predictions=2, k=4, filtered=True)
    assert body["results"] == _plain([r.to_dict() for r in expected])
    assert [r["prediction"]["rank"] for r in body["results"]] == [1, 2]

    body = _ok(client.post("/api/contrast", json={"triple": "brazil commonbloc1 india", "versus": "brazil commonbloc1 uk",
                                                  "k": 5}), home)
    expected = api.query("brazil commonbloc1 india", k=5, versus="brazil commonbloc1 uk")
    assert body["results"] == _plain([r.to_dict() for r in expected])
    assert body["results"][0]["versus"] == {"head": "brazil", "relation": "commonbloc1", "tail": "uk"}

    body = _ok(client.get("/api/self-influence", params={"top": 7}), home)
    from dataclasses import asdict

    assert body["ranking"] == _plain([asdict(i) for i in api.self_influence(7)])


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [
    ("post", "/api/query", {"triples": ["brazil commonbloc1 atlantis"]}, 400, "unknown entity 'atlantis'"),
    ("post", "/api/query", {"triples": ["brazil commonbloc india"]}, 400, "closest known: commonbloc"),
    ("post", "/api/query", {"triples": ["brazil india"]}, 400, "has 2 parts"),
    ("post", "/api/query", {"triples": ["brazil commonbloc1 india"], "mode": "sideways"}, 400, "sideways"),
    ("post", "/api/query", {"triples": ["brazil commonbloc1 india"], "relations": ["embasy"]}, 400, "embassy"),
    ("post", "/api/query", {"triples": ["brazil commonbloc1 india"], "k": 0}, 422, "k: Input should be greater than"),
    ("post", "/api/query", {"triples": ["brazil commonbloc1 india"], "k": 1001}, 422, "k: Input should be less than"),
    ("post", "/api/query", {"triples": ["brazil commonbloc1 india"] * 65}, 422, "at most 64"),
    ("post", "/api/query", {"triples": []}, 422, "triples"),
    ("post", "/api/query", {"triple": "brazil commonbloc1 india"}, 422, "triples: Field required"),
    ("post", "/api/predict", {"question": "brazil commonbloc1 india"}, 400, "question"),
    ("post", "/api/predict", {"question": "? commonbloc1 ?"}, 400, "not both"),
    ("post", "/api/predict", {"question": "brazl commonbloc1 ?"}, 400, "closest known: brazil"),
    ("post", "/api/predict", {"question": "brazil commonbloc1 ?", "n": 101}, 422, "n: Input should be less than"),
    ("post", "/api/explain", {"question": "brazil commonbloc1 ?", "predictions": 0}, 422, "predictions"),
    ("post", "/api/contrast", {"triple": "brazil commonbloc1 india", "versus": "brazil commonbloc1 mars"}, 400,
     "unknown entity 'mars'"),
    ("get", "/api/self-influence?top=0", None, 422, "top: Input should be greater"),
    ("get", "/api/nothing", None, 404, "no such page: /api/nothing"),
])
def test_bad_requests_get_one_line_json_errors(client: TestClient, method: str, path: str, body: Any, status: int,
                                               message: str) -> None:
    response = client.request(method.upper(), path, json=body)
    assert response.status_code == status, response.text
    payload = response.json()
    assert message in payload["error"], payload
    assert "\n" not in payload["error"] and "Traceback" not in response.text and 'File "' not in response.text


def test_invalid_json_and_oversized_bodies(client: TestClient) -> None:
    response = client.post("/api/query", content=b'{"triples": [', headers={"content-type": "application/json"})
    assert response.status_code == 422 and "not valid JSON" in response.json()["error"]
    big = json.dumps({"triples": ["brazil commonbloc1 india " + "x" * 1100] * 64, "k": 5}).encode()
    assert len(big) > 65536
    response = client.post("/api/query", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "65536 bytes" in response.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while the body is read
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    response = client.post("/api/query", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "65536 bytes" in response.json()["error"]


def test_unexpected_errors_are_500_in_one_line(client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    served = client.app.state.current.get()  # type: ignore[attr-defined]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(served.index, "query", broken)
    response = client.post("/api/query", json={"triples": ["brazil commonbloc1 india"]})
    assert response.status_code == 500
    assert response.json() == {"error": "internal error: RuntimeError: disk on fire second line", "build": served.build}
    assert "Traceback" in caplog.text  # the log has it, the client does not
    assert client.post("/api/predict", json={"question": "brazil commonbloc1 ?"}).status_code == 200


def test_a_request_waits_for_its_turn_then_gets_503(home: Path) -> None:
    with TestClient(create_app(home, poll=0, max_concurrency=1, queue_timeout=0.3)) as c:
        served = c.app.state.current.get()  # type: ignore[attr-defined]
        held = threading.Event()
        served.submit(lambda index: held.wait(30))  # the build's thread is busy with another call
        started = time.monotonic()
        response = c.post("/api/query", json={"triples": ["brazil commonbloc1 india"]})
        assert time.monotonic() - started >= 0.3
        held.set()
        assert response.status_code == 503 and response.json()["error"].startswith("busy")
        assert c.post("/api/query", json={"triples": ["brazil commonbloc1 india"]}).status_code == 200


def test_queued_queries_are_answered_in_one_batch_each_as_asked_alone(home: Path, api: TracinIndex) -> None:
    """Queries waiting on the build's thread with the same options run as one engine batch; each gets the lists it
    gets alone (values to float32 rounding); a bad label fails only its own request; a question is answered alone."""
    from tracin_index import InputError
    from tracin_index.serve.holder import Served

    served = Served("b", open_index(home))
    calls: list[int] = []
    plain_query = served.index.query

    def counting(triples: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(triples))
        return plain_query(triples, *args, **kwargs)

    served.index.query = counting  # type: ignore[method-assign]
    held = threading.Event()
    served.submit(lambda index: held.wait(30))  # the build's thread is busy: the next requests queue up
    asked = [["brazil commonbloc1 india", "usa intergovorgs uk"], ["egypt embassy israel"], ["brazil conferences uk"]]
    futures = [served.query(t, k=4, mode="dot", relations=None, neighbourhood=False) for t in asked]
    bad = served.query(["brazil commonbloc1 atlantis"], k=4, mode="dot", relations=None, neighbourhood=False)
    question = served.query(["brazil commonbloc1 ?"], k=4, mode="dot", relations=None, neighbourhood=False)
    other = served.query(["egypt embassy israel"], k=2, mode="dot", relations=None, neighbourhood=False)
    held.set()
    for triples, future in zip(asked, futures, strict=True):
        got = future.result(30)
        for result, alone in zip(got, api.query(triples, 4), strict=True):
            assert result.test == alone.test
            for mine, theirs in ((result.proponents, alone.proponents), (result.opponents, alone.opponents)):
                assert [i.train_index for i in mine] == [i.train_index for i in theirs]
                assert [i.influence for i in mine] == pytest.approx([i.influence for i in theirs], rel=1e-5)
    with pytest.raises(InputError, match="atlantis"):
        bad.result(30)
    assert question.result(30)[0].prediction is not None
    assert [len(r.proponents) for r in other.result(30)] == [2]
    assert sorted(calls) == [1, 1, 4]  # the question alone, k=2 alone, the three k=4 requests in one batch
    served.retire()


def test_openapi_schema_lists_the_endpoints_and_bounds(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/api/info", "/api/labels", "/api/query", "/api/predict", "/api/explain", "/api/contrast",
            "/api/self-influence"} <= set(schema["paths"])
    query = schema["components"]["schemas"]["QueryRequest"]["properties"]
    assert query["k"]["maximum"] == 1000 and query["triples"]["maxItems"] == 64
    assert client.get("/").headers["content-type"].startswith("text/html")
    assert "explorer.js" in client.get("/").text and client.get("/static/explorer.js").status_code == 200


def test_a_build_directory_is_served_as_it_is(home: Path) -> None:
    build = latest_build(home)
    assert build is not None
    with TestClient(create_app(build, poll=0.05)) as c:
        body = c.get("/api/info").json()
        assert body["build"] == build.name and body["following"] is False


def test_follows_latest(conve_inverse: Trained, tmp_path: Path) -> None:
    """A new build is swapped in between requests: answers name it after the swap, and come whole from it."""
    home = tmp_path / "idx"
    first = _build(conve_inverse, home)
    with TestClient(create_app(home, poll=0.1)) as c:
        before = c.post("/api/query", json={"triples": ["brazil commonbloc1 india"], "k": 5})
        assert before.status_code == 200 and before.json()["build"] == first
        second = _build(conve_inverse, home, dim=512)
        assert second != first
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline:
            info = c.get("/api/info")
            assert info.status_code == 200
            seen.append(info.json()["build"])
            if seen[-1] == second:
                break
            time.sleep(0.05)
        assert seen[-1] == second, "the service did not follow LATEST"
        assert set(seen) <= {first, second} and seen == sorted(seen, key=[first, second].index)
        assert info.json()["projection"]["dim"] == 512  # the answer comes from the build it names
        after = c.post("/api/query", json={"triples": ["brazil commonbloc1 india"], "k": 5})
        assert after.status_code == 200 and after.json()["build"] == second
        [expected] = open_index(home / "builds" / second).query("brazil commonbloc1 india", k=5)
        assert after.json()["results"] == _plain([expected.to_dict()])
        assert c.app.state.current.swaps == 1  # type: ignore[attr-defined]


def test_no_request_fails_while_a_build_is_published(conve_inverse: Trained, tmp_path: Path) -> None:
    """Clients hammer /api/query over HTTP while the nightly job rebuilds (force) and publishes: all answered."""
    home = tmp_path / "idx"
    first = _build(conve_inverse, home)
    triples = ["brazil commonbloc1 india", "usa intergovorgs uk", "china conferences india", "egypt relexports israel"]
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(4)]
    failures: list[str] = []

    def hammer(i: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                try:
                    r = http.post("/api/query", json={"triples": [triples[i]], "k": 5})
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text}")
                    continue
                seen[i].append(r.json()["build"])

    # two places for four clients: requests that took the old build also wait for a place across the swap
    with running(create_app(home, poll=0.1, max_concurrency=2)) as url:
        threads = [threading.Thread(target=hammer, args=(i, url)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        second = _build(conve_inverse, home, force=True)
        assert second != first
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(s and s[-1] == second for s in seen):
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    for s in seen:
        assert s and s[0] == first and s[-1] == second
        # a client never sees the old build again once it has seen the new one
        assert s == sorted(s, key=[first, second].index)


def test_cli_without_fastapi_fails_in_one_line(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from tracin_index.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi raises ImportError
    res = CliRunner().invoke(main, ["serve", str(home)])
    assert res.exit_code == 1
    assert res.output.strip() == "Error: serve needs FastAPI: pip install 'tracin-index[serve]'"


def test_cli_refuses_a_missing_index_in_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tracin_index.cli import main

    res = CliRunner().invoke(main, ["serve", str(tmp_path / "nothing"), "--port", "0"])
    assert res.exit_code == 2 and "not found" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
