"""``tal export``: a checkpoint's dense part as an ONNX or TorchScript file (``jobs.export``)."""

from __future__ import annotations

import argparse
from pathlib import Path

# jobs.export's, for the choices and the help (not imported: the parser stays light; a test keeps them equal)
EXPORT_FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a one-stage checkpoint's dense part to ONNX or TorchScript (decoding and NMS stay in tal)",
        description=(
            "Trace the detector's dense part (features [B, C, T] and mask [B, T] in; class logits, offsets and valid "
            "points of every pyramid level out; B and T dynamic) and write it as one file that carries the config, "
            "the labels and the provenance of the checkpoint. The file is then checked against PyTorch at another "
            "length on a padded batch. Run it with `tal detect --runtime onnx --model FILE.onnx` or `tal serve "
            "--runtime onnx --model FILE.onnx`; decoding and NMS are tal's own either way."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="the checkpoint: models:/tal-detector@champion, models:/tal-detector/3, runs:/<id>/path (MLflow at "
        "$MLFLOW_TRACKING_URI), a path or an s3:// URI",
    )
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="onnx (for ONNX Runtime) or torchscript (torch.jit)")
    p.add_argument("--out", type=Path, metavar="PATH", help="the file to write (default out/export/model.onnx or model.ts)")
    p.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, metavar="N", help=f"ONNX opset (default {DEFAULT_OPSET}, at least 13; onnx only)"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the check against PyTorch at another length")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL for an s3:// checkpoint (default: $AWS_ENDPOINT_URL)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from jobs.export import ExportRequest, format_report, run_export
    from pipelines.store import storage_options

    request = ExportRequest(
        model=args.model,
        format=args.format,
        out=args.out,
        opset=args.opset,
        verify=not args.no_verify,
        storage_options=storage_options(args.s3_endpoint),
    )
    print(format_report(run_export(request)))
    return 0
