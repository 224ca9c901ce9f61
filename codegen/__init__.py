"""IR + checker Facts -> kernel plan -> Triton source text -> cached module."""
