"""Tensor operations, no modules and no model: MoSA routing, gather and scatter (``sparse``), windowed and
key-selection attention kernels (``window``), rotary embeddings (``rope``), padding from attention masks
(``masks``). Tensors in, tensors out; nothing here knows about transformers."""
