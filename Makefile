# The README's two commands: `make demo` and `make test`. Each first checks that this interpreter runs this checkout
# with everything setup.py asks for, and installs only when it does not.
PYTHON ?= python3
# Through the interpreter, so a venv's accelerate is used even when the venv is not activated.
ACCELERATE ?= $(PYTHON) -m accelerate.commands.launch
# Installed only when torch is missing: on our dev machines the registry serves a local CPU build of 2.13.0; from
# PyPI on Linux it is the CUDA build (several GB). Install the torch you want first to choose: any torch >= 2.5
# already installed is kept.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo demo-ddp test lint bench-tokenizer clean

# Checked against this interpreter every time (tools/check_install.py, well under a second): installs when this
# checkout is not what `import dist_lm` finds here, or a requirement of setup.py is missing or too old.
install:
	@$(PYTHON) tools/check_install.py || { \
		$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_PIN)"; \
		$(PYTHON) -m pip install -e ".[dev]"; }

# The demo: a small Transformer on the bundled TinyStories sample (one process; the GPU if present).
demo: install
	$(ACCELERATE) -q --config_file configs/accelerate/single.yaml launch/train.py --config configs/demo.yaml $(ARGS)

# The same demo as two CPU processes (DDP over gloo).
demo-ddp: install
	$(ACCELERATE) -q --config_file configs/accelerate/cpu_ddp.yaml launch/train.py --config configs/demo.yaml \
		name=demo-ddp $(ARGS)

# The whole suite: unit, integration (real accelerate launch, real MLflow); tests/gpu skips without CUDA.
test: install
	$(PYTHON) -m pytest tests -q

lint: install
	$(PYTHON) -m ruff check dist_lm launch tests benchmarks tools

bench-tokenizer: install
	$(PYTHON) benchmarks/bench_tokenizer.py

clean:
	rm -rf runs data mlflow.db mlruns
