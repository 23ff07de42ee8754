"""Training: gradients of the trainable arrays only, Adam, checkpoints, held-out measurement,
and the one training loop shared by pretraining and coprocessor training."""
