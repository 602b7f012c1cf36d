"""Triton Inference Server: a model repository for a model card, and a local server.

Repository layout (Triton's standard one, the same for the bundled server and NGC's container)::

    OUT_DIR/<card name>/config.pbtxt
    OUT_DIR/<card name>/model_card.json            the card travels with its weights
    OUT_DIR/<card name>/<version>/model.onnx       version = 1.2.0 -> 1002000 (models.remote.triton_version)
    OUT_DIR/<card name>/<version>/model.py         backend "python" only

``onnxruntime`` is the production form (``platform: "onnxruntime_onnx"``, dynamic batching, GPU
instances, the TensorRT accelerator); ``python`` is a Python-backend model running ONNX Runtime
on CPU, the form the ``tritonserver`` bundled in the PyPI package nvidia-pytriton can run (it
has no ONNX Runtime backend). Both record the card's version and the ONNX file's SHA-256 as
model parameters, which the node checks before using the model (models/remote.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import onnx

from lungscreen.errors import LungScreenError, ModelError
from lungscreen.models.card import ModelCard
from lungscreen.models.remote import CARD_VERSION_PARAMETER, ONNX_SHA256_PARAMETER, onnx_sha256, triton_version

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "python")
MAX_BATCH_SIZE = 8  # windows per batch; the node sends models.remote.WINDOWS_PER_REQUEST at a time
MAX_QUEUE_DELAY_US = 2000  # how long Triton holds a request to batch it with others (other nodes')
TRITON_ENV_VARIABLE = "LUNGSCREEN_TRITON_ENV"  # the virtual environment made by scripts/install_triton.sh
DEFAULT_TRITON_ENV = ".venv-triton"

_ONNX_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}

# The Python-backend model (backend "python"): ONNX Runtime on the ONNX file beside it.
PYTHON_MODEL = '''"""Triton Python-backend model written by `lungscreen triton export`: runs the ONNX file
beside it with ONNX Runtime on CPU. Research use only. Not for diagnostic use."""

import json
import os

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        options = ort.SessionOptions()
        threads = config.get("parameters", {}).get("intra_op_threads", {}).get("string_value", "0")
        options.intra_op_num_threads = int(threads)  # 0: all cores
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests):
        responses = []
        for request in requests:  # windows of different sizes cannot share one run
            batch = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            try:
                (out,) = self.session.run([self.output_name], {self.input_name: batch})
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, out)]))
            except Exception as exc:  # ONNX Runtime's own types: answer this request with the error
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses
'''


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's, e.g. TYPE_FP32
    dims: tuple[int, ...]  # without the batch dimension; -1 = any


def _tensor_specs(values) -> list[TensorSpec]:
    specs = []
    for value in values:
        tensor = value.type.tensor_type
        if tensor.elem_type not in _ONNX_TYPES:
            raise ModelError(f"ONNX tensor {value.name!r} has element type {tensor.elem_type}, not float")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        specs.append(TensorSpec(value.name, _ONNX_TYPES[tensor.elem_type], dims[1:]))
    return specs


def model_signature(card: ModelCard) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The network's inputs and outputs as Triton declares them, read from the ONNX file."""
    graph = onnx.load(str(card.onnx_path), load_external_data=False).graph
    initialisers = {i.name for i in graph.initializer}
    inputs = _tensor_specs(v for v in graph.input if v.name not in initialisers)
    if [i.name for i in inputs] != [card.inference["input_name"]]:
        raise ModelError(f"{card.onnx_path.name} has inputs {[i.name for i in inputs]}; the card names "
                         f"{card.inference['input_name']!r}")
    return inputs, _tensor_specs(graph.output)


def _tensors(kind: str, specs: list[TensorSpec]) -> str:
    items = ",\n".join(
        f'  {{\n    name: "{s.name}"\n    data_type: {s.data_type}\n    dims: [ {", ".join(map(str, s.dims))} ]\n  }}'
        for s in specs
    )
    return f"{kind} [\n{items}\n]\n"


