"""Preference oracles (base.py: the protocol; sentiment, readability, LLM judge, reward model, custom), the
label store in front of them (store.py), and registry.py, which makes the one a config names."""
