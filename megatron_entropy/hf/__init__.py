"""Hugging Face export: configuration / modeling / tokenization files copied next to exported
weights (trust_remote_code=True), and export.py (checkpoint <-> Hugging Face directory)."""
