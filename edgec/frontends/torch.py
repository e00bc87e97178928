"""PyTorch frontend: export an nn.Module, a Hugging Face model folder or a transformers config to ONNX.

torch and transformers are optional (the `edgec[torch]` extra), so both are imported inside functions.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import pathlib
import shutil
import tempfile
import warnings
from typing import Any, Callable, Iterator

import numpy as np

from edgec.errors import UserError

EXPORTERS = ("dynamo", "torchscript")
TORCHSCRIPT_OPSET = 17
BATCH, SEQUENCE = "batch", "sequence"

_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
# Loggers that the exporters and transformers chat on (progress, "torchvision is not installed" ...).
_CHATTY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo",
                   "torch.utils._sympy", "onnxscript", "transformers")


def _torch():
    try:
        import torch
    except ImportError:
        raise UserError("PyTorch is not installed", "pip install 'edgec[torch]' (torch==2.13.0 is the CPU build)") from None
    return torch


def _transformers():
    _torch()
    try:
        import transformers
    except ImportError:
        raise UserError("transformers is not installed", "pip install 'edgec[torch]'") from None
    return transformers


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Swallow the exporters' progress prints, warnings and log lines; the caller gets them on failure."""
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    saved = []
    for name in _CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(logging.ERROR)
        logger.propagate = False
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")
            yield captured
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def _attach_log(error: BaseException, log: str, what: str) -> None:
    """Say what was being exported, and what the exporter said before failing (Python 3.11+ notes)."""
    tail = log.strip()[-4000:]
    if hasattr(error, "add_note"):
        error.add_note(f"{what}; exporter output (tail):\n{tail}" if tail else what)


def _tensors(initializers, nodes) -> Iterator[Any]:
    """Every TensorProto of a graph or function, subgraphs included."""
    yield from initializers
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub.initializer, sub.node)


