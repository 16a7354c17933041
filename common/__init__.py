"""Code shared by the stage scripts: one themed module per mechanism."""
