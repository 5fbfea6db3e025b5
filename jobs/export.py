"""``tal export``: a checkpoint's dense part as an ONNX or TorchScript file, and ONNX Runtime detectors.

    checkpoint -> DenseGraph (tal_models.export) -> trace at 2 x T0 steps (a padded batch)
               -> model.onnx (ONNX, TorchScript-based exporter, opset 13+) or model.ts (torch.jit.trace)
               -> checked against PyTorch at another length (``verify``)

One file carries everything needed to use it: the JSON of ``ExportInfo`` (detector config, labels,
provenance, metadata, where it came from) sits in the ONNX model's ``metadata_props["tal"]`` or in
the TorchScript archive's extra file ``tal.json``. ``open_exported`` reads it back;
``onnx_detector`` makes a ``RuntimeDetector`` over ONNX Runtime from such a file or from a
checkpoint (exported in memory, on the fly).

Why the TorchScript-based ONNX exporter and not ``dynamo=True``: measured with torch 2.14.1, the
dynamo exporter specialises the local attention's block size (``min(32, T)``) and its ceil
division, so ActionFormer's graph is wrong or fails at lengths other than the traced one (and it
takes ~1 min for a tiny model); the TorchScript-based exporter keeps those sizes symbolic once two
of its symbolics are corrected (``_register_symbolics``). Both layers stay as they are.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from jobs.errors import UsageError
from tal_models.checkpoint import Checkpoint
from tal_models.config import config_from_dict, config_to_dict
from tal_models.detectors import OneStageConfig, OneStageDetector, config_type
from tal_models.export import INPUT_NAMES, OUTPUT_NAMES, DenseGraph, RuntimeDetector, example_inputs
from tal_models.structures import LabelMap

ExportFormat = Literal["onnx", "torchscript"]
EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts"}
EXPORT_INFO_FORMAT = "tal-export/1"
METADATA_KEY = "tal"  # ONNX metadata_props key
EXTRA_FILE = "tal.json"  # TorchScript extra file
DEFAULT_OPSET = 17
MIN_OPSET = 13  # Unsqueeze with axes as an input
VERIFY_TOLERANCE = 1e-4


class ExportError(ValueError):
    """A model that cannot be exported, or a file that is not an export of ours."""


@dataclass(frozen=True)
class ExportInfo:
    """What an exported file carries beside its graph (JSON inside the file)."""

    format: ExportFormat
    config: OneStageConfig
    labels: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the model reference it was exported from
    torch_version: str = ""
    opset: int | None = None  # ONNX only

    @property
    def label_map(self) -> LabelMap:
        return LabelMap.from_names(self.labels)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": EXPORT_INFO_FORMAT,
                "graph": self.format,
                "family": self.config.family,
                "config": config_to_dict(self.config),
                "labels": self.labels,
                "provenance": self.provenance,
                "metadata": self.metadata,
                "source": self.source,
                "torch": self.torch_version,
                "opset": self.opset,
                "inputs": {
                    "features": "[B, C, T] float32",
                    "mask": "[B, T] bool",
                    "T": f"a multiple of {self.config.encoder.total_stride}",
                },
                "outputs": {"cls_logits": "[B, P, K] float32", "reg_offsets": "[B, P, 2] float32 (strides)", "valid": "[B, P] bool"},
            },
            default=str,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> ExportInfo:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ExportError(f"{where}: its tal metadata is not JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != EXPORT_INFO_FORMAT:
            raise ExportError(f"{where}: not a {EXPORT_INFO_FORMAT} export (its tal metadata says {data.get('format')!r})")
        config = config_from_dict(config_type(data.get("family", "one_stage")), data["config"], where=f"{where}: config")
        return cls(
            data["graph"], config, list(data["labels"]), dict(data.get("provenance") or {}), dict(data.get("metadata") or {}),
            data.get("source", ""), data.get("torch", ""), data.get("opset"),
        )  # fmt: skip


NOT_EXPORTABLE_KINDS = ("mamba", "causal", "mstemba")  # encoders built on the pure-PyTorch selective scan


def export_info(checkpoint: Checkpoint, fmt: ExportFormat, source: str = "", opset: int | None = None) -> ExportInfo:
    metadata = {k: v for k, v in checkpoint.metadata.items() if isinstance(v, str | int | float | bool | type(None) | dict | list)}
    return ExportInfo(
        fmt, checkpoint.config, list(checkpoint.labels), dict(checkpoint.provenance), metadata, source, torch.__version__, opset
    )


# --- exporting -------------------------------------------------------------------------------


def export_checkpoint(
    checkpoint: Checkpoint,
    fmt: str,
    out: str | os.PathLike | io.BytesIO,
    *,
    opset: int = DEFAULT_OPSET,
    source: str = "",
    verify: bool = True,
) -> float | None:
    """Write ``checkpoint``'s dense part as ``fmt`` to ``out`` (a path or a buffer).

    ``verify``: run the written graph at a length other than the traced one, on a padded batch,
    and refuse (``ExportError``) if it differs from PyTorch by more than ``VERIFY_TOLERANCE``;
    returns that largest difference (None without ``verify``).
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if not isinstance(checkpoint.config, OneStageConfig) or checkpoint.config.task != "detection":
        kind = checkpoint.config.family if not isinstance(checkpoint.config, OneStageConfig) else "dense (per-step)"
        raise ExportError(f"only one-stage detectors of segments export (their dense part); this checkpoint is a {kind} detector")
    if checkpoint.config.encoder.kind in NOT_EXPORTABLE_KINDS:
        raise ExportError(
            f"{checkpoint.config.arch} does not export: its selective scan (encoder.kind {checkpoint.config.encoder.kind!r}) is a loop over "
            "time chunks that tracing unrolls at one length; serve the checkpoint with PyTorch (tal serve --runtime torch)"
        )
    model = checkpoint.build("cpu")
    assert isinstance(model, OneStageDetector)
    graph = DenseGraph(model).eval()
    inputs = example_inputs(model.config)
    if fmt == "onnx":
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
            raise ExportError(f"--opset must be an int >= {MIN_OPSET}, got {opset!r}")
        data = _export_onnx(graph, inputs, export_info(checkpoint, "onnx", source, opset), opset)
    else:
        data = _export_torchscript(graph, inputs, export_info(checkpoint, "torchscript", source))
    diff = None
    if verify:  # before writing: a graph that is wrong elsewhere than at the traced length is never written
        diff = verify_graph(graph, _onnx_runtime(data, 1) if fmt == "onnx" else _torchscript_runtime(data), model.config)
    if isinstance(out, io.BytesIO):
        out.write(data)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{out}.tmp")
        tmp.write_bytes(data)
        tmp.replace(out)
    return diff


