"""``python -m sptutor.train ...``: the same as ``sptutor train ...``; and under torchrun,
``torchrun --standalone --nproc_per_node N -m sptutor.train ...`` (or, on each of several nodes,
``torchrun --nnodes 2 --nproc_per_node 8 --node-rank 0|1 --rdzv-backend c10d --rdzv-endpoint
HOST:PORT --rdzv-id JOB -m sptutor.train ...``): on torchrun's ranks, NCCL on
``cuda:LOCAL_RANK`` when CUDA is available, gloo otherwise; rank 0 prints."""

import sys

from sptutor import cli

if __name__ == "__main__":
    raise SystemExit(cli.main(["train", *sys.argv[1:]]))
