"""The retrofit study: how much perplexity a conversion keeps for how much attention compute and KV cache.

A sweep over (dense heads kept per layer) x (sparsity) x (routing) x (router init) x (fill), each point
converted from the same original model, scored on held-out in-domain text and on an out-of-domain text, costed
at several sequence lengths, and timed (forward + backward of one attention layer against the original layer).
At a given dense count every method keeps the *same* heads dense (the highest output energy on calibration
text, see calibration.py). Two baselines replace the other heads at equal compute (``MoSAConfig.sparse_heads``):

* ``local``: sliding-window heads whose window gives the same query-key pairs at the evaluation length as
  a MoSA head at that sparsity (``costs.equal_compute_window``); they still project every token;
* ``pruned``: the heads are removed (with fill='mean': replaced by their mean output, a mean-ablation).

Points named in ``StudySpec.adapt`` are also adapted by the ordinary recipe trainer (``adapt_distill_steps``
of layer distillation, then ``adapt_steps`` end-to-end steps of LM + distillation loss on ``adapt_trainable``),
then measured again.

Every finished point is appended to ``results.jsonl`` at once, so an interrupted study resumes where it
stopped (adaptation resumes from its last checkpoint); the Markdown table and the plot are rebuilt from it.

The study runs from ``study.measure`` (``run_study``, ``open_workbench``, ``adapt_point``; it trains, so it sits
above the trainer); the package itself holds what a report needs: the spec and the Markdown.
"""

from .report import machine, render_markdown, write_report
from .spec import METHODS, Point, StudySpec

__all__ = ["METHODS", "Point", "StudySpec", "machine", "render_markdown", "write_report"]
