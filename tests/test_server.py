"""The OpenAI-compatible server, driven by the official `openai` client over loopback against a tiny checkpoint."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from checkpoints import write_tiny_checkpoint
from smolvlm.api import load
from smolvlm.errors import ImageError
from smolvlm.serve.app import ServerSettings, create_app
from smolvlm.serve.images import ImagePolicy, check_data_url, host_allowed, is_public, resolve_image_urls

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

MODEL = "tiny"


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app):
    """Run `app` with uvicorn in a thread on a free loopback port; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def data_url(image: Image.Image) -> str:
    """A PNG data: URL of `image`."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def random_image(seed: int, size: tuple[int, int] = (90, 60)) -> Image.Image:
    """A noise image of `size` (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return load(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), device="cpu")


@pytest.fixture(scope="module")
def url(vlm):
    settings = ServerSettings(model_name=MODEL, max_body_bytes=2**20, max_image_pixels=200 * 200, max_tokens=1500,
                              images=ImagePolicy(allow_http=True, allowed_hosts=("*",), timeout=2.0))  # fmt: skip
    with serving(create_app(vlm, settings)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _user(text: str, *images: Image.Image, url_parts: bool = True) -> list[dict]:
    if url_parts:
        parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    else:
        parts = [{"type": "image", "image": i} for i in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def test_models_health_and_plain_completion(client, url, vlm):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    expected = vlm.generate(messages, max_new_tokens=12, return_result=True)
    assert answer.object == "chat.completion" and answer.model == MODEL
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage.prompt_tokens == expected.prompt_tokens
    assert answer.usage.completion_tokens == expected.completion_tokens
    assert answer.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens


def test_multi_image_and_max_completion_tokens(client, vlm):
    a, b = random_image(1), random_image(2, (40, 120))
    answer = client.chat.completions.create(model=MODEL, messages=_user("Compare them.", a, b),
                                            max_completion_tokens=10)  # fmt: skip
    assert answer.choices[0].message.content == vlm.generate(_user("Compare them.", a, b, url_parts=False),
                                                             max_new_tokens=10)  # fmt: skip
    assert answer.usage.completion_tokens <= 10
    assert answer.usage.prompt_tokens > 3 * 4  # at least the image tokens of the tiles


def test_streaming_chunks_equal_the_answer(client, url, vlm):
    messages = _user("What is in the picture?", random_image(3))
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = vlm.generate(_user("What is in the picture?", random_image(3), url_parts=False), max_new_tokens=16,
                            return_result=True)  # fmt: skip
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.completion_tokens
    raw = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4,
                                                          "stream": True}, timeout=60)  # fmt: skip
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings_and_seeded_sampling(client, vlm):
    messages = [{"role": "user", "content": "Tell me a story"}]
    plain = vlm.generate(messages, max_new_tokens=20)
    stop = plain[4:7]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, stop=[stop, "zzzz"])
    assert answer.choices[0].message.content == vlm.generate(messages, max_new_tokens=20, stop=[stop, "zzzz"])
    assert stop not in answer.choices[0].message.content and answer.choices[0].finish_reason == "stop"
    sampled = dict(model=MODEL, messages=messages, max_tokens=12, temperature=1.0, top_p=0.9, seed=123)
    first = client.chat.completions.create(**sampled).choices[0].message.content
    assert first == client.chat.completions.create(**sampled).choices[0].message.content
    assert first == vlm.generate(messages, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=123)


def _post(url: str, body, content_type: str = "application/json") -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + "/v1/chat/completions", content=data, headers={"Content-Type": content_type}, timeout=60)


def _image_request(image_url: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "what?"}]
    return {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": content}]}


BAD_REQUESTS = [
    ("malformed json", b'{"model": "tiny", "messages": [', "application/json", 400, "invalid_json"),
    ("deeply nested json", b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "invalid_json"),
    ("wrong content type", b"model=tiny", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ("text data url", _image_request("data:text/plain;base64," + base64.b64encode(b"hello").decode()),
     "application/json", 400, "invalid_image"),
    ("png that is not", _image_request("data:image/png;base64," + base64.b64encode(b"not a png").decode()),
     "application/json", 400, "invalid_image"),
    ("huge image", _image_request(data_url(Image.new("RGB", (400, 400)))), "application/json", 400, "invalid_image"),
    ("loopback url", _image_request("http://127.0.0.1:1/cat.png"), "application/json", 400, "invalid_image"),
    ("metadata url", _image_request("http://169.254.169.254/latest/meta-data"), "application/json", 400,
     "invalid_image"),
    ("localhost name", _image_request("http://localhost/cat.png"), "application/json", 400, "invalid_image"),
    ("ftp url", _image_request("ftp://example.com/cat.png"), "application/json", 400, "invalid_image"),
    ("10k stop strings", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "stop": ["s%d" % i for i in range(10_000)]}, "application/json", 400, None),
    ("too many tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
     "application/json", 400, None),
    ("n=2", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, "application/json", 400, None),
    ("no messages", {"model": MODEL, "messages": []}, "application/json", 400, None),
    ("bad role", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "application/json", 400, None),
    ("bad temperature", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
     "application/json", 400, None),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, "application/json", 404,
     "model_not_found"),
    ("body too large", b'{"model": "tiny", "pad": "' + b"x" * (2 * 2**20) + b'"}', "application/json", 413,
     "request_too_large"),
]


@pytest.mark.parametrize("name,body,content_type,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(url, name, body, content_type, status, code):
    response = _post(url, body, content_type)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code
    # the server keeps serving
    assert _post(url, {"model": MODEL, "messages": [{"role": "user", "content": "ok?"}], "max_tokens": 2}).is_success


def test_unknown_route_and_openai_client_error_types(client, url):
    missing = httpx.get(url + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=_user("x", Image.new("RGB", (500, 500))))
    assert "pixels" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])