def verify_graph(graph: DenseGraph, runtime, config: OneStageConfig) -> float:
    """Largest difference between ``runtime`` and PyTorch at 1.5 x the traced length (two videos, one
    padded); ``ExportError`` above ``VERIFY_TOLERANCE`` (valid points only: padded ones are never decoded)."""
    traced = example_inputs(config)[0].shape[-1]
    multiple = config.encoder.total_stride
    length = -(-(traced * 3 // 2) // multiple) * multiple
    features, mask = example_inputs(config, length)
    mask[1, length // 3 :] = False
    features = features.masked_fill(~mask[:, None, :], 0.0)
    with torch.no_grad():
        want = graph(features, mask)
    got = runtime(features.numpy(), mask.numpy())
    valid = want[2].numpy()
    if not np.array_equal(np.asarray(got[2]), valid):
        raise ExportError(f"the exported graph's valid points differ from PyTorch's at T = {length}")
    worst = max(float(np.abs(np.asarray(g) - w.numpy())[valid].max(initial=0.0)) for g, w in zip(got[:2], want[:2]))
    if not worst <= VERIFY_TOLERANCE:
        raise ExportError(f"the exported graph differs from PyTorch by {worst:.3g} at T = {length} (tolerance {VERIFY_TOLERANCE})")
    return worst


def _export_onnx(graph: DenseGraph, inputs, info: ExportInfo, opset: int) -> bytes:
    onnx = require_onnx()
    _register_symbolics()
    buf = io.BytesIO()
    dynamic = {"features": {0: "batch", 2: "steps"}, "mask": {0: "batch", 1: "steps"}}
    dynamic.update({name: {0: "batch", 1: "points"} for name in OUTPUT_NAMES})
    with torch.no_grad(), warnings.catch_warnings(), _export_errors("ONNX", opset):
        # the trace's warnings are about Python ints read off shapes; verify_graph checks the graph at another length
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, inputs, buf, dynamo=False, opset_version=opset, input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic,
        )  # fmt: skip
    model = onnx.load_from_string(buf.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, info.to_json()
    model.producer_name = "tal export"
    return model.SerializeToString()


@contextlib.contextmanager
def _export_errors(what: str, opset: int | None = None):
    """The exporter's own exceptions (an unsupported opset, an operator without a symbolic) as ``ExportError``."""
    try:
        yield
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.onnx raises many types; the message is what the user needs
        where = f" at opset {opset}" if opset is not None else ""
        raise ExportError(f"the {what} exporter failed{where}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e


def _export_torchscript(graph: DenseGraph, inputs, info: ExportInfo) -> bytes:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, inputs, check_trace=False)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.save. is deprecated", category=FutureWarning)
        torch.jit.save(traced, buf, _extra_files={EXTRA_FILE: info.to_json()})
    return buf.getvalue()


def _jit_load(data: bytes, extra_files: dict[str, str] | None = None):
    """``torch.jit.load`` without its deprecation warning (TorchScript is deprecated in torch 2.14, and still works)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load. is deprecated", category=FutureWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra_files or {})


_REGISTERED: set[int] = set()


def _register_symbolics() -> None:
    """Two corrections to the TorchScript-based exporter (registered once per process):

    - ``aten::unfold`` (the local attention's key blocks, the Trident head's neighbours): the
      built-in needs the input's length at export time; here it is a ``Gather`` of
      ``Range`` indices, so the length stays dynamic;
    - ``aten::floor_divide`` on integers (the attention's ceil division ``-(-T // c)``): the
      built-in truncates towards zero; here it floors, as Python does.
    """
    if MIN_OPSET in _REGISTERED:
        return
    from torch.onnx import symbolic_helper as sh
    from torch.onnx._internal.torchscript_exporter import symbolic_opset9

    def const(g, value):
        return g.op("Constant", value_t=torch.tensor(value, dtype=torch.int64))

    def scalar(g, value):
        known = sh._maybe_get_const(value, "i")
        return const(g, int(known)) if not sh._is_value(known) else g.op("Cast", value, to_i=7)  # 7: int64

    def unfold(g, x, dimension, size, step):
        rank = sh._get_tensor_rank(x)
        dim = sh._get_const(dimension, "i", "dimension") % rank
        size, step = scalar(g, size), scalar(g, step)
        length = g.op("Gather", g.op("Shape", x), const(g, dim), axis_i=0)
        starts = g.op("Range", const(g, 0), g.op("Add", g.op("Sub", length, size), const(g, 1)), step)  # [n]
        index = g.op(
            "Add", g.op("Unsqueeze", starts, const(g, [1])), g.op("Unsqueeze", g.op("Range", const(g, 0), size, const(g, 1)), const(g, [0]))
        )
        windows = g.op("Gather", x, index, axis_i=dim)  # [..., n, size, ...]: the window axis goes last, as unfold puts it
        return g.op("Transpose", windows, perm_i=list(range(dim + 1)) + list(range(dim + 2, rank + 1)) + [dim + 1])

    def floor_divide(g, a, b):
        return symbolic_opset9._floor_divide(g, a, b)

    torch.onnx.register_custom_op_symbolic("aten::unfold", unfold, MIN_OPSET)
    torch.onnx.register_custom_op_symbolic("aten::floor_divide", floor_divide, MIN_OPSET)
    _REGISTERED.add(MIN_OPSET)


# --- the job --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportRequest:
    model: str  # models:/name@alias, models:/name/version, runs:/<id>/path, a path or an s3:// URI
    format: str  # onnx or torchscript
    out: Path | None = None  # None: out/export/model.onnx or model.ts
    opset: int = DEFAULT_OPSET
    verify: bool = True
    storage_options: dict[str, Any] | None = None


@dataclass(frozen=True)
class ExportReport:
    request: ExportRequest
    out: Path
    checkpoint: str  # where the checkpoint was read from
    info: ExportInfo
    bytes: int
    max_diff: float | None  # against PyTorch at another length; None: not checked
    seconds: float


def run_export(request: ExportRequest) -> ExportReport:
    """Export ``request.model`` (module docstring); ``UsageError`` for a bad format, opset, model or a missing package."""
    # Here, not at the top: jobs.inference imports Ray, which an exported model's users (ORT in a notebook) need not load.
    from jobs.evaluate import open_model

    if request.format not in EXPORT_FORMATS:
        raise UsageError(f"--format {request.format!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    out = request.out if request.out is not None else Path("out/export") / f"model{SUFFIXES[request.format]}"
    if out.suffix != SUFFIXES[request.format]:
        raise UsageError(
            f"--out {out}: a {request.format} export must end in {SUFFIXES[request.format]} (that is how --model tells it apart)"
        )
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give the file to write")
    started = time.perf_counter()
    checkpoint, where = open_model(request.model, request.storage_options)
    try:
        diff = export_checkpoint(checkpoint, request.format, out, opset=request.opset, source=request.model, verify=request.verify)
    except ExportError as e:
        raise UsageError(f"--model {request.model}: {e}") from None
    info = open_exported(out.read_bytes(), str(out))  # what a user of the file will read
    return ExportReport(request, out, where, info, out.stat().st_size, diff, time.perf_counter() - started)


def format_report(report: ExportReport) -> str:
    info = report.info
    checked = (
        "not checked" if report.max_diff is None else f"max |diff| vs PyTorch {report.max_diff:.2g} on a padded batch at another length"
    )
    lines = [
        f"model     {report.request.model}" + (f" ({report.checkpoint})" if report.checkpoint != report.request.model else ""),
        f"graph     {info.format}" + (f" (opset {info.opset})" if info.opset else "") + f", {info.config.arch}, "
        f"{len(info.labels)} classes, input [B, {info.config.input_dim}, T] with T a multiple of {info.config.encoder.total_stride}",
        f"checked   {checked}",
        f"wrote     {report.out} ({report.bytes / 2**20:.1f} MiB) in {report.seconds:.1f} s",
        f"run it    tal detect VIDEOS --runtime onnx --model {report.out}" if info.format == "onnx" else "",
    ]
    return "\n".join(line for line in lines if line)


# --- reading and running -----------------------------------------------------------------------


def require_onnx():
    """``onnx``, or an ``ExportError`` saying how to install it (and ONNX Runtime)."""
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ExportError(
            f"ONNX export and --runtime onnx need the onnx and onnxruntime packages ({e}); pip install onnx onnxruntime"
        ) from None
    return onnx


def is_exported(reference: str) -> bool:
    """Whether a model reference names an exported file (by its suffix) rather than a checkpoint."""
    return reference.endswith(tuple(SUFFIXES.values()))


def open_exported(data: bytes, where: str) -> ExportInfo:
    """The ``ExportInfo`` inside an exported file's bytes (ONNX or TorchScript, told apart by content)."""
    if data[:2] == b"PK":  # a TorchScript archive is a zip
        extra = {EXTRA_FILE: ""}
        try:
            _jit_load(data, extra)
        except Exception as e:  # noqa: BLE001 - torch raises several types for a bad archive
            raise ExportError(f"{where}: cannot read as TorchScript ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if not extra[EXTRA_FILE]:
            raise ExportError(f"{where}: a TorchScript file without {EXTRA_FILE}: not written by tal export")
        return ExportInfo.from_json(extra[EXTRA_FILE], where)
    onnx = require_onnx()
    try:
        model = onnx.load_from_string(data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ExportError(f"{where}: cannot read as ONNX or TorchScript ({type(e).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ExportError(f"{where}: an ONNX model without {METADATA_KEY!r} metadata: not written by tal export")
    return ExportInfo.from_json(props[METADATA_KEY], where)


def _onnx_runtime(data: bytes, num_threads: int):
    """An ONNX Runtime session over ``data`` as a ``DenseRuntime`` callable (``num_threads`` intra-op threads)."""
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(num_threads))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT warns about buffer reuse on dynamic shapes
    # No spin-waiting between runs: a replica shares its CPUs (decoding and NMS run in torch right after the graph,
    # Ray's own threads), and idle ORT threads spinning on them slow everything else down.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    def run(features: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        return session.run(list(OUTPUT_NAMES), {"features": features, "mask": mask})

    return run


def _torchscript_runtime(data: bytes):
    module = _jit_load(data).eval()

    def run(features: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            return [t.numpy() for t in module(torch.from_numpy(features), torch.from_numpy(mask))]

    return run


def runtime_detector(data: bytes, where: str, num_threads: int = 1) -> tuple[RuntimeDetector, ExportInfo]:
    """A ``RuntimeDetector`` over an exported file's bytes: ONNX through ONNX Runtime, TorchScript through torch."""
    info = open_exported(data, where)
    run = _onnx_runtime(data, num_threads) if info.format == "onnx" else _torchscript_runtime(data)
    return RuntimeDetector(info.config, run, name=f"{info.format}: {where}"), info


def onnx_detector(checkpoint: Checkpoint, where: str = "checkpoint", num_threads: int = 1) -> RuntimeDetector:
    """An ONNX Runtime detector from a checkpoint, exported in memory now (and verified)."""
    buf = io.BytesIO()
    export_checkpoint(checkpoint, "onnx", buf, source=where)
    return runtime_detector(buf.getvalue(), where, num_threads)[0]


@dataclass(frozen=True)
class ExportedModel:
    """An exported file, read: what it says about the model (as a ``Checkpoint`` does) and its bytes."""

    info: ExportInfo
    data: bytes
    where: str

    @property
    def config(self) -> OneStageConfig:
        return self.info.config

    @property
    def labels(self) -> list[str]:
        return self.info.labels

    @property
    def provenance(self) -> dict[str, Any]:
        return self.info.provenance

    @property
    def metadata(self) -> dict[str, Any]:
        return self.info.metadata

    @property
    def label_map(self) -> LabelMap:
        return self.info.label_map

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> ExportedModel:
        return cls(open_exported(data, where), data, where)


RUNTIMES: tuple[str, ...] = ("torch", "onnx")


def build_for_runtime(model: Checkpoint | ExportedModel, runtime: str, device: str = "cpu", num_threads: int = 1):
    """The detector that runs ``model`` with ``runtime``: ``torch`` (a checkpoint's ``build``) or ``onnx``
    (ONNX Runtime with ``num_threads`` intra-op threads, over an exported file or the checkpoint exported now)."""
    if runtime not in RUNTIMES:
        raise ExportError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        if isinstance(model, ExportedModel):
            raise ExportError(f"{model.where} is an exported {model.info.format} file: run it with --runtime onnx, or give the checkpoint")
        return model.build(device)
    if isinstance(model, ExportedModel):
        if model.info.format != "onnx":
            raise ExportError(f"{model.where} is a {model.info.format} export; --runtime onnx needs a .onnx file or a checkpoint")
        return runtime_detector(model.data, model.where, num_threads)[0]
    return onnx_detector(model, "checkpoint", num_threads)