def _external_locations(model_path: pathlib.Path) -> set[str]:
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    tensors = [_tensors(proto.graph.initializer, proto.graph.node)]
    tensors += [_tensors((), function.node) for function in proto.functions]
    return {entry.value for group in tensors for tensor in group
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


def _publish(written: pathlib.Path, dest: pathlib.Path) -> None:
    """Move an exported model (and its weights file, if external) from a scratch folder to `dest`.

    The weights go first and the graph last, so `dest` never names a model whose data is missing.
    """
    import onnx

    data_name = dest.name + ".data"
    locations = _external_locations(written)
    if locations and locations != {data_name}:
        # torchscript writes one file per tensor for >2 GB models: gather them into one file.
        proto = onnx.load(str(written), load_external_data=True)
        written = written.with_name("consolidated-" + dest.name)
        onnx.save(proto, str(written), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data_name, size_threshold=1024)
        locations = {data_name}
    if locations:
        os.replace(written.parent / data_name, dest.parent / data_name)
    os.replace(written, dest)
    if not locations:
        stale = dest.parent / data_name
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def _pin_static_output_dims(model_path: pathlib.Path, outputs, dynamic_axes: dict) -> None:
    """Give outputs their static dims back: the tracer names some of them (`Reshapeoutput_dim_2`)."""
    import onnx

    if not isinstance(outputs, (list, tuple)):
        outputs = (outputs,)
    proto = onnx.load(str(model_path), load_external_data=False)
    if len(outputs) != len(proto.graph.output) or not all(hasattr(o, "shape") for o in outputs):
        return
    changed = False
    for value, tensor in zip(proto.graph.output, outputs):
        dynamic = dynamic_axes.get(value.name) or {}
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(tensor.shape):
            continue
        for axis, (dim, size) in enumerate(zip(dims, tensor.shape)):
            if dim.HasField("dim_param") and axis not in dynamic:
                dim.dim_value = int(size)  # clears dim_param (a oneof)
                changed = True
    if changed:
        onnx.save(proto, str(model_path))


def _forward_params(module) -> list[str]:
    params = inspect.signature(module.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def export_module(module, example_inputs: tuple | dict, path, *, exporter: str = "dynamo",
                  input_names: list[str] | None = None, output_names: list[str] | None = None,
                  dynamic_axes: dict[str, dict[int, str]] | None = None, opset: int | None = None) -> pathlib.Path:
    """Export `module` to the ONNX file `path` (written atomically) and return the path.

    `example_inputs` is a tuple of positional tensors or a dict of keyword tensors (the dict's keys are
    then the graph's input names). `dynamic_axes` maps an input or output name to {axis: dim name};
    without it, axis 0 of every input is the dynamic dim "batch". The module is put in eval mode.
    Exporter errors propagate with a note naming the module, the exporter and its last output.
    """
    torch = _torch()
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {exporter!r}", f"use one of {', '.join(EXPORTERS)}")
    path = pathlib.Path(path)
    if isinstance(example_inputs, dict):
        names = list(example_inputs)
        tensors = list(example_inputs.values())
    else:
        tensors = list(example_inputs)
        names = _forward_params(module)[: len(tensors)]
        names += [f"input_{i}" for i in range(len(names), len(tensors))]
    if input_names is not None:
        if len(input_names) != len(tensors):
            raise ValueError(f"{len(input_names)} input names for {len(tensors)} example inputs")
        graph_names = list(input_names)
    else:
        graph_names = names
    if dynamic_axes is None:
        dynamic_axes = {n: {0: BATCH} for n, t in zip(graph_names, tensors) if getattr(t, "ndim", 0) > 0}
    unknown = set(dynamic_axes) - set(graph_names) - set(output_names or ())
    if unknown:
        raise ValueError(f"dynamic_axes names {sorted(unknown)} are neither inputs {graph_names} nor outputs")

    module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    written = scratch / path.name
    try:
        with _quiet() as log:
            try:
                args, kwargs = tuple(tensors), None
                if isinstance(example_inputs, dict):
                    # Both exporters number keyword inputs in signature order, not in the dict's order.
                    params = _forward_params(module)
                    missing = [n for n in names if n not in params]
                    if missing:
                        raise ValueError(f"inputs {missing} are not parameters of {type(module).__name__}.forward")
                    order = sorted(range(len(names)), key=lambda i: params.index(names[i]))
                    names = [names[i] for i in order]
                    graph_names = [graph_names[i] for i in order]
                    args, kwargs = (), {n: example_inputs[n] for n in names}
                if exporter == "dynamo":
                    axes = [dynamic_axes.get(n) for n in graph_names]
                    shapes = dict(zip(names, axes)) if kwargs is not None else tuple(axes)
                    program = torch.onnx.export(
                        module, args, None, kwargs=kwargs, dynamo=True, dynamic_shapes=shapes,
                        input_names=graph_names, output_names=output_names, opset_version=opset,
                        verbose=False)
                    program.save(written)
                else:
                    with torch.no_grad():
                        torch.onnx.export(
                            module, args, str(written), kwargs=kwargs, dynamo=False, input_names=graph_names,
                            output_names=output_names, dynamic_axes=dynamic_axes,
                            opset_version=opset or TORCHSCRIPT_OPSET, verbose=False)
                        _pin_static_output_dims(written, module(*args, **(kwargs or {})), dynamic_axes)
            except Exception as error:
                _attach_log(error, log.getvalue(), f"while exporting {type(module).__name__} with the {exporter} exporter")
                raise
        _publish(written, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


# --- transformers models -------------------------------------------------------------------------

def _is_vision(model) -> bool:
    params = inspect.signature(model.forward).parameters
    return "pixel_values" in params and "input_ids" not in params


def _text_input_names(model, config) -> list[str]:
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        raise UserError(f"cannot work out the inputs of {type(model).__name__}",
                        "export it with edgec.frontends.torch.export_module and explicit example inputs")
    names = ["input_ids"]
    if "attention_mask" in params:
        names.append("attention_mask")
    # A single token type is constant zeros: keep it out of the graph's inputs.
    if "token_type_ids" in params and (getattr(config, "type_vocab_size", 0) or 0) > 1:
        names.append("token_type_ids")
    return names


def _wrap(model, input_names: list[str], output: str):
    torch = _torch()
    extra = {"use_cache": False} if _takes(model, "use_cache") else {}  # no KV cache in the graph

    if input_names == ["pixel_values"]:
        class VisionOutput(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, pixel_values):
                return self.model(pixel_values=pixel_values, return_dict=True)[output]

        return VisionOutput().eval()

    class TextOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            return self.model(**kwargs, return_dict=True)[output]

    return TextOutput().eval()


def _image_size(config) -> tuple[int, int]:
    size = getattr(config, "image_size", 224)
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    return int(size), int(size)


def example_inputs_for(model, config, *, batch: int = 2, seq_len: int = 16, seed: int = 0) -> dict[str, Any]:
    """Example tensors for a transformers model: token ids (the second row padded) or images in [-1, 1]."""
    torch = _torch()
    if batch < 2 or seq_len < 2:
        raise ValueError("batch and seq_len must be at least 2, or the exporter fixes those dims")
    gen = torch.Generator().manual_seed(seed)
    if _is_vision(model):
        h, w = _image_size(config)
        channels = int(getattr(config, "num_channels", 3))
        return {"pixel_values": torch.rand(batch, channels, h, w, generator=gen) * 2 - 1}
    names = _text_input_names(model, config)
    vocab = int(getattr(config, "vocab_size", 1000))
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=gen)}
    if "attention_mask" in names:
        # Padding in the example keeps value-dependent "mask is all ones" shortcuts out of a traced graph.
        mask = torch.ones(batch, seq_len, dtype=torch.int64)
        mask[1, seq_len - max(1, seq_len // 4):] = 0
        inputs["attention_mask"] = mask
    if "token_type_ids" in names:
        inputs["token_type_ids"] = torch.randint(0, int(config.type_vocab_size), (batch, seq_len), generator=gen)
    return inputs


def _export_transformers(model, config, path, *, exporter: str, batch: int, seq_len: int, seed: int = 0) -> pathlib.Path:
    torch = _torch()
    model.eval()
    inputs = example_inputs_for(model, config, batch=batch, seq_len=seq_len, seed=seed)
    names = list(inputs)
    with torch.no_grad(), _quiet():
        sample = model(**inputs, **({"use_cache": False} if _takes(model, "use_cache") else {}), return_dict=True)
    output = "logits" if "logits" in sample else "last_hidden_state"
    if output not in sample:
        raise UserError(f"{type(model).__name__} returns neither last_hidden_state nor logits",
                        "export it with edgec.frontends.torch.export_module")
    out_rank = sample[output].ndim
    if names == ["pixel_values"]:
        axes = {"pixel_values": {0: BATCH}, output: {0: BATCH}}
    else:
        axes = {n: {0: BATCH, 1: SEQUENCE} for n in names}
        out_seq = out_rank >= 3 and sample[output].shape[1] == seq_len
        axes[output] = {0: BATCH, 1: SEQUENCE} if out_seq else {0: BATCH}
    return export_module(_wrap(model, names, output), inputs, path, exporter=exporter,
                         output_names=[output], dynamic_axes=axes)


def _takes(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _model_class(transformers, config):
    """The class named in config.architectures when transformers has it (a head model), else AutoModel."""
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None and hasattr(cls, "from_pretrained"):
            return cls
    return transformers.AutoModel


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a broken or foreign model folder raises while loading (not bugs of ours)."""
    import pickle

    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError]
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    return tuple(errors)


def _load_hf_folder(folder):
    """(model, config) from a local Hugging Face folder, in eval mode, never downloading."""
    transformers = _transformers()
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder", "pass the folder that holds the model's config.json and weights")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json", "pass a Hugging Face model folder (config.json + weights)")
    if not any(any(folder.glob(p)) for p in _WEIGHT_PATTERNS):
        raise UserError(f"{folder} has no model weights (model.safetensors or pytorch_model.bin)",
                        "download the complete model folder")
    try:
        with _quiet():
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            model, info = _model_class(transformers, config).from_pretrained(
                folder, config=config, local_files_only=True, output_loading_info=True)
    except _load_errors() as error:
        problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load the model in {folder} ({problem})",
                        "check that the folder is a complete Hugging Face model folder") from error
    # Weights the checkpoint lacks would be exported as random numbers. A missing pooler is common
    # and harmless for a base model, whose output is last_hidden_state.
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.split(".")[0] == "pooler")
    if missing or info.get("mismatched_keys"):
        shown = ", ".join((missing or sorted(map(str, info["mismatched_keys"])))[:4])
        raise UserError(f"the weights in {folder} do not fit {type(model).__name__} (missing or mismatched: {shown})",
                        "use a folder whose checkpoint matches config.json's architectures")
    return model.eval(), config


def export_hf_folder(folder, path, *, exporter: str = "dynamo", batch: int = 2, seq_len: int = 16) -> pathlib.Path:
    """Export the model in a local Hugging Face folder (config.json + weights), never downloading.

    The graph's one output is `logits` for a model with a head (per config.architectures), else
    `last_hidden_state`.
    """
    model, config = _load_hf_folder(folder)
    return _export_transformers(model, config, path, exporter=exporter, batch=batch, seq_len=seq_len)


def run_hf_folder(folder, feeds: dict[str, np.ndarray], output: str) -> dict[str, np.ndarray]:
    """The PyTorch model in `folder` run on the arrays an export of it takes: the export's reference."""
    torch = _torch()
    model, _ = _load_hf_folder(folder)
    names = [n for n in ("pixel_values", "input_ids", "attention_mask", "token_type_ids") if n in feeds]
    with torch.no_grad(), _quiet():
        result = _wrap(model, names, output)(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names))
    return {output: result.numpy()}


def export_model_by_config(config, path, *, exporter: str, seed: int = 0, batch: int = 2, seq_len: int = 16,
                           init: Callable[[Any], None] | None = None) -> pathlib.Path:
    """Export a base model with random weights (seeded) built from a transformers config.

    `init(model)`, when given, runs right after the model is built (still under the seed), for
    weights that the default initialisation leaves degenerate.
    """
    torch = _torch()
    transformers = _transformers()
    torch.manual_seed(seed)
    with _quiet():
        model = transformers.AutoModel.from_config(config)
    if init is not None:
        init(model)
    return _export_transformers(model, config, path, exporter=exporter, batch=batch, seq_len=seq_len, seed=seed)
