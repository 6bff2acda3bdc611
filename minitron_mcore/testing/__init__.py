"""Helpers that make tiny, random, local Hugging Face models and tokenizers.

Used by the tests, the benchmarks and the CPU demo: nothing is downloaded from a hub.
"""
