"""Run configuration: frozen dataclasses are the schema, YAML files in configs/ hold the values,
CLI flags override, unknown keys are errors. The resolved config is saved in every run folder and
checkpoint (`to_dict`)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from verify.atomic import atomic_write_text


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class DataConfig:
    roots: tuple[str, ...] = ("../shared/data/celeba",)
    size: int = 112  # crop size in pixels (CropGeometry.size)
    box: tuple[float, float, float, float] = (25.0, 59.0, 153.0, 187.0)  # in the 178x218 frame
    max_images: int | None = None
    cache_dir: str = ".cache/faceverify"
    cache_workers: int = 2
    min_images_per_identity: int = 2  # stage 2: identities with fewer images are skipped
    # Folders of faces aligned to the CelebA frame without identity labels (scripts/prepare_faces.py):
    # stage 2 draws `identity.unlabelled_per_batch` of them into each batch, for distillation only.
    unlabelled_roots: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet"  # seed-cnn | resnet | inception-resnet-v1
    width: int = 32  # resnet: channels of the first stage
    layers: tuple[int, ...] = (1, 2, 2, 1)  # resnet: blocks per stage
    feature_dim: int = 256  # resnet: pooled feature size
    embedding_dim: int = 128
    dropout: float = 0.0
    pretrained: str | None = None  # inception-resnet-v1 only: vggface2 | casia-webface (needs internet)


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    grad_clip: float = 5.0
    amp: bool = True  # only used on CUDA
    batches_per_epoch: int | None = None  # None: one pass over the training images
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off); evaluated and exported


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = True
    rotation: float = 10.0  # degrees, +-
    zoom: float = 0.1
    shift: float = 0.05
    color: float = 0.1  # brightness/contrast jitter


@dataclass(frozen=True)
class AttributeConfig:
    pos_weight: bool = False  # per-attribute pos_weight = neg/pos on the training split


@dataclass(frozen=True)
class IdentityConfig:
    p: int = 32
    k: int = 4
    replacement: bool = True  # identities with < K images: draw K with replacement
    miner: str = "batch-hard"  # batch-hard | semi-hard
    margin: float = 0.2
    cls_weight: float = 1.0  # CosFace identity-classification loss beside the triplet loss (0: off)
    cls_scale: float = 30.0
    cls_margin: float = 0.35
    aux_attr_weight: float = 0.0  # auxiliary attribute loss (needs attribute labels)
    freeze_stages: int = 0  # freeze the first N backbone stages (the original transfer plan)
    init: str | None = None  # stage-1 run folder or checkpoint
    val_pairs: int = 3000  # genuine and as many impostor pairs from partition-1 identities
    eval_max_images: int | None = None  # per-epoch evaluation on a seeded subset of whole identities (None: all)
    target_far: float = 1e-3
    tta_flip: bool = True  # embedding = normalise(f(x) + f(flip(x)))
    triplet_weight: float = 1.0  # 0: no triplet term (e.g. teacher only)
    teacher: str | None = None  # a faceverify model file (e.g. `faceverify model import-dlib`) to distil from
    teacher_views: int = 4  # augmented views per training image embedded once by the teacher (view 0: as is)
    teacher_center: bool = True  # subtract the mean teacher vector before it teaches (dlib's sit in a cone)
    distill_weight: float = 1.0  # 1 - cos(student, teacher) per image
    distill_rel_weight: float = 0.0  # squared difference of the batch's similarity matrices
    unlabelled_per_batch: int = 0  # faces of data.unlabelled_roots added to each P x K batch (teacher only)


@dataclass(frozen=True)
class TrainConfig:
    task: str = "attributes"  # attributes | identity
    seed: int = 0
    device: str = "auto"
    out: str = "runs/attributes"
    num_threads: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    attributes: AttributeConfig = field(default_factory=AttributeConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(x: Any) -> Any:
    """Tuples -> lists so that YAML/JSON/torch weights_only round-trip cleanly."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        elem = args[0] if args else str
        return tuple(_coerce(elem, v, where) for v in value)
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    return value


def build(cls: type, values: Mapping[str, Any], where: str = "config") -> Any:
    """Build a frozen dataclass from a mapping; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """YAML file (optional) + dotted overrides (`optim.epochs=3`) -> TrainConfig."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        tree = loaded
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    return build(TrainConfig, tree, where=str(path) if path else "config")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["optim.lr=1e-3", "model.backbone=seed-cnn"]` -> dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def save_config(cfg: TrainConfig, path: str | Path) -> None:

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
