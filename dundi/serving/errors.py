"""The one error a request can cause: an HTTP status, a short code, what is wrong and what
is expected. Every rejection the service makes is one of these, rendered as JSON::

    {"error": "<what is wrong>. Expected: <what would be accepted>", "code": "bad_shape",
     "expected": "<what would be accepted>"}

``error`` carries the whole message because the Open Inference Protocol (v2) defines error
bodies as ``{"error": "<message>"}``; ``code`` and ``expected`` are there for programs.

Statuses: 400 the request is malformed (JSON, multipart, image bytes, v2 structure);
401 a bearer token is required or wrong; 403 the admin route is disabled or its token is
wrong; 404 unknown model or route; 405 wrong method; 413 body or batch too large;
415 unsupported content type; 422 well-formed but invalid content (shape, dtype, NaN/Inf,
range, empty batch, bad reload settings); 503 the model is not loaded or its workers are
unavailable, or the service is at capacity (``max_pending``; retry after ``Retry-After``);
504 the model did not answer in time.
"""

from __future__ import annotations


class RequestError(Exception):
    """A request the service refuses, with the status and JSON body to answer."""

    def __init__(self, status: int, code: str, message: str, expected: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.expected = expected
        self.headers = headers or {}

    def body(self) -> dict:
        text = self.message if not self.expected else f"{self.message}. Expected: {self.expected}"
        out = {"error": text, "code": self.code}
        if self.expected:
            out["expected"] = self.expected
        return out

    def __reduce__(self):  # survives pickling between Serve replicas with all its fields
        return (RequestError, (self.status, self.code, self.message, self.expected, self.headers))


def bad_request(code: str, message: str, expected: str | None = None) -> RequestError:
    return RequestError(400, code, message, expected)


def invalid(code: str, message: str, expected: str | None = None) -> RequestError:
    return RequestError(422, code, message, expected)
