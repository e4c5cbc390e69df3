"""Candidate generation: one backend protocol (base.py), transformers (hf.py), the vLLM engine and
the vLLM server pool; backends.py picks one by name."""
