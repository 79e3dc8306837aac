"""Continued pretraining: recipes (``recipe``), stages (router warm-up, layer distillation, adaptation) and
their objectives (``stages``, ``warmup``, ``distill``), what a stage trains (``trainable``), sharding and
atomic checkpoints (``sharding``, ``checkpoint``), and the loop that runs them (``trainer``)."""
