"""The ``--device``, ``--dtype`` and ``--device-map`` options every model-loading command takes.

Contents:
    device_option()      ``--device``: cpu [default], cuda, cuda:N, mps or auto
    dtype_option()       ``--dtype``: float32 [default], bfloat16, float16
    device_map_option()  ``--device-map``: auto, a JSON object or a .json file (accelerate)

The values are checked where the model loads (:func:`kmec.models.load.load_model`): an
unknown device or dtype, or a GPU this machine lacks, is one clear error (exit 2).
"""

from __future__ import annotations

from typing import Any

import typer


def device_option() -> Any:
    return typer.Option(None, "--device", help="Where the model runs: cpu [default], cuda, "
                        "cuda:N, or auto (a GPU when there is one).")


def dtype_option() -> Any:
    return typer.Option("float32", "--dtype", help="Precision the model's weights are loaded "
                        "in: float32, bfloat16 (bf16) or float16 (fp16).")


def device_map_option() -> Any:
    return typer.Option(None, "--device-map", help="Spread the model's modules over devices "
                        "with accelerate instead of --device: auto, or a JSON object "
                        "(or .json file) mapping module names to devices.")
