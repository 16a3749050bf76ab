# The README's two commands: `make demo` and `make test`. Each installs what it needs first (once).
PYTHON ?= python3
# Through the interpreter, so a venv's accelerate is used even when the venv is not activated.
ACCELERATE ?= $(PYTHON) -m accelerate.commands.launch
# torch 2.13.0 is what the CPU dev machines install without pulling GBs of CUDA wheels; any torch >= 2.5
# already installed is kept.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo demo-ddp test lint bench-tokenizer clean

install: .install-stamp

.install-stamp: setup.py
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_PIN)"
	$(PYTHON) -m pip install -e ".[dev]"
	@touch .install-stamp

# The demo: a small Transformer on the bundled TinyStories sample (one process; the GPU if present).
demo: install
	$(ACCELERATE) -q --config_file configs/accelerate/single.yaml launch/train.py --config configs/demo.yaml $(ARGS)

# The same demo as two CPU processes (DDP over gloo).
demo-ddp: install
	$(ACCELERATE) --config_file configs/accelerate/cpu_ddp.yaml launch/train.py --config configs/demo.yaml \
		name=demo-ddp $(ARGS)

# The whole suite: unit, integration (real accelerate launch, real MLflow); tests/gpu skips without CUDA.
test: install
	$(PYTHON) -m pytest tests -q

lint: install
	$(PYTHON) -m ruff check dist_lm launch tests benchmarks

bench-tokenizer: install
	$(PYTHON) benchmarks/bench_tokenizer.py

clean:
	rm -rf runs data mlflow.db mlruns .install-stamp
