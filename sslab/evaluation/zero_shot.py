"""Zero-shot classification with class-name prompts (CLIP, Radford et al., 2021, Sec. 3.1.4).

Each class name fills every prompt template; the normalised text embeddings of one class are averaged and
normalised again (prompt ensembling in embedding space), and an image gets the class whose embedding has
the largest cosine with its normalised image embedding (the ensembling: ``sslab.modules.clip_loss``). No labels are used beyond the class names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from sslab.evaluation.features import extract
from sslab.methods.base import SSLMethod


def has_text_tower(model: SSLMethod) -> bool:
    """Whether ``model`` can be evaluated zero-shot (an image-text method such as WSP: ``zero_shot``)."""
    return model.zero_shot


def zero_shot_predict(image_features: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
    """(N,) index of the class with the highest cosine similarity to each image."""
    return (F.normalize(image_features, dim=-1) @ F.normalize(class_features, dim=-1).T).argmax(dim=1)


def top1(image_features: torch.Tensor, labels: torch.Tensor, class_features: torch.Tensor) -> float:
    """Zero-shot top-1 accuracy in percent."""
    pred = zero_shot_predict(image_features.float(), class_features.float().to(image_features.device))
    return 100.0 * (pred.cpu() == labels.cpu()).float().mean().item()


@torch.no_grad()
def zero_shot_accuracy(
    model: torch.nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    class_names: Sequence[str],
    device: torch.device | str,
) -> float:
    """Top-1 (percent) of ``model`` on every batch of ``loader`` ({"image" uint8, "label"}), classifying among
    ``class_names`` (in label order) with the prompt-ensembled text embeddings."""
    model.to(device)
    images, labels = extract(model.encode_image_uint8, loader)
    return top1(images, labels, model.class_embeddings(list(class_names)))


def chance_level(num_classes: int) -> float:
    """Top-1 in percent of guessing uniformly (balanced test split)."""
    return 100.0 / num_classes