def _parameters(values: dict[str, str]) -> str:
    return "".join(f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n' for k, v in values.items())


def config_pbtxt(card: ModelCard, backend: str) -> str:
    """Triton's model configuration (protobuf text format, ``inference.ModelConfig``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    inputs, outputs = model_signature(card)
    version = triton_version(card.version)
    head = [f'name: "{card.name}"']
    if backend == "onnxruntime":
        head.append('platform: "onnxruntime_onnx"')
    else:
        head.append('backend: "python"')
    head += [
        f"max_batch_size: {MAX_BATCH_SIZE}",
        f"version_policy: {{ specific: {{ versions: [ {version} ] }} }}",
    ]
    text = "\n".join(head) + "\n" + _tensors("input", inputs) + _tensors("output", outputs)
    text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n}}\n"
    if backend == "onnxruntime":
        # One instance per GPU; TensorRT builds an engine per input shape it sees. FP16 only
        # where the card says its calibration holds with it (inference.fp16_allowed).
        precision = "FP16" if card.inference.get("fp16_allowed", False) else "FP32"
        text += "instance_group [\n  {\n    kind: KIND_GPU\n    count: 1\n  }\n]\n"
        text += (
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
            '        name: "tensorrt"\n'
            f'        parameters {{ key: "precision_mode" value: "{precision}" }}\n'
            '        parameters { key: "max_workspace_size_bytes" value: "4294967296" }\n'
            '        parameters { key: "trt_engine_cache_enable" value: "1" }\n'
            "      }\n    ]\n  }\n}\n"
        )
    else:
        text += "instance_group [\n  {\n    kind: KIND_CPU\n    count: 1\n  }\n]\n"
    params = {CARD_VERSION_PARAMETER: card.version, ONNX_SHA256_PARAMETER: onnx_sha256(card.onnx_path)}
    if backend == "python":
        params["intra_op_threads"] = "0"
    return text + _parameters(params)


def export_repository(card: ModelCard, out_dir: Path, *, backend: str = "onnxruntime") -> Path:
    """Write (or replace) the card's model in the Triton repository ``out_dir``; return its folder."""
    config = config_pbtxt(card, backend)
    model_dir = Path(out_dir) / card.name
    if model_dir.exists():
        shutil.rmtree(model_dir)  # a stale version folder would be served beside the new one
    version_dir = model_dir / str(triton_version(card.version))
    version_dir.mkdir(parents=True)
    shutil.copyfile(card.onnx_path, version_dir / "model.onnx")
    if backend == "python":
        (version_dir / "model.py").write_text(PYTHON_MODEL)
    (model_dir / "config.pbtxt").write_text(config)
    (model_dir / "model_card.json").write_text(json.dumps(card.raw, indent=2) + "\n")
    log.info("exported %s %s to %s (%s backend)", card.name, card.version, model_dir, backend)
    return model_dir


# --- the bundled server --------------------------------------------------------------------


class TritonNotInstalled(LungScreenError):
    """The virtual environment with the bundled tritonserver is missing (scripts/install_triton.sh)."""


@dataclass(frozen=True)
class TritonEnvironment:
    """What scripts/install_triton.sh wrote to ``triton-env.json``."""

    tritonserver: Path
    backend_directory: Path
    ld_library_path: str
    python_bin: Path  # put first on PATH: the Python-backend stub takes its interpreter's prefix from it

    @classmethod
    def find(cls, env_dir: Path | None = None) -> "TritonEnvironment":
        """From ``env_dir``, else $LUNGSCREEN_TRITON_ENV, else .venv-triton here or in the checkout."""
        candidates = [env_dir] if env_dir else (
            [Path(os.environ[TRITON_ENV_VARIABLE])] if os.environ.get(TRITON_ENV_VARIABLE) else
            [Path(DEFAULT_TRITON_ENV), Path(__file__).resolve().parents[1] / DEFAULT_TRITON_ENV]
        )
        for directory in candidates:
            path = directory / "triton-env.json"
            if path.is_file():
                env = json.loads(path.read_text())
                found = cls(Path(env["tritonserver"]), Path(env["backend_directory"]), env["LD_LIBRARY_PATH"],
                            Path(env["python_bin"]))
                if found.tritonserver.is_file():
                    return found
        raise TritonNotInstalled(
            f"no Triton environment in {', '.join(str(c) for c in candidates)}: run scripts/install_triton.sh"
        )


@dataclass(frozen=True)
class TritonPorts:
    grpc: int = 8001
    http: int = 8000
    metrics: int = 8002


class TritonServer:
    """The bundled ``tritonserver``, bound to 127.0.0.1 only, as a child process."""

    def __init__(self, repository: Path, ports: TritonPorts = TritonPorts(), *, env: TritonEnvironment | None = None,
                 log_path: Path | None = None) -> None:
        self.repository = Path(repository).resolve()
        self.ports = ports
        self.env = env or TritonEnvironment.find()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.ports.grpc}"

    def command(self) -> list[str]:
        return [
            str(self.env.tritonserver),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.env.backend_directory}",
            "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
            f"--http-port={self.ports.http}", f"--grpc-port={self.ports.grpc}", f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false", "--strict-readiness=true", "--exit-on-error=true",
        ]

    def start(self, *, ready_timeout_s: float = 120.0) -> "TritonServer":
        environment = dict(os.environ)
        environment["LD_LIBRARY_PATH"] = self.env.ld_library_path
        environment["PATH"] = f"{self.env.python_bin}{os.pathsep}{environment.get('PATH', '')}"
        environment.pop("PYTHONPATH", None)  # the stub's interpreter ignores it; its site-packages come from PATH
        output = open(self.log_path, "ab") if self.log_path else None  # None: this process's stdout
        self.process = subprocess.Popen(self.command(), env=environment, stdout=output, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        if self.log_path:
            output.close()
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LungScreenError(f"tritonserver exited with status {self.process.returncode} while starting"
                                      + (f"; see {self.log_path}" if self.log_path else ""))
            if self.ready():
                log.info("Triton ready: gRPC 127.0.0.1:%d, HTTP %d, metrics %d, repository %s",
                         self.ports.grpc, self.ports.http, self.ports.metrics, self.repository)
                return self
            time.sleep(0.5)
        self.stop()
        raise LungScreenError(f"tritonserver was not ready within {ready_timeout_s:g} s")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.http}/v2/health/ready", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: a crash, for fault tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- command line --------------------------------------------------------------------------