def test_image_policy_units():
    with pytest.raises(ImageError, match="turned off"):
        resolve_image_urls([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://a.b/c"}}]}],
                           ImagePolicy())  # fmt: skip
    with pytest.raises(ImageError, match="allow-list"):
        resolve_image_urls([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://a.b/c"}}]}],
                           ImagePolicy(allow_http=True, allowed_hosts=("example.com",)))  # fmt: skip
    assert host_allowed("img.example.com", ("*.example.com",)) and not host_allowed("example.org", ("*.example.com",))
    import ipaddress

    for address in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "fe80::1", "::ffff:127.0.0.1", "0.0.0.0"):
        assert not is_public(ipaddress.ip_address(address)), address
    assert is_public(ipaddress.ip_address("93.184.216.34"))
    with pytest.raises(ImageError, match="larger"):
        check_data_url("data:image/png;base64," + "A" * 4000, max_bytes=1000)


def test_full_queue_429_and_disconnect_frees_the_slot(vlm):
    settings = ServerSettings(model_name=MODEL, max_batch_size=1, max_queue=1, max_tokens=1500, request_timeout=60)
    # the tokenizer is trained afresh per run, so find a prompt whose greedy answer does not end early
    candidates = [[{"role": "user", "content": f"go on {i}"}] for i in range(16)]
    finished = vlm.generate(candidates, max_new_tokens=400, return_result=True)
    endless = next(c for c, r in zip(candidates, finished) if r.finish_reason == "length")
    long = {"model": MODEL, "messages": endless, "max_tokens": 1500, "stream": True}
    short = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    app = create_app(vlm, settings)
    # once the long answer streams, its decode steps wait for `release`: on a loaded machine it could otherwise end
    # before the short request is queued, and the full queue would never be seen
    hold, release = threading.Event(), threading.Event()
    decode_step = app.state.scheduler._decode_step

    def held_decode_step() -> None:
        if hold.is_set():
            release.wait(timeout=60)
        decode_step()

    app.state.scheduler._decode_step = held_decode_step
    with serving(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=long) as streaming:
            lines = streaming.iter_lines()  # keep a reference: a collected iterator closes the stream
            next(lines)
            hold.set()
            waiting = threading.Thread(target=lambda: results.append(http.post("/v1/chat/completions", json=short)))
            results: list[httpx.Response] = []
            waiting.start()
            deadline = time.time() + 30
            while (app.state.scheduler.stats()["running"], app.state.scheduler.stats()["waiting"]) != (1, 1):
                assert time.time() < deadline, str(app.state.scheduler.stats())
                time.sleep(0.01)
            # the long request holds the only batch slot, the short one the only queue place
            refused = http.post("/v1/chat/completions", json=short)
            assert refused.status_code == 429 and refused.headers["Retry-After"]
            assert refused.json()["error"]["type"] == "rate_limit_error"
        release.set()
        # closing the stream cancels the long generation: the waiting request gets the slot and finishes
        waiting.join(timeout=30)
        assert results and results[0].status_code == 200
        # the worker delivers a row's last piece before it drops the row from the batch: wait for that step
        deadline = time.time() + 10
        while app.state.scheduler.stats()["running"] and time.time() < deadline:
            time.sleep(0.01)
        assert app.state.scheduler.stats()["running"] == 0


def test_request_timeout_is_504(vlm):
    app = create_app(vlm, ServerSettings(model_name=MODEL, request_timeout=0.0))
    with serving(app) as base:
        response = _post(base, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"


def test_non_streamed_disconnect_cancels(vlm):
    app = create_app(vlm, ServerSettings(model_name=MODEL, max_tokens=1500))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on and on"}], "max_tokens": 1500}
    with serving(app) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
        deadline = time.time() + 5  # well before 1500 tokens could be decoded
        while app.state.scheduler.stats()["running"] or app.state.scheduler.stats()["waiting"]:
            assert time.time() < deadline, "the abandoned request is still generating"
            time.sleep(0.05)
        assert app.state.scheduler.steps < 1500


def test_http_image_fetch_pins_checks_redirects_and_caps(monkeypatch):
    """Fetching from a loopback HTTP server, with the public-address check stubbed to let loopback through."""
    import http.server

    import smolvlm.serve.images as images

    png = io.BytesIO()
    random_image(9).save(png, format="PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/cat.png")
                self.end_headers()
                return
            payload = png.getvalue() * (100 if self.path == "/big.png" else 1)
            self.send_response(200 if self.path in ("/cat.png", "/big.png") else 404)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://localhost:{server.server_address[1]}"
    policy = ImagePolicy(allow_http=True, allowed_hosts=("localhost",), max_bytes=len(png.getvalue()) * 10)
    try:
        with pytest.raises(ImageError, match="loopback"):
            images.fetch_image(base + "/cat.png", policy)
        monkeypatch.setattr(images, "is_public", lambda address: address.is_loopback)
        assert images.fetch_image(base + "/cat.png", policy) == png.getvalue()
        assert images.fetch_image(base + "/moved", policy) == png.getvalue()
        with pytest.raises(ImageError, match="limit"):
            images.fetch_image(base + "/big.png", policy)
        with pytest.raises(ImageError, match="HTTP 404"):
            images.fetch_image(base + "/missing", policy)
        with pytest.raises(ImageError, match="allow-list"):
            images.fetch_image(f"http://127.0.0.1:{server.server_address[1]}/cat.png", policy)
    finally:
        server.shutdown()
