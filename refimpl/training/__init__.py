"""Training: gradients of the trainable arrays only, Adam, checkpoints, held-out loss, the one loop."""
