"""The worked example: a hospital appointment scheduling app that works offline."""
