"""Object regions from self-attention: k-means on each pixel's self-attention row, each cluster named by the word
whose cross-attention fills it (Dynamic Prompt Learning's background masks, Wang et al. 2023, from Patashnik et al.'s
observation that self-attention rows group pixels of one object)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKGROUND = "background"


def kmeans(points: torch.Tensor, clusters: int, iterations: int = 50, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding, deterministic for a seed: each of the (N, D) points' cluster, (N,)."""
    if not 1 <= clusters <= points.shape[0]:
        raise ValueError(f"cannot split {points.shape[0]} points into {clusters} clusters")
    generator = torch.Generator().manual_seed(seed)
    points = points.float()
    centres = points[torch.randint(points.shape[0], (1,), generator=generator)]
    for _ in range(1, clusters):
        nearest = torch.cdist(points, centres).amin(1) ** 2
        weights = nearest / nearest.sum() if nearest.sum() > 0 else torch.full_like(nearest, 1 / len(nearest))
        centres = torch.cat([centres, points[torch.multinomial(weights, 1, generator=generator)]])
    labels = torch.cdist(points, centres).argmin(1)
    for _ in range(iterations):
        for c in range(clusters):
            members = points[labels == c]
            if len(members):
                centres[c] = members.mean(0)
        updated = torch.cdist(points, centres).argmin(1)
        if torch.equal(updated, labels):
            break
        labels = updated
    return labels


def name_clusters(labels: torch.Tensor, word_maps: torch.Tensor, words: list[str], threshold: float = 0.2) -> list[str]:
    """Each cluster's name: the word whose map (each scaled to a peak of 1) has the highest mean over the cluster's
    pixels, if that mean exceeds `threshold`, else BACKGROUND. labels: (h*w,); word_maps: (words, h, w)."""
    flat = word_maps.flatten(1)
    flat = flat / flat.amax(1, keepdim=True).clamp_min(1e-12)
    names = []
    for c in range(int(labels.max()) + 1):
        inside = labels == c
        if not inside.any():
            names.append(BACKGROUND)
            continue
        means = flat[:, inside].mean(1)
        best = int(means.argmax())
        names.append(words[best] if means[best] > threshold else BACKGROUND)
    return names


def regions(self_attention: torch.Tensor, word_maps: torch.Tensor, words: list[str], clusters: int = 5,
            threshold: float = 0.2, seed: int = 0) -> dict[str, torch.Tensor]:
    """{word or BACKGROUND: boolean (h, w) mask} from (h*w, h*w) self-attention at side h = w and the words' cross-attention
    maps (words, any side; resized to h by nearest neighbour, as DPL's code repeats its 16x16 maps to 32x32)."""
    side = int(round(self_attention.shape[0] ** 0.5))
    labels = kmeans(self_attention, clusters, seed=seed)
    maps = F.interpolate(word_maps[None].float(), size=(side, side), mode="nearest")[0]
    names = name_clusters(labels, maps, words, threshold)
    found = {}
    for c, name in enumerate(names):
        found[name] = found.get(name, torch.zeros(side * side, dtype=torch.bool)) | (labels == c)
    return {name: mask.reshape(side, side) for name, mask in found.items()}
