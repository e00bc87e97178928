"""Tiny random-weight transformers exported to ONNX once and cached on disk, for tests across architectures.

`zoo_model(arch, exporter)` returns the .onnx path; `zoo_inputs(arch, path)` gives inputs that fit it;
`zoo_reference(arch, inputs)` runs the same weights in PyTorch.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pathlib

import numpy as np

from edgec.report import exclusive

REPO = pathlib.Path(__file__).resolve().parent.parent
EXPORTERS = ("dynamo", "torchscript")
SEED = 0

_TEXT = dict(vocab_size=256, max_position_embeddings=64)
_BERT = dict(_TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_IMAGE = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=64)

# model_type -> config keywords: small enough to export in seconds, big enough to keep every block.
CONFIGS: dict[str, tuple[str, dict]] = {
    "bert": ("bert", dict(_BERT, type_vocab_size=2)),
    "distilbert": ("distilbert", dict(_TEXT, dim=32, n_layers=2, n_heads=4, hidden_dim=64)),
    "mobilebert": ("mobilebert", dict(_TEXT, hidden_size=64, embedding_size=32, intra_bottleneck_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      num_feedforward_networks=2)),
    "roberta": ("roberta", dict(_BERT, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1)),
    "gpt2": ("gpt2", dict(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                          bos_token_id=255, eos_token_id=255)),
    "vit": ("vit", dict(_IMAGE)),
    "mobilevit": ("mobilevit", dict(image_size=32, patch_size=2, num_channels=3, hidden_sizes=[32, 40, 48],
                                    neck_hidden_sizes=[8, 16, 16, 24, 24, 32, 64], num_attention_heads=2,
                                    expand_ratio=2.0)),
    "albert": ("albert", dict(_BERT, embedding_size=16, type_vocab_size=2)),
    "electra": ("electra", dict(_BERT, embedding_size=16, type_vocab_size=2)),
    # 4 query heads share 2 key/value heads (grouped-query attention), rotary positions.
    "llama": ("llama", dict(_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)),
    "deit": ("deit", dict(_IMAGE)),
}
ARCHS = tuple(CONFIGS)


def _calibrate_batchnorm(model) -> None:
    """Give BatchNorm layers unit-ish scales and running statistics measured on random images.

    MobileViT initialises BatchNorm weights ~N(0, 0.02) with mean 0 / var 1 statistics, so random-weight
    activations shrink to exactly zero by the last layer and every comparison passes vacuously.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.1)
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over the calibration batch
        config = model.config
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        model.train()
        model(pixel_values=torch.rand(8, config.num_channels, size, size) * 2 - 1)
        model.eval()
    for norm in norms:
        norm.momentum = 0.1


# arch -> what runs on the freshly built model (under the seed) before it is exported.
INIT = {"mobilevit": _calibrate_batchnorm}

# (arch, exporter) -> why that export does not work in the pinned torch/transformers.
KNOWN_EXPORT_FAILURES: dict[tuple[str, str], str] = {}


def zoo_config(arch: str):
    from transformers import AutoConfig

    model_type, kwargs = CONFIGS[arch]
    return AutoConfig.for_model(model_type, **kwargs)


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("EDGEC_TEST_CACHE") or REPO / ".cache" / "zoo")


def _key(arch: str, exporter: str) -> str:
    import torch
    import transformers

    import edgec.frontends.torch as frontend

    h = hashlib.sha256()
    h.update(zoo_config(arch).to_json_string(use_diff=False).encode())
    h.update(pathlib.Path(frontend.__file__).read_bytes())  # exporter code changes invalidate the cache
    if arch in INIT:
        h.update(inspect.getsource(INIT[arch]).encode())
    h.update(f"seed={SEED}".encode())
    versions = f"torch{torch.__version__}-tf{transformers.__version__}".replace("+", "_")
    return f"{arch}-{exporter}-{versions}-{h.hexdigest()[:12]}"


def zoo_model(arch: str, exporter: str) -> pathlib.Path:
    """The cached ONNX export of the tiny `arch` model; builds it on first use."""
    if arch not in CONFIGS:
        raise KeyError(f"unknown zoo arch {arch!r}; known: {', '.join(ARCHS)}")
    if exporter not in EXPORTERS:
        raise KeyError(f"unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = cache_dir()
    path = folder / f"{_key(arch, exporter)}.onnx"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder / f"{path.stem}.lock"):
        if not path.exists():  # another worker may have built it while we waited
            from edgec.frontends.torch import export_model_by_config

            export_model_by_config(zoo_config(arch), path, exporter=exporter, seed=SEED, init=INIT.get(arch))
            _prune(folder, f"{arch}-{exporter}-", keep=path.stem)
    return path


def _prune(folder: pathlib.Path, prefix: str, keep: str) -> None:
    """Drop older builds of the same model (other versions, configs or exporter code)."""
    for stale in folder.glob(f"{prefix}*"):
        if stale.is_file() and not stale.name.startswith(keep + "."):
            stale.unlink(missing_ok=True)


def _graph_inputs(path: pathlib.Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def zoo_inputs(arch: str, path, *, batch: int = 2, seq_len: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for the graph at `path`: ids inside the vocabulary, the second row's tail padded, images in [-1, 1]."""
    config = zoo_config(arch)
    rng = np.random.default_rng(seed)
    inputs = {}
    for name in _graph_inputs(pathlib.Path(path)):
        if name == "input_ids":
            inputs[name] = rng.integers(0, config.vocab_size, (batch, seq_len), dtype=np.int64)
        elif name == "attention_mask":
            mask = np.ones((batch, seq_len), dtype=np.int64)
            if batch > 1:
                mask[1, seq_len - max(1, seq_len // 4):] = 0
            inputs[name] = mask
        elif name == "token_type_ids":
            inputs[name] = rng.integers(0, config.type_vocab_size, (batch, seq_len), dtype=np.int64)
        elif name == "pixel_values":
            size = config.image_size
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            inputs[name] = rng.uniform(-1, 1, (batch, config.num_channels, h, w)).astype(np.float32)
        else:
            raise KeyError(f"zoo_inputs does not know the graph input {name!r} of {path}")
    return inputs


def zoo_reference(arch: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The graph output (last_hidden_state) computed by PyTorch from the same seeded weights."""
    import torch
    from transformers import AutoModel

    torch.manual_seed(SEED)
    model = AutoModel.from_config(zoo_config(arch))
    if arch in INIT:
        INIT[arch](model)
    model.eval()
    kwargs = {k: torch.from_numpy(v) for k, v in inputs.items()}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    with torch.no_grad():
        return model(**kwargs, return_dict=True)["last_hidden_state"].numpy()
