"""cla_jax: Cross-Layer Attention transformers in JAX/Flax."""

from setuptools import setup

setup(
    name="cla_jax",
    version="0.1.0",
    description="Train and evaluate Cross-Layer Attention (CLA) transformer language models in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["cla_jax", "cla_jax.data", "configs"],
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
    ],
    extras_require={
        # torch only for the Hugging Face parity tests; 2.13.0 is the CPU build.
        "test": ["pytest", "pytest-xdist", "transformers>=4.45", "torch==2.13.0"],
        "gpu": ["jax[cuda12]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
    },
)