def add_cli(sub) -> None:
    """``lungscreen triton export`` and ``lungscreen triton serve``."""
    from lungscreen.models.card import DEFAULT_MODEL_CARD

    triton = sub.add_parser("triton", help="Triton Inference Server: model repository and a local server")
    triton_sub = triton.add_subparsers(dest="triton_command", required=True)
    export = triton_sub.add_parser("export", help="write a Triton model repository for a model card")
    export.add_argument("out_dir", type=Path)
    export.add_argument("--model-card", type=Path, default=DEFAULT_MODEL_CARD, help="model card (JSON) or its folder")
    export.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                        help="onnxruntime: production (GPU, TensorRT); python: the bundled CPU server")
    export.set_defaults(func=_cmd_export)
    serve = triton_sub.add_parser("serve", help="run the bundled tritonserver on 127.0.0.1 (CPU, Python backend)")
    serve.add_argument("--repository", type=Path, required=True)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--triton-env", type=Path, help="environment made by scripts/install_triton.sh")
    serve.set_defaults(func=_cmd_serve)


def _cmd_export(args) -> int:
    from lungscreen.models.card import load_card

    model_dir = export_repository(load_card(args.model_card), args.out_dir, backend=args.backend)
    print(f"wrote {model_dir}")
    return 0


def _cmd_serve(args) -> int:
    server = TritonServer(args.repository, TritonPorts(args.grpc_port, args.http_port, args.metrics_port),
                          env=TritonEnvironment.find(args.triton_env))
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    server.start()
    print(f"Triton ready: {server.grpc_url} (HTTP {args.http_port}, metrics {args.metrics_port})", flush=True)
    while not stop and server.process.poll() is None:
        time.sleep(0.5)
    server.stop()
    return 0 if stop else 2
