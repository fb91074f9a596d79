"""sptutor: sequence parallelism for attention, written twice (oracle and real code)."""

__version__ = "0.1.0"
