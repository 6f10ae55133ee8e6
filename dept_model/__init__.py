"""dept_model: the decoupled-embedding transformer, tokenizers, data and the training step."""
