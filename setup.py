"""cla_jax: Cross-Layer Attention transformers in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="cla_jax",
    version="0.1.0",
    description="Train and evaluate Cross-Layer Attention (CLA) transformer language models in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level configs/ (what users name: configs/paper_1b.py:H128-MQA) installs as cla_jax.configs,
    # so no top-level package named `configs` shadows a user's own.
    packages=find_packages(include=["cla_jax", "cla_jax.*"]) + ["cla_jax.configs", "cla_jax.configs.sweeps"],
    package_dir={"cla_jax.configs": "configs"},
    entry_points={
        "console_scripts": [
            # One module per command under cla_jax/cli/, each with the same entry().
            "cla-train=cla_jax.cli.train:entry",
            "cla-eval=cla_jax.cli.eval:entry",
            "cla-generate=cla_jax.cli.generate:entry",
            "cla-describe=cla_jax.cli.describe:entry",
            "cla-convert-hf=cla_jax.cli.convert_hf:entry",
            "cla-export-hf=cla_jax.cli.export_hf:entry",
            "cla-harness=cla_jax.cli.harness:entry",
            "cla-prepare=cla_jax.cli.prepare:entry",
            "cla-python-docs=cla_jax.cli.python_docs:entry",
            "cla-sweep=cla_jax.cli.sweep:entry",
            "cla-aot=cla_jax.cli.aot:entry",
        ],
    },
    # The transformers modeling files that cla_jax.export_hf copies into every CLA export.
    package_data={"cla_jax": ["hf/*.py"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.0",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.0",
        "ml-collections>=1.1.0",
        "absl-py",
        "numpy",
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",  # random access into the prepared ArrayRecord shards
        "array_record>=0.8.6",
        "importlib_resources",  # tfds 4.9.10 imports it to prepare datasets, but only declares it for Python < 3.9
        "sentencepiece>=0.2.0",
        "tokenizers",
        "safetensors",
        "tensorboardX",
        "tqdm",
        "matplotlib",  # the sweep's pareto.png / lr_sweep.png, written after every run (Agg backend, no display)
    ],
    extras_require={
        # torch only for the Hugging Face parity tests; 2.13.0 is the CPU build. transformers: 4.57 (the last 4.x)
        # through 5.x are supported and tested (test.sh; constraints.txt and constraints-oldest.txt pin both ends).
        # lm_eval for tests/test_harness.py (the `eval` extra below); ruff and pyink: scripts/lint.sh.
        "test": [
            "pytest",
            "pytest-xdist",
            "transformers>=4.57,<6",
            "torch==2.13.0",
            "lm_eval==0.4.13",
            "ruff",
            "pyink",
            # libtpu: compile-only TPU devices for `python -m cla_jax.cli.aot` and its tests on a CPU-only machine.
            "jax[tpu]==0.10.2",
        ],
        # LM-Eval-Harness: python -m cla_jax.cli.harness (docs/eval.md).
        "eval": ["lm_eval==0.4.13"],
        "gpu": ["jax[cuda12]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
    },
)
