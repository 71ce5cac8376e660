"""Loading the authors' released CrossMAE / MAE checkpoints.

Our module names are the authors' (see ``shared/reference/*.tsv``), so loading is a state-dict copy;
what this adds is checking. Every checkpoint key must be used and every model parameter and buffer
filled, with matching shapes, or nothing is copied and the error lists what is wrong.
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from collections.abc import Collection, Mapping

import torch
from torch import nn


def model_entry(checkpoint: Mapping) -> Mapping:
    """The authors save ``{"model": state_dict, ...}``; accept that or a bare state dict."""
    entry = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(entry, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(entry).__name__}")
    return entry


def read_checkpoint(path: str | os.PathLike) -> Mapping:
    """``torch.load`` a checkpoint file without executing code from it (``weights_only=True``);
    a missing, truncated or foreign file raises an error that names the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"cannot read checkpoint {path}: the file is empty (0 bytes), e.g. a copy or a save "
                         "that never finished; use another checkpoint")
    try:
        # The authors' training checkpoints carry their argparse.Namespace: a plain attribute bag,
        # allowed explicitly; anything else that is not a tensor container is refused.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:
        raise ValueError(f"cannot read checkpoint {path}: permission denied; make it readable") from e
    # OSError: a zip truncated inside its directory makes the reader seek past the end (EINVAL).
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        raise ValueError(f"cannot read checkpoint {path}: it is truncated, corrupt or not a PyTorch "
                         f"checkpoint of tensors ({type(e).__name__}: {first_sentence(e)})") from e


def first_sentence(error: BaseException, limit: int = 300) -> str:
    """The first sentence of an error's message, whole (torch's reader errors run on for lines)."""
    text = " ".join(str(error).split()) or "no message"
    end = text.find(". ")
    sentence = text if end < 0 else text[:end + 1]
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + " ..."


def load_official(model: nn.Module, checkpoint: Mapping | str | os.PathLike) -> nn.Module:
    """Copy a released checkpoint (a path, the loaded dict, or its ``"model"`` entry) into ``model``,
    made by ``create_model`` with the matching configuration. Raises KeyError / ValueError naming
    every missing, unexpected, misshapen or non-tensor entry; on error the model is left untouched."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    entry = model_entry(checkpoint)
    own = model.state_dict()
    check_entries(entry, {k: v.shape for k, v in own.items()},
                  hint="does the model's configuration (size, decoder_depth, inter_block, use_input, "
                       "feature_layers, decoder_self_attn) match the checkpoint's?")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(entry[key])
    return model


def check_entries(entry: Mapping, shapes: Mapping[str, tuple[int, ...]], hint: str, optional: Collection[str] = (),
                  ignored: Collection[str] = (), shape_hint: str = "") -> None:
    """Check a state dict against the ``shapes`` a model expects, before anything is copied: every
    expected key present (unless ``optional``), no key outside ``shapes`` and ``ignored``, every present
    one a tensor of the expected shape. Raises KeyError naming the missing and unexpected keys (then
    ``hint``), else ValueError naming the non-tensor and misshapen ones (then ``shape_hint``)."""
    missing = sorted(k for k in shapes if k not in entry and k not in optional)
    unexpected = sorted(k for k in entry if k not in shapes and k not in ignored)
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model: missing {short_list(missing)}, "
                       f"unexpected {short_list(unexpected)}; {hint}")
    present = [k for k in shapes if k in entry]
    not_tensors = sorted(k for k in present if not isinstance(entry[k], torch.Tensor))
    misshapen = sorted(f"{k}: checkpoint {tuple(entry[k].shape)} vs model {tuple(shapes[k])}"
                       for k in present if k not in not_tensors and tuple(entry[k].shape) != tuple(shapes[k]))
    if not_tensors or misshapen:
        raise ValueError(f"checkpoint entries with the wrong type or shape: {short_list(not_tensors + misshapen)}"
                         + (f"; {shape_hint}" if shape_hint else ""))


def short_list(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return "[" + ", ".join(names[:limit]) + more + "]"
