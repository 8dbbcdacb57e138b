"""The tools built on a cached encoder: one module per tool."""
