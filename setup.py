from pathlib import Path

from setuptools import find_packages, setup


def read_requirements():
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="fastavatar",
    version="0.1.0",
    description="One photo of a face in, a 3D Gaussian-splat head out (a FastAvatar re-implementation)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["fastavatar", "fastavatar.*"]),
    package_data={"fastavatar.face": ["assets/*.tflite", "assets/*.npz", "assets/LICENSE-mediapipe", "assets/NOTICE.md"]},
    install_requires=read_requirements(),
    extras_require={
        "test": ["pytest>=7", "timm>=1.0", "ai-edge-litert>=2.0"],
        # camera-free photo mode: runs the vendored mediapipe .tflite face models (fastavatar/face/assets)
        "face": ["ai-edge-litert>=2.0"],
        # onnxruntime-gpu replaces the CPU onnxruntime (both write the same package folder):
        # pip install -e .[gpu] && pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu
        "gpu": ["onnxruntime-gpu>=1.17"],
    },
)
