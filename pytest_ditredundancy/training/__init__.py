"""Trained tiny DiTs: procedural data, a shared VAE, PixArt-/SD3-class models, and a prompt-adherence scorer.

Random-weight tiny models exercise every code path but their redundancy is that of noise; the models trained
here (``python -m pytest_ditredundancy.train NAME``) are small enough for a CPU and trained enough that
their images match their captions, so their profiles and cache-gate numbers mean something.
"""
