"""Networks used to distil and to evaluate, with the dataset-distillation definitions
(PROTOCOL §1): the ConvNet family, the cross-architecture nets, the CPU fast path.

``create_model(name, channels, num_classes, image_size, **overrides)`` and ``list_models``
are the public surface; importing this package registers every built-in net.
"""

from dd_bench.nets import convnet, cross_arch, frepo_convnet  # noqa: F401  (registers the built-in nets)
from dd_bench.nets.convnet import ConvNet
from dd_bench.nets.cpu_fast import standard_layout
from dd_bench.nets.layers import Classifier, has_batchnorm
from dd_bench.nets.registry import MODELS, create_model, list_models, register_model

__all__ = ["MODELS", "Classifier", "ConvNet", "create_model", "has_batchnorm", "list_models", "register_model",
           "standard_layout"]
