"""The training noise and objective: pure tensor functions (docs/science.md)."""
