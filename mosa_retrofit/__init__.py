"""mosa_retrofit: convert pretrained causal LMs to Mixture of Sparse Attention (MoSA) and adapt them."""

__version__ = "0.2.0"  # (first: submodules read it while the package is still importing)

from .layers.modules import MoSA, PureMoSA  # noqa: E402
from .layers.reference import load_reference_state_dict  # noqa: E402
from .ops.routing import select_tokens, tokens_per_head  # noqa: E402
from .ops.sparse import mosa_attention  # noqa: E402

__all__ = ["MoSA", "PureMoSA", "load_reference_state_dict", "mosa_attention", "select_tokens", "tokens_per_head"]

from .convert.attention import set_attn_backend  # noqa: E402
from .convert.config import MoSAConfig  # noqa: E402
from .convert.serialization import load, save  # noqa: E402
from .convert.surgery import convert_  # noqa: E402
from .text.assets import resolve_model  # noqa: E402
from .train.recipe import Recipe  # noqa: E402
from .train.trainer import train  # noqa: E402

__all__ += ["MoSAConfig", "convert_", "load", "save", "resolve_model", "Recipe", "train", "set_attn_backend"]
