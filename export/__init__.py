"""export: write a trained run as a validated ONNX router bundle (the torch side).

- :func:`export_run` / :func:`export_bundle` (``export/exporter.py``): trace the policy
  with its observation, check the graphs with ``onnx.checker``, validate onnxruntime
  against torch, write the bundle atomically.

The bundle is read by the torch-free runtime in :mod:`deepinsert.router`.
"""

from __future__ import annotations

from deepinsert.export.exporter import ExportResult, export_bundle, export_run

__all__ = ["ExportResult", "export_bundle", "export_run"]
