"""Surgery on a transformers model: the configuration (``config``), per-family adapters and feature-detected
transformers conventions (``families``, ``compat``), the converted attention layer and its head groups
(``attention``, ``heads``), the sparse KV stores (``cache``, ``window_store``), calibration, retrieval scoring
and routing thresholds, costs, ``convert_`` itself (``surgery``) and save / load (``serialization``)."""
