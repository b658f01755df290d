"""The fine-tuning workflow behind ``peftkit train / eval / predict / merge / info``."""
