"""Client for the remote GenEval reward server of Flow-GRPO (spec §11), for paper-scale runs.

The detector (Mask2Former + CLIP colour classifier) lives in its own environment behind HTTP; this module
only ships JPEG-encoded images with their GenEval metadata and reads the scores back. Flow-GRPO's server
speaks pickle both ways, and unpickling network data runs arbitrary code, so responses are decoded as
JSON when the server says so and otherwise with an unpickler that refuses every global: plain builtin
containers, strings and numbers still load, anything that names a class or function is rejected.

Request wire formats, both POSTed to the server's URL:
- "json" (our own): {"images": [base64 JPEG str], "meta_datas": [dict], "only_strict": bool}.
- "pickle" (Flow-GRPO's): the same dict pickled, with the JPEGs as raw bytes.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import pickle
import time
import urllib.error
import urllib.request
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from reward_models.base import check_geneval_batch

URL_ENV = "TEMPFLOW_GENEVAL_REWARD_URL"
DEFAULT_URL = "http://127.0.0.1:18085"
GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
UNMATCHED = -10.0  # the server's filler in a per-task list for images of another task
SCORE_KEYS = {"partial": "scores", "strict": "strict_rewards", "standard": "rewards"}
GROUP_KEYS = ("group_rewards", "group_strict_rewards")
FIX_HINT = (
    f"Start the GenEval reward server (Flow-GRPO reward-server, app_geneval.py, which needs "
    f"wire='pickle') or set {URL_ENV} to its address."
)


class RewardServerError(RuntimeError):
    """The reward server could not be reached, refused the request, or sent an unusable answer."""


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickler that loads only builtin values: every global lookup is how pickle runs code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refused global {module}.{name}: responses may only hold dict/list/tuple/str/bytes/numbers"
        )


def restricted_loads(data: bytes) -> Any:
    """Unpickle untrusted bytes without resolving any global (so no code can run)."""
    return _NoGlobalsUnpickler(io.BytesIO(data)).load()


def encode_jpegs(images: Tensor) -> list[bytes]:
    """(B, 3, H, W) in [0, 1] -> JPEG bytes at PIL's default quality, quantised as Flow-GRPO does."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    out = []
    for array in pixels.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out


def encode_request(jpegs: list[bytes], metas: list[dict], only_strict: bool, wire: str) -> tuple[bytes, str]:
    """Request body and its Content-Type for the chosen wire format."""
    if wire == "pickle":
        payload = {"images": jpegs, "meta_datas": metas, "only_strict": only_strict}
        return pickle.dumps(payload), "application/octet-stream"
    images = [base64.b64encode(jpeg).decode("ascii") for jpeg in jpegs]
    payload = {"images": images, "meta_datas": metas, "only_strict": only_strict}
    return json.dumps(payload).encode("utf-8"), "application/json"


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def decode_response(body: bytes, content_type: str) -> dict:
    """JSON if the Content-Type says so, else restricted pickle; anything but a dict is an error."""
    try:
        data = json.loads(body) if _is_json(content_type) else restricted_loads(body)
    except pickle.UnpicklingError as err:
        raise RewardServerError(f"unsafe or malformed pickle response: {err}") from err
    except Exception as err:  # untrusted bytes: any decoding failure means a malformed response
        kind = "JSON" if _is_json(content_type) else "pickle"
        raise RewardServerError(f"malformed {kind} response ({content_type}): {err!r}") from err
    if not isinstance(data, dict):
        raise RewardServerError(f"response is a {type(data).__name__}, expected a dict")
    return data


def _numbers(data: dict, key: str, n: int, where: str) -> list[float]:
    """data[key] as n floats, or a RewardServerError naming what is wrong."""
    if key not in data:
        raise RewardServerError(f"{where} has no {key!r} (keys: {sorted(map(str, data))})")
    values = data[key]
    if not isinstance(values, (list, tuple)) or len(values) != n:
        size = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardServerError(f"{where}[{key!r}] should be a list of {n} numbers, got {size}")
    if not all(isinstance(v, (int, float)) for v in values):
        raise RewardServerError(f"{where}[{key!r}] holds non-numbers")
    return [float(v) for v in values]


def validate_response(data: dict, keys: tuple[str, ...], n: int) -> dict:
    """Keep the wanted keys, checked against the batch size n; per-task dicts are checked per task."""
    out: dict[str, Any] = {}
    for key in keys:
        if key not in GROUP_KEYS:
            out[key] = _numbers(data, key, n, "response")
            continue
        group = data.get(key)
        if not isinstance(group, dict):
            raise RewardServerError(f"response has no per-task dict {key!r}")
        out[key] = {str(task): _numbers(group, task, n, f"response[{key!r}]") for task in group}
    return out


def _excerpt(err: urllib.error.HTTPError, limit: int = 300) -> str:
    """Start of an error body (Flow-GRPO's server sends its traceback), for the error message."""
    try:
        text = err.read().decode("utf-8", errors="replace").strip()
    except (OSError, http.client.HTTPException) as read_err:  # the body may be cut off or time out too
        return f"(body unreadable: {read_err!r})"
    return text if len(text) <= limit else text[:limit] + "..."


