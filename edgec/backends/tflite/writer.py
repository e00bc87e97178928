"""The .tflite flatbuffer: tensors, constant buffers, operators and the serving signature, packed with
the schema's object API (no TensorFlow)."""

from __future__ import annotations

from collections import Counter

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

Op = schema.BuiltinOperator
TensorType = schema.TensorType

FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
SIGNATURE_KEY = "serving_default"
# Constant data starts on this boundary: kernels read weights in place from the mapped file, and
# vectorised loads (XNNPACK's included) want them at least 16-byte aligned.
BUFFER_ALIGNMENT = 16
# Flatbuffers address with 32-bit offsets; TFLite's larger-than-2GB format is not written here.
MAX_FLATBUFFER_BYTES = 2**31 - 1
# Builtin codes above this live only in OperatorCode.builtin_code (schema v3a).
_PLACEHOLDER_FOR_GREATER_OP_CODES = 127

_NUMPY_TYPES = {
    np.dtype(np.float32): TensorType.FLOAT32,
    np.dtype(np.float16): TensorType.FLOAT16,
    np.dtype(np.float64): TensorType.FLOAT64,
    np.dtype(np.int64): TensorType.INT64,
    np.dtype(np.int32): TensorType.INT32,
    np.dtype(np.int16): TensorType.INT16,
    np.dtype(np.int8): TensorType.INT8,
    np.dtype(np.uint8): TensorType.UINT8,
    np.dtype(np.bool_): TensorType.BOOL,
}
_OP_NAMES = {code: name for name, code in vars(Op).items() if not name.startswith("_")}


def tensor_type(dtype: np.dtype) -> int:
    return _NUMPY_TYPES[np.dtype(dtype)]


def op_name(code: int) -> str:
    return _OP_NAMES.get(code, str(code))


class _AlignedBuffer(schema.BufferT):
    """A constant buffer whose bytes start on BUFFER_ALIGNMENT in the finished file."""

    def __init__(self, raw: bytes | None = None):
        super().__init__()
        self.raw = raw

    def Pack(self, builder):  # noqa: N802 (the schema's naming)
        data = None
        if self.raw:
            size = len(self.raw)
            builder.StartVector(1, size, BUFFER_ALIGNMENT)
            builder.head -= size
            builder.Bytes[builder.head:builder.head + size] = self.raw
            data = builder.EndVector()
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        return schema.BufferEnd(builder)


class FlatModel:
    """One subgraph under construction. Tensors are indices; `finish` packs the file."""

    def __init__(self, description: str = "edgec"):
        self.description = description
        self.tensors: list[schema.TensorT] = []
        self.buffers: list[_AlignedBuffer] = [_AlignedBuffer()]  # buffer 0: the empty sentinel
        self.operators: list[schema.OperatorT] = []
        self._versions: dict[int, int] = {}   # builtin code -> highest version an operator needs
        self._codes: dict[int, int] = {}      # builtin code -> opcode index
        self._data_bytes = 0

    def tensor(self, name: str, shape, ttype: int) -> int:
        t = schema.TensorT()
        t.name, t.shape, t.type = name, [int(d) for d in shape], ttype
        self.tensors.append(t)
        return len(self.tensors) - 1

    def constant(self, name: str, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        index = self.tensor(name, array.shape, tensor_type(array.dtype))
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        self.buffers.append(_AlignedBuffer(raw))
        self.tensors[index].buffer = len(self.buffers) - 1
        self._data_bytes += len(raw)
        return index

    def quantize(self, index: int, scale, zero_point, axis: int = 0) -> None:
        """Marks tensor `index` as quantized: real = scale * (q - zero_point), per channel along `axis`
        when there are several scales."""
        q = schema.QuantizationParametersT()
        q.scale = [float(v) for v in np.ravel(scale)]
        q.zeroPoint = [int(v) for v in np.broadcast_to(np.ravel(zero_point), (len(q.scale),))]
        q.quantizedDimension = int(axis) if len(q.scale) > 1 else 0
        self.tensors[index].quantization = q

    def shape(self, index: int) -> tuple[int, ...]:
        return tuple(self.tensors[index].shape)

    def type(self, index: int) -> int:
        return self.tensors[index].type

    def op(self, code: int, inputs, outputs, options=None, *, version: int = 1) -> None:
        """Appends an operator; an input of -1 is an omitted optional input."""
        if code not in self._codes:
            self._codes[code] = len(self._codes)
        self._versions[code] = max(self._versions.get(code, 1), version)
        operator = schema.OperatorT()
        operator.opcodeIndex = self._codes[code]
        operator.inputs, operator.outputs = list(inputs), list(outputs)
        if options is not None:
            # Every builtin options class is its union member's name plus "T".
            operator.builtinOptionsType = getattr(schema.BuiltinOptions, type(options).__name__[:-1])
            operator.builtinOptions = options
        self.operators.append(operator)

    def op_counts(self) -> Counter:
        by_index = {index: code for code, index in self._codes.items()}
        return Counter(op_name(by_index[o.opcodeIndex]) for o in self.operators)

    def finish(self, inputs: dict[str, int], outputs: dict[str, int]) -> bytes:
        """The file's bytes; `inputs`/`outputs` map signature names to tensor indices, in order."""
        codes = []
        for code in sorted(self._codes, key=self._codes.get):
            oc = schema.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, _PLACEHOLDER_FOR_GREATER_OP_CODES)
            oc.version = self._versions[code]
            codes.append(oc)
        graph = schema.SubGraphT()
        graph.name = "main"
        graph.tensors, graph.operators = self.tensors, self.operators
        graph.inputs, graph.outputs = list(inputs.values()), list(outputs.values())
        signature = schema.SignatureDefT()
        signature.signatureKey, signature.subgraphIndex = SIGNATURE_KEY, 0
        signature.inputs = [_tensor_map(name, index) for name, index in inputs.items()]
        signature.outputs = [_tensor_map(name, index) for name, index in outputs.items()]
        model = schema.ModelT()
        model.version, model.description = SCHEMA_VERSION, self.description
        model.operatorCodes, model.subgraphs, model.buffers = codes, [graph], self.buffers
        model.signatureDefs = [signature]
        # Room for all constants up front: growing the builder copies everything written so far.
        builder = flatbuffers.Builder(self._data_bytes + len(self.buffers) * BUFFER_ALIGNMENT + (1 << 20))
        builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
        return bytes(builder.Output())


def _tensor_map(name: str, index: int) -> schema.TensorMapT:
    m = schema.TensorMapT()
    m.name, m.tensorIndex = name, index
    return m


def options(name: str, **fields):
    """A builtin options object by its schema name (`options("Gather", axis=1)` is a GatherOptionsT)."""
    obj = getattr(schema, f"{name}OptionsT")()
    for key, value in fields.items():
        if not hasattr(obj, key):
            raise AttributeError(f"{name}Options has no field {key!r}")
        setattr(obj, key, value)
    return obj
