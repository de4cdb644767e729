"""Turn a plan into a checkpoint or a model: trim, resident loading, the offload runtime."""
