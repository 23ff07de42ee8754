"""The tiny data: the tokenizer, the pretraining mixture and the synthetic reasoning tasks."""
