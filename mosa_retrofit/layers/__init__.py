"""Standalone MoSA modules for models written from scratch (``PureMoSA``, hybrid ``MoSA`` with dense or local
heads) and the loader of the paper's reference checkpoints. Built on ``ops``; independent of conversion."""
