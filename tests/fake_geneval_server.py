"""A fake GenEval reward server on loopback, for testing the HTTP client without the real detector.

It speaks both request formats of reward_models/geneval_server.py and scores by a rule tests can
predict: an image's partial score is its mean pixel value (0-255) rounded to an integer, strict
correctness is score >= 128 and standard correctness score >= 64 (0.0 when only_strict, like the real
server). Knobs make it fail, stall or misbehave in the ways the client has to survive.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import pickle
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import numpy as np
from PIL import Image

from reward_models.geneval_server import GENEVAL_TASKS, UNMATCHED

STRICT_AT = 128
STANDARD_AT = 64
FLASK_CONTENT_TYPE = "text/html; charset=utf-8"  # what Flask labels Flow-GRPO's pickled bytes with


def brightness(jpeg: bytes) -> float:
    """The fake partial score: rounded mean pixel value of the decoded JPEG."""
    return float(round(np.asarray(Image.open(io.BytesIO(jpeg), formats=["JPEG"])).mean()))


def decode_request(body: bytes, content_type: str) -> tuple[list[bytes], dict, str]:
    """(JPEGs, request dict, wire) from either format.

    Unpickling the request is acceptable only because this server is ours, bound to loopback and fed by
    our own client in tests; never copy this into anything that listens on a real network.
    """
    if content_type == "application/json":
        request = json.loads(body)
        return [base64.b64decode(image) for image in request["images"]], request, "json"
    request = pickle.loads(body)
    return list(request["images"]), request, "pickle"


def score_batch(jpegs: list[bytes], metas: list[dict], only_strict: bool) -> dict[str, Any]:
    """A Flow-GRPO-shaped response: flat lists plus per-task lists filled with UNMATCHED elsewhere."""
    scores = [brightness(jpeg) for jpeg in jpegs]
    strict = [float(s >= STRICT_AT) for s in scores]
    standard = [0.0 if only_strict else float(s >= STANDARD_AT) for s in scores]
    tags = [meta["tag"] for meta in metas]

    def per_task(values: list[float]) -> dict[str, list[float]]:
        return {
            task: [v if t == task else UNMATCHED for v, t in zip(values, tags, strict=True)]
            for task in GENEVAL_TASKS
        }

    return {
        "scores": scores,
        "rewards": standard,
        "strict_rewards": strict,
        "group_rewards": per_task(standard),
        "group_strict_rewards": per_task(strict),
    }


@dataclass
class FakeGenEvalServer:
    """Context manager: `with FakeGenEvalServer(...) as url:` serves on 127.0.0.1 at an ephemeral port."""

    reply: Literal["json", "pickle"] = "json"
    fail_first: int = 0  # answer the first N requests with HTTP 503
    delay: float = 0.0  # seconds to stall before answering (to trigger client timeouts)
    status: int | None = None  # answer every request with this HTTP error status
    malformed: Literal["garbage", "missing", "short"] | None = None  # break the 200 response body
    forbidden_global: bool = False  # reply with a pickle that names a global (collections.OrderedDict)
    requests: int = 0  # every request received, failed or not
    batch_sizes: list[int] = field(default_factory=list)  # per scored request
    wires: list[str] = field(default_factory=list)  # per scored request
    only_strict: list[bool] = field(default_factory=list)  # per scored request
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> str:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def answer(self, body: bytes, content_type: str) -> tuple[int, bytes, str]:
        """(status, body, content type) for one request, applying the knobs in order."""
        with self.lock:
            self.requests += 1
            count = self.requests
        if self.delay:
            time.sleep(self.delay)
        if count <= self.fail_first:
            return 503, b"server warming up", "text/plain"
        if self.status is not None:
            return self.status, b"cannot parse request", "text/plain"
        jpegs, request, wire = decode_request(body, content_type)
        with self.lock:
            self.batch_sizes.append(len(jpegs))
            self.wires.append(wire)
            self.only_strict.append(bool(request["only_strict"]))
        return 200, *self.encode(score_batch(jpegs, request["meta_datas"], request["only_strict"]))

    def encode(self, response: dict[str, Any]) -> tuple[bytes, str]:
        """Response body and content type, possibly broken on purpose."""
        if self.malformed == "garbage":
            return b"<html>Internal proxy page</html>", "application/json"
        if self.malformed == "missing":
            del response["scores"]
        if self.malformed == "short":
            response["scores"] = response["scores"][:-1]
        if self.forbidden_global:
            return pickle.dumps(collections.OrderedDict(response)), FLASK_CONTENT_TYPE
        if self.reply == "pickle":
            return pickle.dumps(response), FLASK_CONTENT_TYPE
        return json.dumps(response).encode("utf-8"), "application/json"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        fake: FakeGenEvalServer = self.server.fake  # type: ignore[attr-defined]
        status, payload, content_type = fake.answer(body, self.headers.get_content_type())
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and hung up; nothing to answer

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""
