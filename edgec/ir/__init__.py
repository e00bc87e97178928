"""The in-memory model: onnx-ir's Model, with loading, atomic saving, verification and cloning.

edgec passes work on `onnx_ir.Model` directly, so onnx-ir's own passes and onnxscript's rewriter
apply to it unchanged.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import CheckerPass

from edgec.errors import UserError

Model = ir.Model

# Protobuf cannot serialise a message over 2 GB; above this many bytes of initializers the model is
# written with its weights in a side file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load(path: str | os.PathLike) -> ir.Model:
    """Reads an ONNX file (and its external data) into the IR; bad files become UserErrors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file {path} does not exist", "check the path")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not an ONNX file", "pass the .onnx file inside it")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty", "re-export the model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf reports a truncated or foreign file in many ways
        raise UserError(
            f"{path} is not a readable ONNX model: truncated or not ONNX ({type(exc).__name__}: {_first_line(exc)})",
            "pass an .onnx file exported with torch.onnx.export or a converter",
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise UserError(f"{path} holds no ONNX graph: truncated or not an ONNX model", "re-export the model")
    _check_external_data_present(proto, path)
    try:
        model = ir.from_proto(proto)
    except Exception as exc:
        raise UserError(f"{path} is not a valid ONNX model ({_first_line(exc)})", "re-export the model") from None
    # External tensors are read lazily from here.
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model


def _check_external_data_present(proto: onnx.ModelProto, path: Path) -> None:
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in init.external_data if e.key == "location"), None)
            if location is None or not (path.parent / location).exists():
                raise UserError(
                    f"{path} keeps weights in {location!r}, which is missing",
                    "copy that file next to the model",
                )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def model_files(path: str | os.PathLike) -> list[Path]:
    """An ONNX file and the external weight files it references (those that exist)."""
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX at all: it is just the one file (load() reports the problem)
        return [path]
    locations = {
        e.value
        for init in proto.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for e in init.external_data
        if e.key == "location"
    }
    return [path] + [path.parent / loc for loc in sorted(locations) if (path.parent / loc).exists()]


def file_bytes(path: str | os.PathLike) -> int:
    """Size of an ONNX file together with its external weights."""
    return sum(f.stat().st_size for f in model_files(path))


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Writes the model atomically: readers see the old file or the whole new one, never half.

    `external_data=None` chooses a side file only when the weights would not fit in one protobuf.
    """
    path = Path(path)
    if external_data is None:
        external_data = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmpdir = tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent)
    except OSError as exc:
        raise UserError(f"cannot write to {parent} ({exc.strerror})", "choose a writable output folder") from None
    tmp = Path(tmpdir) / path.name
    data_name = path.name + ".data"
    try:
        if external_data:
            ir.save(model, tmp, external_data=data_name)
            # Move the weights first, so the final rename publishes a complete model.
            os.replace(Path(tmpdir) / data_name, parent / data_name)
        else:
            ir.save(model, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror})", "free disk space or choose another output folder") from None
    finally:
        for leftover in Path(tmpdir).iterdir() if Path(tmpdir).exists() else ():
            leftover.unlink()
        if Path(tmpdir).exists():
            os.rmdir(tmpdir)
    return path


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as one self-contained proto: weights that live in external files are read in."""
    proto = ir.to_proto(model)
    by_name = model.graph.initializers
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            init.raw_data = by_name[init.name].const_value.tobytes()
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]
    return proto


def clone(model: ir.Model) -> ir.Model:
    """A deep copy that passes may mutate without touching the original (weights are shared, read-only)."""
    return model.clone()


def name_nodes(model: ir.Model) -> bool:
    """Gives every unnamed node (and value) a unique name; returns whether any was unnamed.

    Analyses record nodes by name (their records are data a user can read), so a model whose nodes
    have no names (hand-written ones often do not) gets them before anything is recorded."""
    if all(node.name for node in model.graph.all_nodes()):
        return False
    from onnx_ir.passes.common import NameFixPass

    NameFixPass()(model)
    return True


