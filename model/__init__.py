"""CrossMAE and MAE: ViT encoder, cross-attention decoder, registry and checkpoint loading."""

from model.autoencoders import MAE, CrossMAE, ModelOutput
from model.config import ModelConfig
from model.official import load_official, read_checkpoint
from model.registry import create_model, get_config, list_models

__all__ = ["MAE", "CrossMAE", "ModelConfig", "ModelOutput", "create_model", "get_config", "list_models",
           "load_official", "read_checkpoint"]
