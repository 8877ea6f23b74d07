"""Training the small default model on synthetic scenes (data generator, tokenizer, training loop)."""
