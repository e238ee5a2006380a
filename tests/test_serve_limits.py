"""The server's limits and lifecycle: API keys, a full queue, body size, client disconnects,
readiness before startup, SIGTERM drain, and the CLI's own errors."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import Server, metric, running_server  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from qwen3emb.cli import create_app as create_cli  # noqa: E402

KEYS = ("first-key-123", "second-key-456")
WAIT_MS = 400
"""The tight server waits this long for more requests before a batch runs, so a request
stays queued long enough to fill the queue or to be abandoned."""


@pytest.fixture(scope="module")
def tight(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("tight")
    keys = root / "keys.txt"
    keys.write_text(f"# operators\n{KEYS[0]}\n\n{KEYS[1]}\n")
    with running_server(tiny_bundle, root, "--api-key-file", str(keys), "--max-queue", "1",
                        "--batch-wait-ms", str(WAIT_MS), "--max-body-bytes", "4000",
                        "--max-queue-tokens", "300") as srv:
        yield srv


def _auth(key: str = KEYS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers, message", [
    ({}, "missing API key"),
    ({"Authorization": "Basic abc"}, "missing API key"),
    ({"Authorization": "Bearer wrong-key"}, "invalid API key"),
])
def test_keys_are_required(tight: Server, headers: dict, message: str) -> None:
    for path in ("/v1/embeddings", "/embeddings", "/tokenize"):
        response = httpx.post(tight.url + path, json={"input": "x"}, headers=headers)
        assert response.status_code == 401
        error = response.json()["error"]
        assert message in error["message"] and error["code"] == "invalid_api_key"
    for path in ("/v1/models", "/info"):
        assert httpx.get(tight.url + path, headers=headers).status_code == 401


def test_every_key_in_the_file_works_and_probes_are_open(tight: Server) -> None:
    for key in KEYS:
        client = openai.OpenAI(base_url=tight.url + "/v1", api_key=key, max_retries=0)
        assert len(client.embeddings.create(model="tiny", input="hi").data[0].embedding) == 64
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(tight.url + path).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(tight: Server) -> None:
    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tight.url, headers=_auth(), timeout=30) as ac:
            first = asyncio.ensure_future(ac.post("/v1/embeddings", json={"input": "first"}))
            await asyncio.sleep(WAIT_MS / 4000)  # the first one is queued, waiting for mates
            others = await asyncio.gather(*(ac.post("/v1/embeddings", json={"input": f"{i}"})
                                            for i in range(4)))
            return [await first, *others]

    responses = asyncio.run(fire())
    assert responses[0].status_code == 200
    assert [r.status_code for r in responses[1:]] == [429] * 4
    refused = responses[1]
    assert int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
    assert httpx.post(tight.url + "/v1/embeddings", json={"input": "after"},
                      headers=_auth()).status_code == 200


def test_a_large_body_gets_413_before_it_is_read(tight: Server) -> None:
    response = httpx.post(tight.url + "/v1/embeddings", json={"input": ["word " * 1000]},
                          headers=_auth())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert httpx.get(tight.url + "/health").status_code == 200


def test_a_request_above_the_queue_token_bound_gets_413(tight: Server) -> None:
    response = httpx.post(tight.url + "/v1/embeddings", headers=_auth(),
                          json={"input": ["several words in one text " * 4] * 12})
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and "above the queue's limit of 300" in (
        error["message"])


def test_a_disconnected_client_frees_its_queued_work(tight: Server) -> None:
    before = metric(httpx.get(tight.url + "/metrics").text, "qwen3emb_cancelled_requests_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tight.url + "/v1/embeddings", json={"input": "abandoned"}, headers=_auth(),
                   timeout=WAIT_MS / 4000)
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(tight.url + "/metrics").text
        if metric(text, "qwen3emb_cancelled_requests_total") == before + 1:
            break
        assert time.monotonic() < deadline, "the abandoned request was never cancelled"
        time.sleep(0.05)
    assert "qwen3emb_queue_requests 0.0" in text and "qwen3emb_queue_tokens 0.0" in text
    # --max-queue 1: the freed slot takes the next request at once.
    assert httpx.post(tight.url + "/v1/embeddings", json={"input": "next"},
                      headers=_auth()).status_code == 200


def test_not_ready_before_startup_answers_503(tiny_bundle: Path) -> None:
    from qwen3emb.serve import ServeSettings, create_app

    app = create_app(ServeSettings(bundle=tiny_bundle))  # lifespan not run: nothing loaded

    async def probe() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            return (await ac.get("/health"), await ac.get("/ready"),
                    await ac.post("/v1/embeddings", json={"input": "x"}))

    health, ready, embed = asyncio.run(probe())
    assert health.status_code == 200
    for response in (ready, embed):
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "not_ready"


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_bundle: Path,
                                                       tmp_path: Path) -> None:
    with running_server(tiny_bundle, tmp_path, "--batch-wait-ms", "1500") as srv:
        result: dict[str, httpx.Response] = {}
        worker = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
            srv.url + "/v1/embeddings", json={"input": ["in flight"]}, timeout=30)))
        worker.start()
        time.sleep(0.5)  # the request is queued, waiting for batch mates
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no new connections while draining
            httpx.post(srv.url + "/v1/embeddings", json={"input": "late"}, timeout=5)
        worker.join(timeout=30)
        assert srv.proc.wait(timeout=30) == 0, srv.output()
    assert result["r"].status_code == 200
    assert len(result["r"].json()["data"]) == 1


@pytest.mark.parametrize("args, message", [
    (["serve", "/nonexistent/bundle"], "does not exist"),
    (["serve", "{bundle}", "--max-batch-size", "0"], "--max-batch-size=0"),
    (["serve", "{bundle}", "--precision", "int3"], "no 'int3' ONNX model"),
    (["serve", "{bundle}", "--api-key-file", "/nonexistent/keys"], "cannot read the API key"),
    (["serve", "{bundle}", "--max-tokens", "5000"], "outside 2..1024"),
])
def test_cli_refuses_bad_options_in_one_line(tiny_bundle: Path, args: list[str],
                                             message: str) -> None:
    # An address this machine does not have: were an option wrongly accepted, the server
    # would fail to bind and the test fail, instead of serving forever inside pytest.
    argv = [a.format(bundle=tiny_bundle) for a in args] + ["--host", "203.0.113.1"]
    result = CliRunner().invoke(create_cli(), argv)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1
