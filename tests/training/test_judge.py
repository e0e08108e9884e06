"""The evaluation's attribute judge: degradations as augmentations make it hold its accuracy on soft images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import training.evaluation.judge as judge_module
from facegen.model.config import DataConfig
from training.data.celeba import load_split
from training.data.synthetic import write_dataset
from training.evaluation.judge import (
    NO_AUGMENTATION,
    AttributeClassifier,
    Augmentation,
    JudgePanel,
    blurred,
    degrade,
    gaussian_blur,
    train_classifier,
    train_panel,
)


def test_blur_is_per_image_and_sigma_zero_changes_nothing() -> None:
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = gaussian_blur(x, torch.tensor([0.0, 1.5]))
    assert torch.allclose(out[0], x[0], atol=1e-6)
    assert out[1].std() < 0.8 * x[1].std()  # white noise loses most of its variance to a 1.5 px blur
    assert torch.allclose(out[1].mean(), x[1].mean(), atol=0.05)


def test_degrade_is_seeded_bounded_and_off_at_probability_zero() -> None:
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    a = degrade(x.clone(), Augmentation(), torch.Generator().manual_seed(1))
    b = degrade(x.clone(), Augmentation(), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    assert not torch.allclose(a, x, atol=1e-3)
    assert torch.allclose(degrade(x.clone(), NO_AUGMENTATION, torch.Generator().manual_seed(1)), x, atol=1e-5)


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("faces"), 1600, seed=21, workers=2)


def test_augmented_judge_keeps_its_accuracy_on_blurred_faces_where_a_plain_one_loses_it(faces: Path) -> None:
    config = DataConfig()
    val_images, val_labels = load_split(faces, "val", config)
    accuracy = {}
    for name, augmentation in (("plain", NO_AUGMENTATION), ("augmented", Augmentation())):
        judge, test_images, test_labels = train_classifier(faces, config, steps=600, seed=0, augmentation=augmentation)
        images, truth = torch.cat([test_images, val_images]), torch.cat([test_labels, val_labels])[:, 0]
        accuracy[name] = {sigma: float((judge.predict(blurred(images, sigma) if sigma else images)[:, 0] == truth)
                                       .float().mean()) for sigma in (0, 2.5)}
    assert accuracy["augmented"][0] >= 0.9 and accuracy["plain"][0] >= 0.9  # both learn the smile of sharp faces
    assert accuracy["augmented"][2.5] >= accuracy["augmented"][0] - 0.15
    assert accuracy["augmented"][2.5] >= accuracy["plain"][2.5] + 0.07, accuracy


def test_a_cached_judge_is_read_back_without_training_and_another_seed_trains_anew(
        faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = DataConfig()
    first, test_images, _ = train_classifier(faces, config, steps=5, seed=0, cache=tmp_path)
    assert len(list(tmp_path.glob("judge-*.pt"))) == 1

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached judge was trained again")

    with monkeypatch.context() as patched:
        patched.setattr(judge_module, "_fit", no_training)
        again, _, _ = train_classifier(faces, config, steps=5, seed=0, cache=tmp_path)
    assert torch.equal(again.predict(test_images), first.predict(test_images))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), first.state_dict().values(), strict=True))
    torch.rand(7)  # the global random state moves on: a judge depends on its seed alone
    uncached, _, _ = train_classifier(faces, config, steps=5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(uncached.state_dict().values(), first.state_dict().values(),
                                                 strict=True))
    other, _, _ = train_classifier(faces, config, steps=5, seed=1, cache=tmp_path)
    assert len(list(tmp_path.glob("judge-*.pt"))) == 2
    assert not torch.equal(other.state_dict()["head.2.weight"], first.state_dict()["head.2.weight"])


def test_a_panel_reads_the_mean_probability_of_its_members_and_reports_each_members_rate(faces: Path) -> None:
    config = DataConfig()
    panel, test_images, test_labels = train_panel(faces, config, steps=40, seed=5, size=3)
    assert panel.seeds == [5, 6, 7]
    single, _, _ = train_classifier(faces, config, steps=40, seed=6)  # a member is the judge of its seed
    assert torch.equal(panel.members[1].predict(test_images), single.predict(test_images))

    verdicts = panel.read(test_images)
    members = torch.stack([member.predict(test_images)[:, 0] for member in panel.members])
    assert torch.equal(verdicts.members, members)
    mean = torch.stack([torch.sigmoid(member.logits(test_images)[:, 0]) for member in panel.members]).mean(dim=0)
    assert torch.equal(verdicts.panel, (mean > 0.5).long())
    # young members disagree on some faces, and there the mean probability, not a vote count, decides
    assert bool((members.min(dim=0).values != members.max(dim=0).values).any())

    truth = test_labels[:, 0]
    accuracy = verdicts.rate_of(truth)
    assert accuracy["n"] == len(truth) and accuracy["rate"] == float((verdicts.panel == truth).float().mean())
    assert accuracy["members"] == [float((row == truth).float().mean()) for row in members]
    agreement = panel.read(blurred(test_images)).rate_of(verdicts)  # member by member against its own reading
    blurred_members = torch.stack([member.predict(blurred(test_images))[:, 0] for member in panel.members])
    assert agreement["members"] == [float((b == s).float().mean()) for b, s in zip(blurred_members, members,
                                                                                    strict=True)]
    with pytest.raises(ValueError, match="at least one member"):
        train_panel(faces, config, steps=1, seed=0, size=0)


def test_a_panel_reads_the_attribute_column_it_is_asked_for() -> None:
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(AttributeClassifier(3, 32))
    panel = JudgePanel(members, [0, 1])
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    for column in range(3):
        logits = torch.stack([member.logits(images)[:, column] for member in members])
        verdicts = panel.read(images, column)
        assert torch.equal(verdicts.members, (logits > 0).long())
        assert torch.equal(verdicts.panel, (torch.sigmoid(logits).mean(dim=0) > 0.5).long())
    assert not torch.equal(panel.read(images, 0).members, panel.read(images, 2).members)
