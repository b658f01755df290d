"""``peftkit serve``: one base model in memory, many adapters, one mixed batch per forward."""
