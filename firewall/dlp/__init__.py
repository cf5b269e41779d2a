"""Data loss prevention: the stream engine, rule packs, validators, masking and the `dlp` CLI."""
