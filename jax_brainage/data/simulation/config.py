"""The simulated cohort's configuration: one frozen dataclass, JSON round-trippable."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jax_brainage.data.anatomy import RESOLUTIONS_MM
from jax_brainage.errors import ConfigError

SEQUENCES = ("T1w", "FLAIR", "swi")


@dataclasses.dataclass(frozen=True)
class CohortConfig:
  """Everything that defines a simulated cohort; a subject is a pure function of (this, index).

  Ages and brain-age shifts in years, lengths in mm, fractions in [0, 1]. Effect sizes are given
  at latent brain age b = `age_max` relative to b = `reference_brain_age` (the young brain that
  ageing masks are measured against); see `jax_brainage.data.simulate` for the model.
  """

  seed: int = 0
  n: int = 200
  resolution_mm: int = 2
  sequences: tuple[str, ...] = SEQUENCES
  # Population.
  age_min: float = 18.0
  age_max: float = 82.0
  p_female: float = 0.5
  # Risk factors: logit P(factor | age, sex) = intercept + per_decade * (age - 50) / 10 + male.
  diabetes_logit: tuple[float, float, float] = (-2.6, 0.55, 0.3)
  hypertension_logit: tuple[float, float, float] = (-0.85, 0.75, 0.3)
  smoking_logit: tuple[float, float, float] = (-1.3, -0.25, 0.3)
  # BMI is log-normal: median = bmi_median + bmi_per_decade * (age - 50) / 10 + bmi_male * male.
  bmi_median: float = 26.0
  bmi_per_decade: float = 0.6
  bmi_male: float = 0.8
  bmi_log_sd: float = 0.15
  # Latent brain age b = a + sum_k beta_k risk_k + N(0, sigma_brain_age).
  beta_diabetes: float = 4.0
  beta_hypertension: float = 2.0
  beta_smoking: float = 1.5
  beta_bmi: float = 0.3  # years per BMI unit above bmi_threshold
  bmi_threshold: float = 25.0
  sigma_brain_age: float = 2.0
  # Ageing, driven by b (sizes at b = age_max; reference_brain_age None means age_min).
  reference_brain_age: float | None = None
  ventricle_expansion_mm: float = 3.5
  cortical_thinning: float = 0.22  # fraction of cortical GM turned to CSF
  frontal_weight: float = 1.5  # frontal cortex thins this many times faster
  frontal_risk_thinning: float = 0.012  # extra frontal GM fraction lost per year of risk shift
  lesion_rate: float = 30.0  # expected number of white-matter lesions
  lesion_onset: float = 30.0  # brain age (years) below which no lesions appear
  lesion_radius_mm: tuple[float, float] = (1.5, 5.0)  # log-uniform radius range
  iron_darkening: float = 0.45  # fractional SWI signal loss in the lentiform nucleus
  # Nuisance, independent of age. Individual anatomy: baseline ventricle size (mm of outward
  # displacement, either sign) and cortical thickness (GM fraction, either sign). Kept at ~1/9 of
  # the lifetime ageing effect (0.4 of 3.5 mm, 0.02 of 0.22): at 1.0 mm / 0.06 (v1 defaults) they
  # matched ~18 years of ageing each and T1w carried the least age information of the three
  # sequences (ridge 10.2 y, histogram features 8.1 y at 4 mm), where the study found T1w the
  # most informative; now T1w histogram features reach 5.9 y, all three sequences 3.7 y.
  ventricle_size_sd_mm: float = 0.4
  cortical_thickness_sd: float = 0.02
  # Head size, log-scale isotropic: mean below 0 because the MNI152 brain is larger than most.
  head_scale_mean: float = -0.04
  head_scale_sd: float = 0.035
  head_scale_male: float = 0.016  # log-scale added for men, subtracted for women
  rotation_sd_deg: float = 3.0
  translation_sd_mm: float = 3.0
  deformation_sd_mm: float = 2.5
  deformation_spacing_mm: float = 24.0
  bias_field_sd: float = 0.08  # log-intensity
  noise_sd: float = 0.03  # relative to white-matter intensity on T1w
  intensity_scale_sd: float = 0.1  # log of the per-scan intensity scale
  # Ground truth: a voxel is "aged" where |image(b) - image(reference)| > this x scan unit.
  mask_threshold: float = 0.05

  def __post_init__(self):
    # Normalise JSON lists to tuples so that configs compare equal after a round trip.
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if isinstance(v, list):
        object.__setattr__(self, f.name, tuple(v))
    self.validate()

  @property
  def brain_age_reference(self) -> float:
    """The young brain age (years) that ageing masks compare with."""
    return self.age_min if self.reference_brain_age is None else float(self.reference_brain_age)

  def validate(self) -> None:
    """Raises ConfigError naming the first bad key."""
    if not isinstance(self.seed, int) or self.seed < 0:
      raise ConfigError(f"seed={self.seed!r} must be a non-negative integer")
    if not isinstance(self.n, int) or self.n < 1:
      raise ConfigError(f"n={self.n!r} must be a positive integer")
    if self.resolution_mm not in RESOLUTIONS_MM:
      raise ConfigError(f"resolution_mm={self.resolution_mm!r} must be one of 1, 2, 3, 4")
    if not self.sequences:
      raise ConfigError("sequences is empty; choose from " + ", ".join(SEQUENCES))
    for s in self.sequences:
      if s not in SEQUENCES:
        raise ConfigError(f"unknown sequence {s!r}; choose from {', '.join(SEQUENCES)}")
    if len(set(self.sequences)) != len(self.sequences):
      raise ConfigError(f"sequences {','.join(self.sequences)} lists a sequence twice")
    if not (math.isfinite(self.age_min) and math.isfinite(self.age_max)) or not (
        0 <= self.age_min < self.age_max
    ):
      raise ConfigError(f"age range [{self.age_min}, {self.age_max}] must satisfy 0 <= min < max")
    if not 0 <= self.p_female <= 1:
      raise ConfigError(f"p_female={self.p_female} must lie in [0, 1]")
    for key in ("sigma_brain_age", "bmi_log_sd"):
      if not getattr(self, key) > 0:
        raise ConfigError(f"{key}={getattr(self, key)} must be positive")
    lo, hi = self.lesion_radius_mm
    if not 0 < lo <= hi:
      raise ConfigError(f"lesion_radius_mm={self.lesion_radius_mm} must satisfy 0 < min <= max")
    if not 0 <= self.cortical_thinning * self.frontal_weight < 1:
      raise ConfigError("cortical_thinning x frontal_weight must lie in [0, 1)")
    if not 0 <= self.iron_darkening < 1:
      raise ConfigError(f"iron_darkening={self.iron_darkening} must lie in [0, 1)")
    if self.ventricle_expansion_mm < 0 or self.lesion_rate < 0 or self.mask_threshold <= 0:
      raise ConfigError("ventricle_expansion_mm, lesion_rate >= 0 and mask_threshold > 0 required")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> CohortConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f"unknown cohort config key {unknown[0]!r}")
    return cls(**d)

  def replace(self, **changes: Any) -> CohortConfig:
    return dataclasses.replace(self, **changes)
