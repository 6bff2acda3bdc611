"""Activation-based importance of heads, query groups, MLP neurons, embedding channels and
layers (Minitron, arXiv 2407.14679 sec. 2.2)."""
