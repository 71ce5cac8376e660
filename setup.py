"""CrossMAE: cross-attention masked autoencoders, a reference path and fused Triton kernels."""

from setuptools import setup

setup(
    name="crossmae",
    version="0.1.0",
    description="CrossMAE pre-training: exact reference model, fused Triton kernels, DALI data loading",
    python_requires=">=3.10",
    packages=["model", "kernels", "train", "train.config", "train.data"],
    install_requires=[
        # torch is pinned by the install command (README, .ci/run); a range here never pulls a second one.
        "torch>=2.11",
        "numpy",
        "pillow",
        "rich",
        "safetensors",  # timm-layout encoder export and import (model/timm_format.py); no torch dependency
        "scikit-image",  # its wheel carries the photographs of the embedded demo dataset
        "matplotlib",  # the loss curve (train/visualize.py); its wheel carries one of the demo's photographs
        "pyyaml",  # recipes (configs/*.yaml, --config) and each run's resolved config.yaml (train/config/)
    ],
    extras_require={
        "kernels": ["triton>=3.6"],
        "dali": ["nvidia-dali-cuda130==2.4.0"],
        # The embedded demo data and the tests: real photographs shipped inside these wheels.
        "test": ["pytest>=8", "pytest-benchmark", "scikit-learn", "triton>=3.6"],
        # Optional references for the kernel tests and benchmarks (CUDA machines only).
        "gpu-ref": ["flash-attn", "xformers"],
    },
)
