"""Tasks: what to train on and how to score it (data and loss, or environments and objectives)."""
