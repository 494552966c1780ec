"""recpre: pretraining recurrent-depth transformers and GPT baselines, from a laptop to a supercomputer."""

__version__ = "0.1.0"
