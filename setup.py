"""Installable package for bissl_jax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10,<0.13",
    "jaxlib>=0.10,<0.13",
    "flax>=0.12,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "ml-collections>=1.0,<2",
    "chex>=0.1.90,<0.2",
    "tensorflow-datasets>=4.9,<5",
    "grain>=0.2.13,<0.3",  # streamed datasets: decoding in worker processes (ImageNet)
    "array-record>=0.5",   # TFDS's ArrayRecord files, read without TensorFlow
    "absl-py>=2.0",
    "numpy>=1.26",
    "scikit-learn>=1.4",   # the offline default's bundled digits, t-SNE
    "tqdm>=4.66",          # progress bars
    "tensorboardX>=2.6",   # TensorBoard logs without TensorFlow
    "matplotlib>=3.8",
    "scipy>=1.10",         # t quantiles of the study's confidence intervals
]

setup(
    name="bissl_jax",
    version="0.1.0",
    description="Bilevel self-supervised learning (BiSSL) in JAX/Flax.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    # configs/ and experiments/ too: the config files import configs.common, and
    # `python -m experiments.main` then runs from any directory.
    packages=find_packages(include=["bissl_jax", "bissl_jax.*", "configs", "experiments"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    # `bissl-jax run|visualize|convert` (also `python -m bissl_jax`).
    entry_points={"console_scripts": ["bissl-jax=bissl_jax.cli:main"]},
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.8", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                 "transformers>=4.40", "pyarrow>=14"],
        # Language (GPT/GLUE): the original GPT tokenizer and Hugging Face GLUE files.
        "text": ["transformers>=4.40", "pyarrow>=14", "safetensors>=0.4"],
        "torch": ["torch==2.13.0"],
    },
)
