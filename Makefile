# One command sets up and runs the main job on a real model (make demo); one runs the tests (make test).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out

.PHONY: setup setup-aarch64 demo test bench bench-fusion bench-attention bench-int8 bench-prune bench-tflite bench-tvm clean

setup: $(VENV)/.installed

# torch gets its own step first: torch==2.13.0 is the CPU build, any looser spec pulls a multi-GB
# CUDA build. The core package does not need torch; the [torch] extra and the tests do.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[torch,data,dev,tflite,tvm]'
	touch $@

# Export the shipped all-MiniLM-L6-v2 with both torch exporters, tokenize the gensim test sentences,
# then compile both exports for x86-64, verified on the 200 polarity sentences.
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python tools/export_minilm.py --out $(OUT)/models
	HF_HUB_OFFLINE=1 $(BIN)/python tools/prepare_data.py --out $(OUT)/data
	$(BIN)/edgec compile $(OUT)/models/minilm-dynamo.onnx --target x86-64 --inputs $(OUT)/data/polarity.npz -o $(OUT)/minilm-dynamo-x86-64
	$(BIN)/edgec compile $(OUT)/models/minilm-torchscript.onnx --target x86-64 --inputs $(OUT)/data/polarity.npz -o $(OUT)/minilm-torchscript-x86-64

# The aarch64 cross toolchain and qemu-user (Debian packages, as root) and the aarch64 Python + TVM runtime
# that runs TVM's aarch64 modules under emulation. Where it cannot be set up, those tests skip and say why.
setup-aarch64: setup
	PYTHON=$(BIN)/python bash tools/setup_aarch64.sh

test: setup
	-$(MAKE) --no-print-directory setup-aarch64
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --durations=15

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python tools/bench_compile.py

# edgec's x86-64 compile against onnxruntime's own transformer optimizer, on both MiniLM exports.
bench-fusion: setup
	HF_HUB_OFFLINE=1 $(BIN)/python tools/bench_fusion.py

# MiniLM int8: onnxruntime's quantize_static / quantize_dynamic against edgec int8 and mixed.
bench-int8: setup
	HF_HUB_OFFLINE=1 $(BIN)/python tools/bench_int8.py

# MiniLM pruned at 0/25/50% heads x 0/25/50% FFN, with and without reconstruction, fp32 and int8: Pareto table.
bench-prune: setup
	HF_HUB_OFFLINE=1 $(BIN)/python tools/bench_prune.py

# Cost curve and error of sliding-window and linear attention at 128-2048 tokens.
bench-attention: setup
	HF_HUB_OFFLINE=1 $(BIN)/python tools/bench_attention.py

# MiniLM for snapdragon-8 as fp32, fp16 and int8 .tflite: size, cosine, latency in LiteRT's interpreter.
bench-tflite: setup
	HF_HUB_OFFLINE=1 $(BIN)/python tools/bench_tflite.py

# MiniLM through TVM (host llvm): untuned and tuned against onnxruntime fp32.
bench-tvm: setup
	HF_HUB_OFFLINE=1 $(BIN)/python tools/bench_tvm.py

clean:
	rm -rf $(OUT) .cache
