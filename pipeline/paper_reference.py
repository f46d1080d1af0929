"""Published numbers of Gowal et al. (2021), shown beside ours in the table's markdown and figure.

THESE ARE THE PAPER'S RESULTS, NOT OURS: they are never written into results/{dataset}_table.csv and
every rendering labels them "paper". Kept deliberately small: only values checked against a written
source are listed, each with that source; a value we could not check is None (not drawn), never a
guess. Accuracies are fractions, AutoAttack (standard) on the full 10,000-image test set.

Sources:
- ABSTRACT: Gowal, Rebuffi, Wiles, Stimberg, Calian, Mann. "Improving Robustness using Generated
  Data", NeurIPS 2021, arXiv:2110.09468, abstract: "66.10% and 33.49% robust accuracy on CIFAR-10 and
  CIFAR-100 [Linf 8/255] ... 78.31% on CIFAR-10 [L2 128/255]".
- RELEASE: the model-release table for Gowal et al. (2021) in the README of
  github.com/deepmind/deepmind-research/tree/master/adversarial_robustness (read from a mirror), which
  names each released checkpoint (e.g. cifar10_linf_wrn70-16_cutmix_ddpm_100m.pt) with its clean and
  AutoAttack accuracy. Its WRN-28-10 row is labelled "WRN-70-16" but links cifar10_linf_wrn28-10_ddpm_100m;
  we follow the file name. Released checkpoints may differ slightly from the paper's tables (66.11 vs
  66.10 for the WRN-70-16).
- REBUFFI: the same README's table of Rebuffi et al. (2021, "Data Augmentation Can Improve Robustness",
  the companion paper on the same code), whose CIFAR-10 models train on the 1M DDPM samples with CutMix,
  e.g. cifar10_linf_wrn28-10_cutmix_ddpm_v2: the published setting nearest the paper preset (1M images).

A published number is comparable to one of ours only when the architecture, the threat the model was
trained against, the threat it is evaluated under, the generator, CutMix and the number of images the
generator sampled all match (`PaperResult.comparable`): the L2 78.31% is an L2-trained model, not a
Linf-trained one evaluated under L2; the 100M rows are not what a 1M run should reach; Rebuffi et al.'s
1M row is DDPM samples with CutMix, not a Gaussian or EDM run without it. The count compared is what
the generator sampled (`generate.n_images`), before our class-balancing selection keeps slightly fewer.
"""

from __future__ import annotations

from dataclasses import dataclass

CITATION = "Gowal et al. 2021 (NeurIPS), arXiv:2110.09468"
ABSTRACT = "paper abstract"
RELEASE = "released checkpoint, deepmind-research adversarial_robustness README"
REBUFFI = "Rebuffi et al. 2021 released checkpoint, deepmind-research adversarial_robustness README"


@dataclass(frozen=True)
class PaperResult:
    """One published result; `model` uses the paper's architecture name, not our registry's."""
    dataset: str
    threat: str                   # linf or l2
    eps_255: float                # radius in 1/255 units
    model: str
    generator: str                # the paper's generator, as our registry names it (ddpm: DDPM samples)
    n_generated: int | None       # images the generator sampled; None where the source does not say
    clean_acc: float | None       # None: not checked, not shown
    autoattack_acc: float
    source: str
    note: str = ""
    train_threat: str | None = None   # the threat the model was trained against (None: the same as `threat`)
    cutmix: bool = False              # trained with CutMix (the released checkpoint's name says so)

    @property
    def trained_under(self) -> str:
        return self.train_threat or self.threat

    @property
    def label(self) -> str:
        data = f"{self.n_generated // 1_000_000}M " if self.n_generated else ""
        return f"paper: {self.model}, {data}{self.data}, trained {self.trained_under}"

    @property
    def data(self) -> str:
        return self.generator.upper() + (" + CutMix" if self.cutmix else "")

    def comparable(self, model: str, train_threat: str, threat: str, generator: str, n_sampled: int,
                   cutmix: bool) -> bool:
        """Whether one of our rows (registry model and generator names, e.g. wrn-28-10, ddpm) measures the
        same setting; `n_sampled`: the images our generator sampled, before any selection."""
        return (self.model.lower() == model.lower() and self.trained_under == train_threat
                and self.threat == threat and self.generator == generator and self.n_generated == n_sampled
                and self.cutmix == cutmix)


REFERENCES: tuple[PaperResult, ...] = (
    PaperResult("cifar10", "linf", 8, "WRN-70-16", "ddpm", 100_000_000, 0.8874, 0.6610, ABSTRACT,
                "AutoAttack 66.10 from the abstract; clean 88.74 from the released checkpoint "
                "cifar10_linf_wrn70-16_cutmix_ddpm_100m (AutoAttack 66.11 there; trained with CutMix)", cutmix=True),
    PaperResult("cifar10", "linf", 8, "WRN-28-10", "ddpm", 100_000_000, 0.8750, 0.6344, RELEASE,
                "released checkpoint cifar10_linf_wrn28-10_ddpm_100m"),
    PaperResult("cifar10", "linf", 8, "ResNet-18", "ddpm", 100_000_000, 0.8735, 0.5863, RELEASE,
                "released checkpoint cifar10_linf_resnet18_ddpm_100m"),
    PaperResult("cifar10", "linf", 8, "WRN-28-10", "ddpm", 1_000_000, 0.8733, 0.6075, REBUFFI,
                "released checkpoint cifar10_linf_wrn28-10_cutmix_ddpm_v2 (1M DDPM samples, CutMix)", cutmix=True),
    PaperResult("cifar10", "l2", 128, "WRN-70-16", "ddpm", None, None, 0.7831, ABSTRACT,
                "an L2-trained model; clean accuracy not checked, so not shown", train_threat="l2"),
    PaperResult("cifar100", "linf", 8, "WRN-70-16", "ddpm", None, None, 0.3349, ABSTRACT,
                "clean accuracy not checked, so not shown"),
)


def matching(dataset: str, threat: str | None = None, eps_255: float | None = None) -> list[PaperResult]:
    """The paper's results for this data set (and threat model and radius, when given)."""
    return [ref for ref in REFERENCES if ref.dataset == dataset
            and (threat is None or ref.threat == threat)
            and (eps_255 is None or abs(ref.eps_255 - eps_255) < 1e-9)]