def node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def op_histogram(model: ir.Model) -> Counter:
    return Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type) for n in model.graph.all_nodes()
    )


class VerificationError(Exception):
    """The IR broke an invariant: a bug in a pass, never a user error."""


def verify(model: ir.Model, *, check_onnx: bool = True) -> None:
    """Checks edgec's invariants, then the onnx checker; raises VerificationError listing every problem."""
    problems = invariant_problems(model)
    if check_onnx and not problems:
        try:
            # onnx-ir's checker pass strips large weights first, so big models are never serialised whole.
            CheckerPass()(model)
        except Exception as exc:
            cause = exc.__cause__ or exc
            problems.append(f"onnx checker: {_first_line(cause)}")
    if problems:
        raise VerificationError("; ".join(problems))


def invariant_problems(model: ir.Model) -> list[str]:
    """Topological order, no dangling values, consistent opset imports, unique value names."""
    problems: list[str] = []
    graph = model.graph
    defined: set[int] = {id(v) for v in graph.inputs}
    defined.update(id(v) for v in graph.initializers.values())
    names: Counter = Counter()
    for node in graph:
        for value in node.inputs:
            if value is None:
                continue
            producer = value.producer()
            orphan = (producer is None or producer.graph is not graph) and not value.is_graph_input()
            if id(value) not in defined and orphan:
                problems.append(f"node {node.name!r} ({node.op_type}) reads {value.name!r}, which nothing defines")
            elif id(value) not in defined:
                problems.append(f"node {node.name!r} ({node.op_type}) reads {value.name!r} before it is produced")
        for value in node.outputs:
            defined.add(id(value))
            if value.name:
                names[value.name] += 1
        if node.domain not in model.opset_imports and not (node.domain == "ai.onnx" and "" in model.opset_imports):
            problems.append(f"node {node.name!r} uses domain {node.domain!r}, which the model does not import")
    for value in graph.outputs:
        if id(value) not in defined:
            problems.append(f"graph output {value.name!r} is not produced")
    for name, n in names.items():
        if n > 1:
            problems.append(f"value name {name!r} is defined {n} times")
    default = model.opset_imports.get("")
    if default is not None and graph.opset_imports.get("", default) != default:
        problems.append("graph and model disagree on the default opset")
    return problems


def structure_key(model: ir.Model) -> list[tuple]:
    """The graph as comparable data: per node its op, attributes and where each input comes from.

    Names are ignored; a value is identified by its producer's position and output index, a graph
    input by its position, a constant by its dtype, shape and content. Two models with equal keys
    compute the same thing the same way.
    """
    graph = model.graph
    position = {id(node): i for i, node in enumerate(graph)}
    inputs = {id(v): i for i, v in enumerate(graph.inputs)}

    def ref(value: ir.Value | None):
        if value is None:
            return None
        if id(value) in inputs:
            return ("input", inputs[id(value)])
        producer = value.producer()
        if producer is not None and id(producer) in position:
            return ("node", position[id(producer)], value.index())
        if value.const_value is not None:
            arr = value.const_value.numpy()
            return ("const", str(arr.dtype), arr.shape, hashlib.sha256(arr.tobytes()).hexdigest())
        return ("unknown", value.name)

    def attr(a):
        v = a.value
        if hasattr(v, "numpy"):
            arr = v.numpy()
            return (str(arr.dtype), arr.shape, arr.tobytes())
        if isinstance(v, ir.Graph):
            return ("graph", id(v))
        if isinstance(v, (list, tuple)):
            return tuple(v)
        return v

    key = []
    for node in graph:
        attrs = tuple(sorted((k, attr(a)) for k, a in node.attributes.items()))
        key.append((node.domain, node.op_type, attrs, tuple(ref(v) for v in node.inputs), len(node.outputs)))
    key.append(("outputs", tuple(ref(v) for v in graph.outputs)))
    return key
