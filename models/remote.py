"""The detector's network run on a Triton Inference Server instead of in this process.

Only the network crosses the wire: preprocessing (with the lung crop), decoding, calibration
and the clinical rules stay on the node. Tensors go over gRPC as binary data (KServe v2
protocol, ``tritonclient.grpc``), sliding windows several to a request, each request with a
deadline. Before the first request, and again after every lost connection, the served model is
checked against the model card: the same name, the version derived from the card's, and the
card's version and the ONNX file's SHA-256 recorded in the model's ``config.pbtxt`` parameters
by ``lungscreen triton export``. A mismatch is refused (:class:`RemoteModelMismatch`): the
card's calibration and operating points belong to those weights only.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from lungscreen.errors import LungScreenError, ModelError
from lungscreen.models.card import ModelCard

log = logging.getLogger(__name__)

# Parameters that `lungscreen triton export` writes into config.pbtxt and the runner checks.
CARD_VERSION_PARAMETER = "lungscreen_card_version"
ONNX_SHA256_PARAMETER = "lungscreen_onnx_sha256"

WINDOWS_PER_REQUEST = 4  # sliding windows sent together (Triton batches across nodes too)
REQUEST_ATTEMPTS = 3  # a request that times out or loses its connection is sent again, up to this
RETRY_PAUSE_S = 0.5


class InferenceServerUnavailable(LungScreenError):
    """Triton could not be reached or did not answer in time; nothing was produced. The
    study can be retried later unchanged (``inference_server_unavailable``)."""


class RemoteModelMismatch(ModelError):
    """The inference server serves another model or version than the configured card."""


def triton_version(card_version: str) -> int:
    """Triton's integer model version for a card's ``MAJOR.MINOR.PATCH`` version
    (1.2.0 -> 1002000), so that the repository's version folder names the card's version."""
    parts = card_version.split(".")
    if len(parts) != 3 or not all(p.isdigit() and int(p) < 1000 for p in parts):
        raise ModelError(f"model card version {card_version!r} is not MAJOR.MINOR.PATCH with parts below 1000")
    major, minor, patch = (int(p) for p in parts)
    return major * 1_000_000 + minor * 1_000 + patch


@cache
def onnx_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> "ServerAddress":
        """``grpc://HOST:PORT`` (the only scheme: binary tensors over gRPC)."""
        parsed = urlparse(url)
        if parsed.scheme != "grpc" or not parsed.hostname or not parsed.port:
            raise ValueError(f"inference_server must be grpc://HOST:PORT, not {url!r}")
        return cls(parsed.hostname, parsed.port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RemoteCall:
    """What one study's inference sent: answered requests, bytes of their input tensors, their
    seconds, and failed attempts (retries)."""

    requests: int
    bytes_sent: int
    seconds: float
    retries: int


class TritonRunner:
    """Runs a batch of network inputs on Triton: ``runner(batch) -> output`` like the local
    ONNX Runtime session, for :class:`models.detector.Detector`. Thread-safe."""

    windows_per_request = WINDOWS_PER_REQUEST
    where = "remote"

    def __init__(self, url: str, card: ModelCard, *, timeout_s: float = 60.0) -> None:
        import tritonclient.grpc as grpcclient  # optional dependency: only a remote node needs it

        self._grpc = grpcclient
        self.address = ServerAddress.parse(url)
        self.card = card
        self.timeout_s = timeout_s
        self.model_name = card.name
        self.model_version = str(triton_version(card.version))
        self._client = grpcclient.InferenceServerClient(str(self.address))
        self._lock = threading.Lock()
        self._verified = False
        self._output_name: str | None = None
        self._calls = RemoteCall(0, 0, 0.0, 0)

    @property
    def description(self) -> str:
        return f"Triton Inference Server at {self.address}, model {self.model_name} version {self.model_version}"

    def verify(self) -> None:
        """Check that the server is up and serves exactly the card's model; raise
        :class:`InferenceServerUnavailable` or :class:`RemoteModelMismatch`."""
        from tritonclient.utils import InferenceServerException

        try:
            if not self._client.is_server_live(client_timeout=self.timeout_s):
                raise InferenceServerUnavailable(f"inference server {self.address} is not live")
            if not self._client.is_model_ready(self.model_name, self.model_version, client_timeout=self.timeout_s):
                served = self._client.get_model_repository_index(client_timeout=self.timeout_s)
                offered = ", ".join(f"{m.name} {m.version} ({m.state or 'unknown'})" for m in served.models) or "nothing"
                raise RemoteModelMismatch(
                    f"inference server {self.address} has no ready {self.model_name} version {self.model_version} "
                    f"(model card {self.card.version}); it serves {offered}"
                )
            config = self._client.get_model_config(self.model_name, self.model_version, client_timeout=self.timeout_s).config
        except InferenceServerException as exc:
            raise InferenceServerUnavailable(f"inference server {self.address}: {exc.message()}") from None
        parameters = {key: value.string_value for key, value in config.parameters.items()}
        expected = {CARD_VERSION_PARAMETER: self.card.version, ONNX_SHA256_PARAMETER: onnx_sha256(self.card.onnx_path)}
        wrong = {k: parameters.get(k) for k, v in expected.items() if parameters.get(k) != v}
        if wrong:
            raise RemoteModelMismatch(
                f"inference server {self.address} serves {self.model_name} version {self.model_version} whose "
                f"{', '.join(f'{k}={v!r}' for k, v in wrong.items())} differs from model card {self.card.path} "
                f"({', '.join(f'{k}={expected[k]!r}' for k in wrong)}); refusing to use it"
            )
        inputs = [i.name for i in config.input]
        if inputs != [self.card.inference["input_name"]] or len(config.output) != 1:
            raise RemoteModelMismatch(f"inference server model has inputs {inputs}, outputs "
                                      f"{[o.name for o in config.output]}; the card expects one input "
                                      f"{self.card.inference['input_name']!r} and one output")
        self._output_name = config.output[0].name
        self._verified = True
        log.info("inference server %s verified: %s", self.address, self.description)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """One request (the windows of ``batch``), sent again on a timeout or a lost connection
        (inference has no side effect, so a repeat changes nothing)."""
        from tritonclient.utils import InferenceServerException

        batch = np.ascontiguousarray(batch, dtype=np.float32)
        for attempt in range(1, REQUEST_ATTEMPTS + 1):
            try:
                with self._lock:
                    if not self._verified:
                        self.verify()
                started = time.perf_counter()
                infer_input = self._grpc.InferInput(self.card.inference["input_name"], list(batch.shape), "FP32")
                infer_input.set_data_from_numpy(batch)
                result = self._client.infer(
                    self.model_name, [infer_input], model_version=self.model_version,
                    outputs=[self._grpc.InferRequestedOutput(self._output_name)], client_timeout=self.timeout_s,
                )
                output = result.as_numpy(self._output_name)
                if output is None or output.shape[0] != batch.shape[0]:
                    raise ModelError(f"inference server returned no usable {self._output_name!r} tensor")
                output = np.array(output)  # a writable copy: the response's buffer is read-only
                with self._lock:
                    c = self._calls
                    self._calls = RemoteCall(c.requests + 1, c.bytes_sent + batch.nbytes,
                                             c.seconds + time.perf_counter() - started, c.retries)
                return output
            except (InferenceServerException, InferenceServerUnavailable) as exc:
                message = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
                with self._lock:
                    self._verified = False  # reconnecting: check the model again before using it
                    c = self._calls
                    self._calls = RemoteCall(c.requests, c.bytes_sent, c.seconds, c.retries + 1)
                if attempt == REQUEST_ATTEMPTS:
                    raise InferenceServerUnavailable(
                        f"inference server {self.address} failed {REQUEST_ATTEMPTS} attempts: {message}"
                    ) from None
                log.warning("inference request to %s failed (attempt %d): %s; sending it again",
                            self.address, attempt, message)
                time.sleep(RETRY_PAUSE_S * attempt)
        raise AssertionError("unreachable")

    def take_calls(self) -> RemoteCall:
        """What was sent since the last call (one study's worth when read after each study)."""
        with self._lock:
            calls, self._calls = self._calls, RemoteCall(0, 0, 0.0, 0)
        return calls
