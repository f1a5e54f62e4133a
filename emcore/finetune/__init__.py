"""The online finetuner: gradient descent on a displacement field (see optimizer and losses)."""
