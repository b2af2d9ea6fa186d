# rvdeploy: `make demo` runs the pipeline on the shipped model, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
# A CPU build that lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# cpu,dev by default; on a GPU host: make install EXTRAS=gpu,dev TORCH=torch
EXTRAS ?= cpu,dev
PY := $(VENV)/bin/python
RVDEPLOY := $(VENV)/bin/rvdeploy
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
DEMO := build/demo
DEMO_CKPT := models/digits/repvgg_digits_train.pth
# 1 when torch sees a CUDA GPU: the demo then also times its TensorRT engines.
GPU = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)

.PHONY: install demo test bench-gate clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes; pip itself is idempotent.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	mkdir -p $(DEMO)
	$(RVDEPLOY) info $(DEMO_CKPT)
	$(RVDEPLOY) fuse $(DEMO_CKPT) -o $(DEMO)/digits_fused.pth
	$(RVDEPLOY) export $(DEMO)/digits_fused.pth --onnx $(DEMO)/digits.onnx
	$(RVDEPLOY) verify $(DEMO)/digits.onnx --checkpoint $(DEMO_CKPT)
	$(RVDEPLOY) quantize $(DEMO)/digits.onnx --fp16 -o $(DEMO)/digits_fp16.onnx --calib calib/digits
	$(RVDEPLOY) quantize $(DEMO)/digits.onnx --int8 --calib calib/digits --target tensorrt \
		--calib-cache $(DEMO)/calib-cache.json -o $(DEMO)/digits_int8_tensorrt.onnx \
		--val models/digits/heldout --max-top1-drop 0.5
	$(RVDEPLOY) quantize $(DEMO)/digits.onnx --int8 --calib calib/digits --target onnxruntime \
		--calib-cache $(DEMO)/calib-cache.json -o $(DEMO)/digits_int8_onnxruntime.onnx
	$(RVDEPLOY) build-engine $(DEMO)/digits.onnx -o $(DEMO)/digits_fp32.engine
	$(RVDEPLOY) build-engine $(DEMO)/digits.onnx --fp16 --calib calib/digits -o $(DEMO)/digits_fp16.engine
	$(RVDEPLOY) build-engine $(DEMO)/digits.onnx --int8 --calib calib/digits --calib-cache $(DEMO)/calib-cache.json \
		-o $(DEMO)/digits_int8.engine
	$(RVDEPLOY) eval --compare $(DEMO)/digits.onnx $(DEMO)/digits_fp16.onnx $(DEMO)/digits_int8_tensorrt.onnx \
		$(DEMO)/digits_int8_onnxruntime.onnx --data models/digits/heldout
	$(RVDEPLOY) bench $(DEMO_CKPT) $(DEMO)/digits.onnx $(DEMO)/digits_int8_onnxruntime.onnx \
		$(if $(filter 1,$(GPU)),$(DEMO)/digits_fp32.engine $(DEMO)/digits_fp16.engine $(DEMO)/digits_int8.engine) \
		--batch 1,32 --warmup-s 0.5 --min-s 1 --json $(DEMO)/bench.json --plot $(DEMO)/bench.png

test: install
	$(PY) -m pytest -q

# The latency regression gate CI runs after the tests (benchmarks/ci_gate.sh).
bench-gate: install
	bash benchmarks/ci_gate.sh

clean:
	rm -rf build .pytest_cache .hypothesis
