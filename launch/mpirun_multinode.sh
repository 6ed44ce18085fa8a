#!/usr/bin/env bash
# mpirun example across several nodes (Open MPI): one rank per GPU (or per CPU socket).
#   ./launch/mpirun_multinode.sh hosts.txt 8 configs/kjv_demo.json --pp=2 --dp=4
# hosts.txt lists "hostname slots=N" lines; the build directory must be on a shared path.
# Ranks are ordered tensor-parallel fastest, then data-parallel, then pipeline stage, so keep
# tensor-parallel groups within a node (slots per node a multiple of tp).
set -euo pipefail
HOSTS=$1
NP=$2
CONFIG=$3
shift 3
exec mpirun --hostfile "$HOSTS" -np "$NP" --map-by slot --bind-to none \
  -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" -x OMPI_MCA_orte_base_help_aggregate=0 \
  ./build/eellm train --config="$CONFIG" "$@"
