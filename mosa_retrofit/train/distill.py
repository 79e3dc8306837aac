"""Layer-wise distillation: every converted attention layer learns to reproduce the original layer's output.

The teacher (the unconverted model) runs once per batch without autograd; hooks record, for every converted
layer, the input its attention module received and the output it produced. Each student layer then runs on
the *teacher's* input and is pulled toward the teacher's output:

    loss = mean over converted layers of  Σ_t ‖y_student(t) − y_teacher(t)‖² / Σ_t ‖y_teacher(t)‖²

(the sums run over real tokens and the batch). The layers learn independently of each other, so a step costs
one teacher forward, stopped after the last converted layer (no LM head), plus the attention layers' own
forward and backward: no backward through the MLPs and the vocabulary projection. Every MoSA head, router,
fill and the dense heads beside them get a signal at every token. What compounds across layers is left to an
end-to-end ``adaptation`` stage after it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..convert.compat import StopForward, without_cache
from ..convert.families import attention_layers, mosa_layers


class LayerDistill:
    """Context manager: hooks on the teacher's attention modules; ``loss(ids)`` runs one distillation step."""

    def __init__(self, teacher: nn.Module, student: nn.Module):

        self.student_layers = mosa_layers(student)
        if not self.student_layers:
            raise ValueError("layer distillation needs a converted student (no MoSA layers found)")
        teacher_layers = attention_layers(teacher)
        missing = sorted(set(self.student_layers) - set(teacher_layers))
        if missing:
            raise ValueError(f"the teacher has no attention layers {missing} that the student converted")
        self.teacher = teacher
        self.teacher_layers = {i: teacher_layers[i][1] for i in self.student_layers}
        self.last = max(self.student_layers)
        self.captured: dict[int, tuple] = {}
        self.hooks: list = []

    def __enter__(self) -> LayerDistill:
        for i, m in self.teacher_layers.items():
            self.hooks.append(m.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.hooks.append(m.register_forward_hook(self._post(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            kwargs = without_cache(kwargs)
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            self.captured[i] = (args, kwargs)
        return hook

    def _post(self, i: int):
        def hook(module, args, kwargs, output):
            self.captured[i] = (*self.captured[i], output[0])
            if i == self.last:
                raise StopForward  # nothing after the last converted layer is needed
        return hook

    def loss(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Mean over converted layers of the relative squared error of the student layer's output."""
        self.captured = {}
        with torch.no_grad():
            try:
                self.teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except StopForward:
                pass
        real = None if attention_mask is None else attention_mask.bool()[..., None]  # (B, T, 1)
        losses = []
        for i, m in self.student_layers.items():
            args, kwargs, target = self.captured.pop(i)
            out = m(*args, **kwargs)[0]
            err, ref = (out.float() - target.float()).pow(2), target.float().pow(2)
            if real is not None:
                err, ref = err * real, ref * real
            losses.append(err.sum() / ref.sum().clamp_min(1e-12))
        return torch.stack(losses).mean()
