"""``peftkit ui``: a web page over run folders and search studies (the layer above serve)."""
