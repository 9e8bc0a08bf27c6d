from pathlib import Path

from setuptools import find_packages, setup

requirements = Path(__file__).with_name("requirements.txt").read_text().splitlines()

setup(
    name="lance_ds",
    version="0.1.0",
    description="DeepSpeed ZeRO-3 trainer for Lance-style unified multimodal models",
    python_requires=">=3.10",
    packages=find_packages(include=["lance_ds", "lance_ds.*"]),
    package_data={"lance_ds": ["assets/**/*"]},
    # torch is deliberately not listed: CPU users install requirements-cpu.txt first, GPU users their own CUDA build.
    install_requires=[r for r in requirements if r and not r.startswith("#")],
)
