# ray_app on Ray's official image, with the project installed and TotalSegmentator's weights baked in: the default
# node image of cluster.yaml, so a new node (or a Spot replacement) pulls one image and starts segmenting, with
# nothing installed or downloaded at boot (start-up is billed on every node of every job).
#
#   CPU (head, Spot CPU workers):
#     docker build -t ray-app:0.1.0-cpu .
#   GPU (Spot GPU workers): the CUDA variant of Ray's image and PyPI's CUDA build of torch
#     docker build -t ray-app:0.1.0-gpu \
#       --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#
# Push both to the ECR repository `ray-app` that cluster.yaml names (deploy/README.md, step 2):
#     aws ecr create-repository --repository-name ray-app
#     aws ecr get-login-password | docker login --username AWS --password-stdin ACCOUNT.dkr.ecr.REGION.amazonaws.com
#     docker tag ray-app:0.1.0-cpu ACCOUNT.dkr.ecr.REGION.amazonaws.com/ray-app:0.1.0-cpu && docker push ...
# Build context: the repository root (.dockerignore keeps .venv, .git and the tests out).
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
 && python -c "from ray_app.core.totalseg import disable_usage_stats; disable_usage_stats()"

# Everything is in the image: a missing model is an error, never a download from a worker.
ENV RAY_APP_DOWNLOAD_WEIGHTS=false
