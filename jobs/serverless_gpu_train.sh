#!/usr/bin/env bash
# Databricks ai_runtime_task command (databricks.yml, job spark_mnist_serverless_gpu): the platform runs this file
# once on each serverless GPU node, with no ranks started for it (DeploymentSpec.command_path: "the file at this
# path is run on each node"; its examples start the ranks themselves, e.g. torchrun --nproc_per_node=8).  So it
# starts one rank per GPU of the node with spark-mnist's torchrun launcher, reading the dataset that the ingest task
# wrote to the volume (paths, auto_resume and the rest in conf/serverless-gpu.yaml).  One node: accelerator_count
# at most the node's GPUs.  Extra arguments are passed on to `spark-mnist train`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="${SPARK_MNIST_CONFIG:-$here/../conf/serverless-gpu.yaml}"
gpus="$(python -c 'import torch; print(torch.cuda.device_count())')"
exec spark-mnist train --config "$config" --launcher torchrun --use-gpu --num-processes "$gpus" "$@"
