"""rocm-workbench: a research workbench for LLM inference kernels on AMD GPUs."""

__version__ = "0.1.0"