def _merge(batches: list[dict], sizes: list[int]) -> dict:
    """Concatenate per-batch answers; a task missing from a batch counts as UNMATCHED there."""
    merged: dict[str, Any] = {}
    for key in batches[0]:
        if key not in GROUP_KEYS:
            merged[key] = [v for batch in batches for v in batch[key]]
            continue
        tasks = dict.fromkeys(task for batch in batches for task in batch[key])
        merged[key] = {
            task: [v for b, n in zip(batches, sizes, strict=True) for v in b[key].get(task, [UNMATCHED] * n)]
            for task in tasks
        }
    return merged


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class GenEvalServerReward:
    """Black-box GenEval reward from the remote server; needs each prompt's GenEval metadata."""

    name = "geneval"
    differentiable = False

    def __init__(
        self,
        url: str | None = None,
        batch_size: int = 64,
        timeout: float = 120.0,  # as the published client waits
        retries: int = 6,  # ours: back-off waits 2, 4, ..., 64 s, so a run outlasts a 2-minute restart
        backoff: float = 2.0,
        wire: Literal["json", "pickle"] = "json",
        score: Literal["partial", "strict", "standard"] = "partial",
        only_strict: bool = True,
    ) -> None:
        """retries counts the extra attempts after the first, so at most retries + 1 requests per batch."""
        if wire not in ("json", "pickle"):
            raise ValueError(f"wire must be 'json' or 'pickle', got {wire!r}")
        if score not in SCORE_KEYS:
            raise ValueError(f"score must be one of {sorted(SCORE_KEYS)}, got {score!r}")
        if score == "standard" and only_strict:
            raise ValueError("score='standard' needs only_strict=False: the server skips it otherwise")
        if batch_size < 1 or retries < 0:
            raise ValueError(f"need batch_size >= 1 and retries >= 0, got {batch_size} and {retries}")
        self.url = url or os.environ.get(URL_ENV) or DEFAULT_URL
        self.batch_size = batch_size
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.wire = wire
        self.score = score
        self.only_strict = only_strict
        # The server is a local or cluster-internal service: a proxy from the environment would only
        # get in the way (and urllib would otherwise route even loopback through it).
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __call__(self, images: Tensor, prompts: list[str], meta: list[dict] | None = None) -> Tensor:
        """(B,) float32 scores of the chosen kind (partial credit by default: the training reward)."""
        meta = check_geneval_batch(images, prompts, meta)
        key = SCORE_KEYS[self.score]
        result = self._query(images, meta, self.only_strict, (key,))
        return torch.tensor(result[key], dtype=torch.float32)

    def evaluate(self, images: Tensor, meta: list[dict]) -> dict[str, dict[str, float]]:
        """Per-task mean strict, standard and partial scores, plus 'overall' = mean over tasks.

        Always asks for the standard score (only_strict=False). A task's entries are those its per-task
        lists do not fill with UNMATCHED; tasks without any image are left out.
        """
        if len(meta) != images.shape[0]:
            raise ValueError(f"length mismatch: {images.shape[0]} images, {len(meta)} metadata")
        keys = (*SCORE_KEYS.values(), *GROUP_KEYS)
        result = self._query(images, meta, False, keys)
        per_task: dict[str, dict[str, float]] = {}
        for task, strict in result["group_strict_rewards"].items():
            index = [i for i, v in enumerate(strict) if v != UNMATCHED]
            standard = [v for v in result["group_rewards"].get(task, []) if v != UNMATCHED]
            if not index or not standard:
                continue
            per_task[task] = {
                "strict": _mean([strict[i] for i in index]),
                "standard": _mean(standard),
                "partial": _mean([result["scores"][i] for i in index]),
                "n": float(len(index)),
            }
        if per_task:
            per_task["overall"] = {
                key: _mean([r[key] for r in per_task.values()]) for key in ("strict", "standard", "partial")
            }
        return per_task

    def _query(self, images: Tensor, meta: list[dict], only_strict: bool, keys: tuple[str, ...]) -> dict:
        """Send the images in batches of batch_size and merge the validated answers in order."""
        batches, sizes = [], []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size]
            metas = list(meta[start : start + self.batch_size])
            body, content_type = encode_request(encode_jpegs(chunk), metas, only_strict, self.wire)
            reply = self._post(body, content_type)
            try:
                batches.append(validate_response(decode_response(*reply), keys, len(metas)))
            except RewardServerError as err:  # said without the server's address, which a run log needs
                raise self._unusable(err) from err
            sizes.append(len(metas))
        if not batches:
            return {key: {} if key in GROUP_KEYS else [] for key in keys}
        return _merge(batches, sizes)

    def _post(self, body: bytes, content_type: str) -> tuple[bytes, str]:
        """POST with retries on connection errors, timeouts and HTTP 5xx; (body, content type) back."""
        last: Exception | None = None
        detail = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._send(body, content_type)
            except urllib.error.HTTPError as err:  # before OSError: HTTPError is one
                last, detail = err, f"HTTP {err.code} {err.reason}: {_excerpt(err)}"
                if err.code < 500:
                    raise self._failure(attempt + 1, detail) from err
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, cut short
                last, detail = err, repr(err)
        raise self._failure(self.retries + 1, detail) from last

    def _send(self, body: bytes, content_type: str) -> tuple[bytes, str]:
        request = urllib.request.Request(
            self.url,
            data=body,
            headers={"Content-Type": content_type, "Accept": "application/json, application/octet-stream"},
            method="POST",
        )
        with self._opener.open(request, timeout=self.timeout) as response:
            return response.read(), response.headers.get_content_type()

    def _unusable(self, error: RewardServerError) -> RewardServerError:
        return RewardServerError(
            f"GenEval reward server at {self.url} sent an unusable answer: {error}. Check that {URL_ENV} "
            "(or the run's geneval_url) names the GenEval reward server and that wire matches it "
            "('pickle' for Flow-GRPO's app_geneval.py); its log shows what went wrong."
        )

    def _failure(self, attempts: int, detail: str) -> RewardServerError:
        return RewardServerError(
            f"GenEval reward server at {self.url} failed after {attempts} attempt(s); last error: {detail}. "
            + FIX_HINT
        )
