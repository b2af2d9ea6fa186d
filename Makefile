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
# A MobileOne-style graph exported with its training branches (models/foreign/make_mobileone_tiny.py).
FOREIGN := models/foreign/mobileone_tiny
# 1 when torch sees a CUDA GPU: the demo then also times its TensorRT engines.
GPU = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)

.PHONY: install demo test test-timm bench-gate clean

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
	@echo "A graph from another tool, training branches still in it: verify fails (exit 4), fuse folds it in the graph."
	$(RVDEPLOY) verify $(FOREIGN).onnx; test $$? -eq 4
	$(RVDEPLOY) fuse $(FOREIGN).onnx -o $(DEMO)/$(notdir $(FOREIGN))_plain.onnx
	$(RVDEPLOY) verify $(DEMO)/$(notdir $(FOREIGN))_plain.onnx
	$(RVDEPLOY) bench $(FOREIGN).onnx $(DEMO)/$(notdir $(FOREIGN))_plain.onnx --batch 1,8 --warmup-s 0.5 --min-s 1
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

# timm's reference folds (tests/test_graphfold_timm.py) and ultralytics' detectors through every stage
# (tests/test_real_graphs.py); both skipped by `make test`. timm and ultralytics need torchvision, and
# PyPI's torchvision does not import beside the CPU torch build: this venv takes torch 2.14.1 with its
# torchvision 0.29.1 from this machine's disk (a CUDA build, about 5.5 GB, that runs on the CPU).
TIMM_VENV ?= .venv-timm
$(TIMM_VENV)/.installed: pyproject.toml
	test -x $(TIMM_VENV)/bin/python || $(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(TIMM_VENV)/bin/pip install --quiet --disable-pip-version-check timm ultralytics -e ".[cpu,dev]"
	touch $@

test-timm: $(TIMM_VENV)/.installed
	$(TIMM_VENV)/bin/python -m pytest -q tests/test_graphfold_timm.py tests/test_real_graphs.py

# The latency regression gate CI runs after the tests (benchmarks/ci_gate.sh).
bench-gate: install
	bash benchmarks/ci_gate.sh

clean:
	rm -rf build .pytest_cache .hypothesis
