"""``python -m training visualize``: the pictures the research code promised, made honestly.

- ``reconstruction.png``: test images (top row) above their VAE reconstructions (bottom row);
- ``samples_<label>.png``: a grid per label of the first attribute;
- ``latent_pca.png`` / ``latent_tsne.png``: test-set latents (posterior means) projected to 2-D, coloured by
  the attribute;
- ``denoising_path_<label>.png``: one row per sample, the **true** reverse trajectory left to right: the starting
  noise, then the x0 predictions at evenly spaced steps, ending at the final sample;
- ``denoising_<label>.gif``: the same trajectory as an animation;
- ``edits_to_<label>.png``: one row per test face of the other label, edited toward ``label`` by DDIM as
  ``POST /edit`` edits (``edit_strength``, ``edit_steps``, ``edit_guidance``: the CLI passes its defaults): the input, the edit, and where they differ (the mean absolute difference over RGB, times
  ``edit_pictures.DIFFERENCE_GAIN``, white where they differ most);
- ``student_vs_default.png``, when the checkpoints hold a distilled student of the model (the one a worker serves
  beside it): the first label's samples of the same noise, one row per sampler: the model's (``sampler``, ``steps``),
  then the student's at ``STUDENT_STEPS`` (those it takes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from facegen.model.checkpoints import served_versions
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.diffusion.samplers import STUDENT_SAMPLER, trajectory_indices
from facegen.model.imaging import gif_bytes, grid_image, to_float, to_uint8
from facegen.model.pipeline import LatentDiffusion
from training.data.celeba import load_split
from training.evaluation.edit_pictures import edit_rows
from training.evaluation.evaluate_edit import edit_images

STUDENT_STEPS = (1, 2, 4)  # the student's rows of student_vs_default.png


def denoising_trajectory(model: LatentDiffusion, attributes: dict[str, bool], seed: int, count: int, sampler: str,
                         steps: int, guidance: float, frames: int) -> list[torch.Tensor]:
    """``frames`` decoded states, each ``uint8 [count, 3, H, W]``: the starting noise, then x0 predictions."""
    pairs = [(seed, i) for i in range(count)]
    labels = model.labels_for(attributes).expand(count, -1)
    wanted = trajectory_indices(steps, frames)
    captured: list[torch.Tensor] = []
    model.sample_latents(labels, ImageNoise(pairs, model.device), sampler, steps, guidance,
                         lambda i, x, x0: captured.append(x0.clone()) if i in wanted else None)
    start = ImageNoise(pairs, model.device).draw(model.latent_shape)
    return [to_uint8(model.decode(latents)) for latents in [start, *captured]]


def student_rows(model: LatentDiffusion, student: LatentDiffusion, attributes: dict[str, bool], seed: int,
                 count: int, sampler: str, steps: int, guidance: float) -> torch.Tensor:
    """``uint8 [R count, 3, H, W]``: ``count`` samples of the noise ``(seed, 0..count-1)`` per row, the model's at
    ``sampler``/``steps``, then ``student``'s at each of ``STUDENT_STEPS`` up to its ``max_steps``, all at
    ``guidance``."""
    labels = model.labels_for(attributes).expand(count, -1)
    rows = [(model, sampler, steps)] + [(student, STUDENT_SAMPLER, n) for n in STUDENT_STEPS
                                        if n <= student.manifest.distillation.sampling.max_steps]
    images = [to_uint8(runner.decode(runner.sample_latents(labels, ImageNoise([(seed, i) for i in range(count)],
                                                                               runner.device), name, n, guidance)))
              for runner, name, n in rows]
    return torch.cat(images)


def latent_projections(means: torch.Tensor, labels: torch.Tensor, attribute: str, out: Path) -> list[Path]:
    """Scatter plots of PCA and t-SNE projections of ``means [N, C, h, w]`` coloured by ``labels [N]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    flat = means.flatten(1).numpy()
    written = []
    for name, projector in (("pca", PCA(n_components=2, random_state=0)),
                            ("tsne", TSNE(n_components=2, random_state=0, init="pca", perplexity=min(30, len(flat) - 1)))):
        points = projector.fit_transform(flat)
        figure, axes = plt.subplots(figsize=(5, 5))
        for value, colour in ((0, "tab:blue"), (1, "tab:orange")):
            chosen = labels.numpy() == value
            axes.scatter(points[chosen, 0], points[chosen, 1], s=6, c=colour, label=f"{'' if value else 'not '}{attribute}")
        axes.set_title(f"VAE latents ({name.upper()})")
        axes.legend()
        path = out / f"latent_{name}.png"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


@torch.no_grad()
def visualize(checkpoints: Path, version: str, data: Path, out: Path, count: int = 8, sampler: str = "dpmpp",
              steps: int = 20, frames: int = 10, seed: int = 0, projection_images: int = 1000, *,
              edit_strength: float, edit_steps: int, edit_guidance: float) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    model = LatentDiffusion.load(checkpoints, version)
    guidance = model.sampling.guidance_scale
    data_cfg = model.manifest.data
    images, labels = load_split(data, "test", data_cfg, limit=projection_images)
    written: list[Path] = []

    originals = images[:count]
    means, _ = model.vae.encode(to_float(originals))
    recon = to_uint8(model.vae.decode(means).clamp(-1, 1))
    path = out / "reconstruction.png"
    grid_image(torch.cat([originals, recon]), cols=count).save(path)
    written.append(path)

    attribute = model.attributes[0]
    for value in (True, False):
        label = ("" if value else "not_") + attribute.lower()
        trajectory = denoising_trajectory(model, {attribute: value}, seed, count, sampler, steps, guidance, frames)
        path = out / f"samples_{label}.png"
        grid_image(trajectory[-1]).save(path)
        written.append(path)
        path = out / f"denoising_path_{label}.png"  # row r: sample r from noise (left) to image (right)
        grid_image(torch.stack(trajectory, dim=1).flatten(0, 1), cols=len(trajectory)).save(path)
        written.append(path)
        path = out / f"denoising_{label}.gif"
        path.write_bytes(gif_bytes(trajectory, fps=6))
        written.append(path)

    for value in (True, False):
        label = ("" if value else "not_") + attribute.lower()
        inputs = images[labels[:, 0] != int(value)][:count]
        edits = edit_images(model, inputs, {attribute: value}, edit_strength, edit_steps, edit_guidance)
        path = out / f"edits_to_{label}.png"
        grid_image(edit_rows(inputs, edits), cols=3).save(path)
        written.append(path)

    student = served_versions(checkpoints, model.version)[1]
    if student is not None:
        runner = LatentDiffusion.load(checkpoints, student, model.device, model.dtype, share_vae=model)
        path = out / "student_vs_default.png"
        grid_image(student_rows(model, runner, {attribute: True}, seed, count, sampler, steps, guidance),
                   cols=count).save(path)
        written.append(path)

    all_means = torch.cat([model.vae.encode(to_float(chunk))[0] for chunk in images.split(128)])
    written += latent_projections(all_means, labels[:, 0], attribute, out)
    return written
