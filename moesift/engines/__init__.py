"""Run a model: transformers loading, restriction, tensor reading, and the mlx-lm and llama.cpp backends."""
