#!/usr/bin/env bash
# Databricks ai_runtime_task command (databricks.yml, job spark_mnist_serverless_gpu): the platform runs this file
# once on each serverless GPU node, with no ranks started for it (DeploymentSpec.command_path: "the file at this
# path is run on each node"; its examples start the ranks themselves, e.g. torchrun --nproc_per_node=8).  So it
# starts one rank per GPU of the node with spark-mnist's torchrun launcher, reading the dataset that the ingest task
# wrote to the volume (paths, auto_resume and the rest in conf/serverless-gpu.yaml).  Extra arguments are passed on
# to `spark-mnist train`.
# One node only: accelerator_count above the node's GPUs would start every node's ranks apart, each training alone
# into the same run_dir.  The platform tells each node the ranks of the whole run (WORLD_SIZE) and its place
# (NODE_RANK), as databricks-sdk-air's own launcher reads them; a run beyond this node is refused, exit 2.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="${SPARK_MNIST_CONFIG:-$here/../conf/serverless-gpu.yaml}"
gpus="$(python -c 'import torch; print(torch.cuda.device_count())')"
if [ "${WORLD_SIZE:-$gpus}" -gt "$gpus" ] || [ "${NODE_RANK:-0}" -gt 0 ]; then
  echo "spark-mnist: error: ${WORLD_SIZE:-?} ranks (accelerator_count) span more than this node's $gpus GPU(s)," \
    "and multi-node serverless runs are not supported yet: set accelerator_count to at most $gpus" >&2
  exit 2
fi
exec spark-mnist train --config "$config" --launcher torchrun --use-gpu --num-processes "$gpus" "$@"
