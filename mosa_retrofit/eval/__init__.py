"""Measuring a model: held-out perplexity (``perplexity``), passkey retrieval and perplexity against context
(``long_context``), lm-evaluation-harness (``harness``) and pictures (``plots``)."""
