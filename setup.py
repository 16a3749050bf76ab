"""dist_lm: a distributed trainer for GPT-style language models (see README.md)."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dist_lm",
    version="0.1.0",
    description="Train GPT-style language models from scratch: own BPE tokenizer, Triton attention, AdamW, "
    "Accelerate DDP/FSDP, safetensors checkpoints, MLflow tracking.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dist_lm", "dist_lm.*"]),
    # The bundled TinyStories sample makes the demo run with no download.
    package_data={"dist_lm.data": ["samples/*.txt"]},
    include_package_data=True,
    install_requires=[
        # Any torch >= 2.5 works; the Makefile installs exactly 2.13.0 (a local CPU build on the dev
        # machines) when torch is absent, so that pip never pulls GBs of CUDA wheels by accident.
        "torch>=2.5",
        "triton>=3.1; platform_system == 'Linux'",
        "accelerate>=1.15",
        "datasets>=3.0",
        "mlflow>=3.7",
        "safetensors>=0.4",
        "regex>=2023.0",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "psutil>=5.9",  # tracking.system_metrics (accelerate needs it too)
    ],
    extras_require={
        # Test oracles: tiktoken and tokenizers (tokenizer), transformers (HF Llama baseline and export).
        # nbclient, nbformat, ipykernel: tests/integration/test_notebook.py runs notebooks/quickstart.ipynb in a
        # kernel; matplotlib draws its loss curve (mlflow brings it today; the notebook imports it directly).
        # pytest-xdist: `pytest -n 8 tests/gpu` compiles the GPU tests' kernels on several cores at once.
        "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.6", "tiktoken>=0.7", "tokenizers>=0.20",
                "transformers>=4.45", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "matplotlib>=3.8"],
    },
)
