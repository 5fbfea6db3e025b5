"""Named presets: a detector config, its optimiser settings and batch size, stored as YAML here.

``load_preset("thumos14-actionformer")`` or ``load_preset("path/to/mine.yaml")``. Names are
``{dataset}-{arch}``: datasets ``thumos14`` (I3D two-stream features, 2048-d, 30 fps, stride 4,
window 16; 20 classes; training crops of 2304 steps), ``anet`` (ActivityNet-1.3: TSP features,
512-d, every video resized to 192 steps; class-agnostic, labelled afterwards by fusion with a
video classifier) and ``demo`` (the embedded demo: MobileNetV2 features, 1280-d, 15 fps,
stride 4; small); archs ``actionformer``, ``tridet``, ``temporalmaxer``. Values follow each
paper's published config for that data set, with the differences listed in the YAML comments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from tal_models.config import load_yaml
from tal_models.detector import DetectorConfig
from tal_models.training import OptimConfig

PRESETS_DIR = Path(str(resources.files(__name__)))


@dataclass(frozen=True)
class Preset:
    """A detector config with the training settings it was published with."""

    name: str
    description: str = ""
    features: str = ""  # what features the input must be (backbone, dims, sampling)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"Preset.batch_size must be a positive int, got {self.batch_size!r}")


def preset_names() -> list[str]:
    """The presets shipped with the package."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str | Path) -> Preset:
    """A shipped preset by name, or a preset YAML file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESETS_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ValueError(f"unknown preset {str(name_or_path)!r}; shipped presets: {', '.join(preset_names())} (or give a .yaml path)")
    elif not path.exists():
        raise FileNotFoundError(f"preset file {path} does not exist")
    return load_yaml(Preset, path)
