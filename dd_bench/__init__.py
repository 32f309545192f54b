"""dd-bench: a benchmark harness for dataset distillation."""

from dd_bench.method import METHODS, Method, RunContext, SyntheticSet, register_method

__version__ = "0.1.0"
__all__ = ["METHODS", "Method", "RunContext", "SyntheticSet", "register_method", "__version__"]
