"""l2t-gym: learning to teach, as a Gymnasium environment with meta-gradient and RL teachers."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="l2t-gym",
    version="0.1.0",
    description="Learning to teach: student training as a Gymnasium env, with L2T-DIN meta-gradient and RL teachers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["envs", "envs.*", "agents", "agents.*", "students", "students.*"]),
    py_modules=["train_teacher", "evaluate", "runconfig", "reporting", "sweeps"],
    install_requires=[
        "torch>=2.4",  # fused AdamW on the CPU (the teacher skips non-finite steps on the device)
        "torchvision>=0.19",
        "gymnasium>=1.0",
        "stable-baselines3>=2.3",
        "tensorboard>=2.14",
        "numpy>=1.24",
        "scikit-learn>=1.3",
        "mnist1d>=0.0.2",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={"ray": ["ray>=2.9"], "dev": ["pytest>=7.4", "ruff>=0.5", "ray>=2.9"]},
    entry_points={"console_scripts": ["l2t-train=train_teacher:cli", "l2t-evaluate=evaluate:cli"]},
)
