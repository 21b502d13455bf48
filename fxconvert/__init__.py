"""fxconvert: Hugging Face T5-family models as clean torch.fx graphs, ready for pipeline partitioning."""
