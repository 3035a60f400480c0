"""autocompress: search per-layer pruning, quantization and distillation plans for causal LMs."""

from autocompress.errors import UserError
from autocompress.plan import CompressionPlan, LayerCompression
from autocompress.targets.artifact import export_compressed, load
from autocompress.version import __version__

__all__ = ["CompressionPlan", "LayerCompression", "UserError", "__version__", "export_compressed", "load"]
