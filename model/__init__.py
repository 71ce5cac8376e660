"""CrossMAE and MAE: ViT encoder, cross-attention decoder, registry and checkpoint loading."""

from model.autoencoders import MAE, CrossMAE, ModelOutput
from model.classifier import ViTClassifier, classifier_names, create_classifier, load_encoder
from model.config import ModelConfig
from model.official import load_official, read_checkpoint
from model.registry import create_model, get_config, list_models

__all__ = ["MAE", "CrossMAE", "ModelConfig", "ModelOutput", "ViTClassifier", "classifier_names", "create_classifier",
           "create_model", "get_config", "list_models", "load_encoder", "load_official", "read_checkpoint"]
