"""Shape and type inference as an analysis: passes that change shapes invalidate it."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from edgec.analysis import analysis


def infer_shapes(model: ir.Model) -> ir.Model:
    """Annotates every value with its inferred type and shape, in place. Dynamic dims stay symbolic."""
    # strict_mode=False: a custom op or an exporter quirk must not stop inference of everything else.
    result = ShapeInferencePass(strict_mode=False, data_prop=True)(model)
    if result.model is not model:
        # The pass returns a new model; copy its annotations onto ours so references stay valid.
        inferred = {v.name: v for v in _values(result.model)}
        for value in _values(model):
            other = inferred.get(value.name)
            if other is not None:
                if other.type is not None:
                    value.type = other.type
                if other.shape is not None:
                    value.shape = other.shape
    _infer_symbolic(model)
    return model


def _infer_symbolic(model: ir.Model) -> None:
    """Refines dynamic dims with onnxruntime's symbolic shape inference.

    onnx's inference gives every broadcast or reshaped dynamic dim a fresh `unk__N` name, so
    `[batch, sequence, 384]` and `[batch, unk__3, 384]` cannot be proven equal and the shape
    arithmetic of TorchScript exports stays. The symbolic pass carries names through and merges dims
    that broadcasting forces to agree (auto_merge assumes a dynamic dim meeting another is not 1 —
    true of sequence/batch dims; compile verification checks a second shape to back this up).
    Where it fails (custom ops, exotic exports) onnx's result stands.
    """
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return
    logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        # onnx-ir's helper hands the proto over with big weights turned into typed inputs (not copied)
        # and restores the model afterwards, as onnx-ir's own shape inference does.
        from onnx_ir.passes.common._c_api_utils import call_onnx_api

        inferred = call_onnx_api(
            lambda proto: SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=False), model
        )
    except Exception:  # its failures are many and varied; losing the refinement is harmless
        return
    finally:
        logger.setLevel(level)
    if inferred is None:
        return
    dims_by_name = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = info.type.tensor_type
        if t.HasField("shape"):
            dims_by_name[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    for node in model.graph:
        for value in node.outputs:
            dims = dims_by_name.get(value.name)
            # Only dims onnx left anonymous are refined: the symbolic pass also assumes a dynamic dim
            # is never 1 where onnx stays honest (Squeeze without axes), and those answers are not taken.
            if dims is None or value.shape is None or len(value.shape) != len(dims):
                continue
            refined = [
                _as_dim(new) if _anonymous(old) and new is not None else old for old, new in zip(value.shape, dims)
            ]
            if refined != list(value.shape):
                value.shape = ir.Shape(refined)


def _anonymous(dim) -> bool:
    if isinstance(dim, int):
        return False
    name = getattr(dim, "value", None)
    return name is None or name.startswith("unk__")


def _as_dim(d):
    return d if isinstance(d, int) else ir.SymbolicDim(d)


def ensure_shapes(model: ir.Model) -> ir.Model:
    """Infers shapes unless every node output already has one (analyses call this before reading shapes).
    An optional output left out (named "") has no shape to infer."""
    if any(v.shape is None and v.name for n in model.graph for v in n.outputs):
        infer_shapes(model)
    return model


def _values(model: ir.Model):
    graph = model.graph
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


@analysis("shapes")
def shapes(model: ir.Model) -> dict[str, ir.Shape | None]:
    infer_shapes(model)
    return {v.name: v.shape for v in _values(model) if v.name}


def specialize_inputs(model: ir.Model, shapes: dict[str, tuple[int, ...]]) -> ir.Model:
    """Fixes the dynamic dims of graph inputs (in place) and re-infers every shape from them.

    For runtimes that need static shapes (TFLite, NPUs): with the inputs static, cleanup's constant
    folding removes the export's shape arithmetic. Raises ValueError when a shape does not fit its
    input (unknown name, another rank, or a fixed dim it contradicts)."""
    inputs = {v.name: v for v in model.graph.inputs if v.name not in model.graph.initializers}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise ValueError(f"no input named {', '.join(map(repr, unknown))} (inputs: {', '.join(inputs)})")
    for name, dims in shapes.items():
        value, dims = inputs[name], tuple(int(d) for d in dims)
        old = value.shape
        if old is not None and len(old) != len(dims):
            raise ValueError(f"input {name!r} has rank {len(old)}, the shape {'x'.join(map(str, dims))} has rank {len(dims)}")
        if any(d < 1 for d in dims):
            raise ValueError(f"input {name!r}: every dim must be at least 1, not {'x'.join(map(str, dims))}")
        for axis, (was, new) in enumerate(zip(old or (), dims)):
            if isinstance(was, int) and was != new:
                raise ValueError(f"input {name!r} has {was} at axis {axis}, not {new}")
        value.shape = ir.Shape(dims)
    for node in model.graph:
        for value in node.outputs:
            value.shape = None
    for value in model.graph.outputs:
        value.shape = None
    return infer_shapes(model)
