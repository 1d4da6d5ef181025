"""oscquant: W4A4 inference with Outlier Separation in the Channel dimension (OSC)."""

__version__ = "0.1.0"

from .accuracy import accuracy  # noqa: E402
from .calibration import ChannelStats, collect_stats  # noqa: E402
from .checkpoint import load_quantized, save_quantized  # noqa: E402
from .config import LayerScheme, OSCConfig  # noqa: E402
from .convert import quantize, summary  # noqa: E402
from .evaluate import perplexity  # noqa: E402
from .gated import fuse_gated_mlps  # noqa: E402
from .head_norms import fuse_head_norms  # noqa: E402
from .linear import OSCLinear  # noqa: E402
from .norms import fuse_norms  # noqa: E402
from .siblings import fuse_siblings  # noqa: E402

__all__ = ["accuracy", "ChannelStats", "LayerScheme", "OSCConfig", "OSCLinear", "collect_stats", "fuse_gated_mlps", "fuse_head_norms", "fuse_norms", "fuse_siblings", "load_quantized",
           "perplexity", "quantize", "save_quantized", "summary"]
