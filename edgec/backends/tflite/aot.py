"""Ahead-of-time compilation of a .tflite for a Qualcomm NPU, through LiteRT's Qualcomm compiler plugin.

ai-edge-litert ships the plugin (vendors/qualcomm/compiler) and the tool that applies it, but the plugin
loads Qualcomm's QNN libraries (libQnnHtp.so and friends, from the Qualcomm AI Engine Direct SDK), which
no package registry has. Where they are on the library path the plugin compiles the HTP's subgraphs into
the .tflite for the target's SoC; elsewhere the compile says so and keeps the portable .tflite.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

from edgec.errors import UserError

QNN_LIBRARY = "libQnnHtp.so"
SDK_HINT = ("install the Qualcomm AI Engine Direct (QAIRT) SDK and put its lib/x86_64-linux-clang folder on "
            "LD_LIBRARY_PATH")


def unavailable_reason(target) -> str | None:
    """None when the .tflite can be AOT-compiled for `target`'s NPU here; else why not, with the fix."""
    if not target.soc.startswith("SM") and not target.soc.startswith("SA"):
        return f"target {target.name} names no Qualcomm SoC (the profile's soc key)"
    try:
        from ai_edge_litert.aot.vendors.qualcomm import target as qualcomm
    except ImportError:
        return "this ai-edge-litert has no AOT compiler (ai_edge_litert.aot): pip install 'ai-edge-litert>=2.3'"
    if target.soc not in {m.value for m in qualcomm.SocModel}:
        return f"LiteRT's Qualcomm plugin does not know the SoC {target.soc}"
    try:
        ctypes.CDLL(QNN_LIBRARY)
    except OSError:
        return f"Qualcomm's QNN runtime ({QNN_LIBRARY}) is not installed: {SDK_HINT}"
    return None


def compile_for_npu(tflite: Path, target, outdir: Path, stem: str = "model") -> Path:
    """Writes `<stem>.<soc>.tflite` beside the portable one, with the NPU's subgraphs compiled in."""
    from ai_edge_litert.aot import aot_compile
    from ai_edge_litert.aot.vendors.qualcomm import target as qualcomm

    soc = qualcomm.Target(qualcomm.SocModel(target.soc))
    with tempfile.TemporaryDirectory(prefix=".edgec-aot-", dir=outdir) as scratch:
        result = aot_compile.aot_compile(str(tflite), output_dir=scratch, target=soc, keep_going=True)
        if result.failed_backends or not result.models_with_backend:
            why = "; ".join(str(reason) for _, reason in result.failed_backends) or "no model came back"
            raise UserError(f"LiteRT's Qualcomm AOT compile for {target.soc} failed: {why}",
                            "compile with --npu-aot off to keep the portable .tflite")
        _, model = result.models_with_backend[0]
        path = Path(outdir) / f"{stem}.{target.soc}.tflite"
        staged = Path(scratch) / path.name
        model.save(staged)
        os.replace(staged, path)
    return path
