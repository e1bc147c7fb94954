"""Model registry: ``create_model(name, num_classes, pretrained=None, in_chans=3)``."""

from oscqat.models.registry import (create_model, is_grayscale_model, is_library_weight_name, list_models,
                                   register_model)

__all__ = ["create_model", "is_grayscale_model", "is_library_weight_name", "list_models", "register_model"]
