"""CrossMAE and MAE: ViT encoder, cross-attention decoder, registry and checkpoint loading."""

from model.autoencoders import MAE, CrossMAE, ModelOutput
from model.classifier import ViTClassifier, classifier_names, create_classifier, load_encoder
from model.config import ModelConfig
from model.official import load_official, read_checkpoint
from model.registry import FAMILIES, Family, build_model, create_model, family_of, get_config, list_models
from model.timm_format import load_encoder_weights, load_timm, read_weights, to_timm

__all__ = ["FAMILIES", "MAE", "CrossMAE", "Family", "ModelConfig", "ModelOutput", "ViTClassifier", "build_model",
           "classifier_names", "create_classifier", "create_model", "family_of", "get_config", "list_models",
           "load_encoder", "load_encoder_weights", "load_official", "load_timm", "read_checkpoint", "read_weights",
           "to_timm"]
