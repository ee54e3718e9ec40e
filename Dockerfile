# ray_app on Ray's official image, with the project installed and TotalSegmentator's weights baked in, so a new
# node (or a Spot replacement) starts segmenting without any download.
#
#   CPU (head, Spot CPU workers):
#     docker build -t ray-app:0.1.0-cpu .
#   GPU (Spot GPU workers): the CUDA variant of Ray's image and PyPI's CUDA build of torch
#     docker build -t ray-app:0.1.0-gpu \
#       --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#
# Push both to a registry the nodes can pull from and set cluster.yaml's docker.image (CPU) and the GPU node
# types' docker.worker_image (deploy/README.md). Build context: the repository root (.dockerignore keeps .venv,
# .git and the tests out).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

# The CPU image gets torch's CPU-only wheels: the default PyPI wheels carry about 3 GB of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX_URL} torch

COPY --chown=ray:users . /tmp/ray_app
RUN pip install --no-cache-dir /tmp/ray_app && rm -rf /tmp/ray_app

# Weights of the fast (3 mm) and full (1.5 mm, five models, plus the 6 mm crop model for --roi-subset) `total`
# task, where TotalSegmentator looks for them by default; usage statistics off (scans may be patient data).
ENV TOTALSEG_HOME_DIR=/home/ray/.totalsegmentator
RUN totalseg_download_weights -t total_fast \
 && totalseg_download_weights -t total \
 && python -c "from ray_app.totalseg import disable_usage_stats; disable_usage_stats()"

# Everything is in the image: a missing model is an error, never a download from a worker.
ENV RAY_APP_DOWNLOAD_WEIGHTS=false
