"""autocompress: search per-layer pruning, quantization and distillation plans for causal LMs."""

from autocompress.errors import UserError
from autocompress.plan import CompressionPlan, LayerCompression
from autocompress.targets.artifact import export_compressed, load

__all__ = ["CompressionPlan", "LayerCompression", "UserError", "export_compressed", "load"]
__version__ = "0.1.0"
