"""optlite: Meta's OPT models in plain PyTorch (placeholder; the lead writes the public names)."""
