"""``python -m sptutor.grade PATH``, and ``torchrun --standalone --nproc_per_node 4 -m
sptutor.grade PATH``: grade an exercise (the same as ``sptutor grade PATH``)."""

from sptutor.exercises.grade import main

if __name__ == "__main__":
    raise SystemExit(main())
