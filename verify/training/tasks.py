"""The two training stages as tasks: everything `fit` does differently for them lives here.

Stage 1 (`task: attributes`) learns CelebA's 40 attributes with BCE-with-logits; stage 2
(`task: identity`) learns an L2-normalised embedding from P x K batches with an online-mined triplet
loss (plus optional CosFace identity classification, auxiliary attributes and a teacher to distil).
A task supplies the module to train, its batches, its evaluation, how the best epoch is chosen, its
log line and curves, and what happens after the last epoch.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from verify.model.backbones import Backbone, backbone_from_config
from verify.data.celeba import ATTRIBUTES
from verify.config import TrainConfig
from verify.training.losses import CosFaceLoss, TripletMarginLoss, cosine_distill_loss, relational_distill_loss
from verify.training.miners import BatchHardMiner, SemiHardMiner
from verify.training.samplers import PKSampler
from verify.training.checkpoint import load_backbone_init
from verify.training.data import FaceData, Splits
from verify.training.dist import Dist
from verify.training.distill import TeacherTargets, prepare_teacher
from verify.training.evaluation import evaluate_attributes, evaluate_identity_configured
from verify.training.export import export_identity_model

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# modules: the network plus the losses that own parameters, so DDP sees every trainable tensor


class IdentityModule(nn.Module):
    """Embedding network plus the losses that own parameters, so DDP sees every trainable tensor."""

    def __init__(self, net: Backbone, num_classes: int, cfg: TrainConfig) -> None:
        super().__init__()
        ic = cfg.identity
        self.net = net
        self.cls = CosFaceLoss(cfg.model.embedding_dim, num_classes, ic.cls_scale, ic.cls_margin) if ic.cls_weight > 0 else None
        self.attr = nn.Linear(net.num_features, len(ATTRIBUTES)) if ic.aux_attr_weight > 0 else None
        if ic.miner == "batch-hard":
            self.miner = BatchHardMiner()
        elif ic.miner == "semi-hard":
            self.miner = SemiHardMiner(ic.margin)
        else:
            raise ValueError(f"unknown miner {ic.miner!r}: batch-hard | semi-hard")
        self.triplet = TripletMarginLoss(ic.margin, reduction="mean")
        self.ic = ic

    def forward(self, x: torch.Tensor, labels: torch.Tensor, attrs: torch.Tensor | None = None,
                teacher: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """`teacher`: (B, D) unit teacher vectors of the same augmented images, or None."""
        feats = self.net.forward_features(x)  # (B, F)
        emb = self.net.forward_head(feats)  # (B, D), unit norm
        loss = emb.new_zeros((), dtype=torch.float32)
        logs: dict = {}
        # Unlabelled faces (label -1) are in the batch for the teacher only: the identity losses see the rest.
        labelled = labels >= 0  # (B,)
        emb_id, labels_id = (emb, labels) if bool(labelled.all()) else (emb[labelled], labels[labelled])
        if self.ic.triplet_weight > 0:
            a, p, n = self.miner(emb_id.detach().float(), labels_id)
            tl = self.triplet(emb_id.float(), a, p, n)
            loss = loss + self.ic.triplet_weight * tl
            logs.update(triplet=tl.detach(), active=torch.tensor(self.triplet.last_active_fraction))
        if teacher is not None:
            dl = cosine_distill_loss(emb.float(), teacher)
            loss = loss + self.ic.distill_weight * dl
            logs["distill"] = dl.detach()
            if self.ic.distill_rel_weight > 0:
                rl = relational_distill_loss(emb.float(), teacher)
                loss = loss + self.ic.distill_rel_weight * rl
                logs["relational"] = rl.detach()
        if self.cls is not None:
            cl = self.cls(emb_id.float(), labels_id)
            loss = loss + self.ic.cls_weight * cl
            logs["cls"] = cl.detach()
        if self.attr is not None and attrs is not None:
            al = F.binary_cross_entropy_with_logits(self.attr(feats).float(), attrs.float())
            loss = loss + self.ic.aux_attr_weight * al
            logs["attr"] = al.detach()
        return loss, logs


class AttributeModule(nn.Module):
    def __init__(self, net: Backbone, pos_weight: torch.Tensor | None) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else torch.ones(len(ATTRIBUTES)))

    def forward(self, x: torch.Tensor, targets: torch.Tensor, attrs: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict]:
        logits = self.net(x)  # (B, 40)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=self.pos_weight)
        return loss, {}


# --------------------------------------------------------------------------------------------------
# tasks


class Task(abc.ABC):
    """One training stage, built from the config and the data. After construction:

    `net` (the backbone that is evaluated and exported), `module` (what the optimiser trains: `net`
    plus the losses that own parameters), `labels` (per table row: what the module's second argument is
    drawn from), `attrs` (per table row auxiliary attribute targets, or None), `teacher` (stored teacher
    vectors, or None), `batches_per_epoch`, and `provenance` (what the model file should record).
    """

    name: ClassVar[str]
    select_key: ClassVar[str]  # the validation metric that picks the best epoch
    higher_is_better: ClassVar[bool] = True

    net: Backbone
    module: nn.Module
    labels: np.ndarray
    batches_per_epoch: int

    def __init__(self, cfg: TrainConfig, data: FaceData, splits: Splits, dist: Dist, device: torch.device, *,
                 resume: bool = False, progress: bool = True) -> None:
        self.cfg, self.data, self.splits, self.dist, self.device = cfg, data, splits, dist, device
        self.attrs: np.ndarray | None = None
        self.teacher: TeacherTargets | None = None
        self.provenance: dict = {}
        self.build(resume=resume, progress=progress)

    @abc.abstractmethod
    def build(self, *, resume: bool, progress: bool) -> None:
        """Set `net`, `module`, `labels`, `batches_per_epoch` (and `attrs`, `teacher`, `provenance`).
        With `resume` the weights come from the checkpoint afterwards."""

    @abc.abstractmethod
    def batches(self, epoch: int) -> Iterable[np.ndarray]:
        """This rank's batches of table rows for `epoch` (the same for the same epoch: resume replays it)."""

    @abc.abstractmethod
    def evaluate(self, net: nn.Module, rows: np.ndarray) -> dict:
        """Metrics of `net` on table rows `rows` (a held-out partition)."""

    @abc.abstractmethod
    def log_epoch(self, entry: dict) -> None:
        """One log line for a finished epoch's history entry."""

    @abc.abstractmethod
    def draw_metrics(self, ax: "Axes", history: list[dict]) -> None:
        """The evaluation curves of curves.png (right panel)."""

    def improves(self, val: dict, best_val: dict) -> bool:
        """Whether validation metrics `val` beat the best epoch's `best_val`."""
        new, old = val[self.select_key], best_val[self.select_key]
        return new > old if self.higher_is_better else new < old

    def finish(self, run: Path, provenance: dict) -> None:
        """After the last epoch, on the main rank only."""


class AttributeTask(Task):
    """Stage 1: the 40 CelebA attributes, BCE-with-logits (optionally weighted by class balance)."""

    name = "attributes"
    select_key = "mean_accuracy"

    def build(self, *, resume: bool, progress: bool) -> None:
        cfg, train = self.cfg, self.splits.train
        attrs = self.data.attributes()  # (N, 40)
        if attrs is None:
            raise ValueError("task attributes needs attribute annotations in the data roots")
        self.net = backbone_from_config(cfg.model, cfg.data.size, head="attributes", out_dim=len(ATTRIBUTES))
        pos_weight = None
        if cfg.attributes.pos_weight:
            pos = attrs[train].mean(0).clip(1e-3, 1 - 1e-3)
            pos_weight = torch.tensor((1 - pos) / pos, dtype=torch.float32)
        self.module = AttributeModule(self.net, pos_weight)
        self.labels = attrs
        self.batches_per_epoch = cfg.optim.batches_per_epoch or (len(train) // self.dist.world) // cfg.optim.batch_size

    def batches(self, epoch: int) -> Iterable[np.ndarray]:
        return iter(attribute_batches(self.splits.train, self.cfg.optim.batch_size, self.cfg.seed, epoch, self.dist,
                                      self.cfg.optim.batches_per_epoch))

    def evaluate(self, net: nn.Module, rows: np.ndarray) -> dict:
        return evaluate_attributes(net, self.data, rows, self.splits.train, self.device)

    def log_epoch(self, entry: dict) -> None:
        tr = entry["train"]
        log.info(
            "epoch %d: loss %.4f, %.0f img/s | val mean acc %.4f | test mean acc %.4f (majority baseline %.4f)",
            entry["epoch"], tr["loss"], tr["images_per_s"], entry["val"]["mean_accuracy"],
            entry["test"]["mean_accuracy"], entry["test"]["best_constant_mean_accuracy"],
        )

    def draw_metrics(self, ax: "Axes", history: list[dict]) -> None:
        ep = [h["epoch"] for h in history]
        for split in ("val", "test"):
            ax.plot(ep, [h[split]["mean_accuracy"] for h in history], "o-", label=f"{split} mean accuracy")
        ax.plot(ep, [h["test"]["best_constant_mean_accuracy"] for h in history], "--", label="test majority baseline")
        ax.set_title("attribute accuracy")


class IdentityTask(Task):
    """Stage 2: an embedding from P x K batches; the run ends by exporting a calibrated model file."""

    name = "identity"
    select_key = "auc"

    def build(self, *, resume: bool, progress: bool) -> None:
        cfg, data, splits, dist = self.cfg, self.data, self.splits, self.dist
        ic = cfg.identity
        self.net = backbone_from_config(cfg.model, cfg.data.size, head="embedding", out_dim=cfg.model.embedding_dim)
        if ic.init:
            if resume:  # the checkpoint's weights replace the init; only record where it came from
                self.provenance["init"] = str(ic.init)
            else:
                self.provenance.update(load_backbone_init(ic.init, self.net))
        if ic.freeze_stages:
            self.net.freeze_stages(ic.freeze_stages)
        self.labels, num_classes = dense_labels(data.table["identity"].to_numpy(), splits.train)
        self.module = IdentityModule(self.net, num_classes, cfg)
        if ic.aux_attr_weight > 0:
            self.attrs = data.attributes()
            if self.attrs is None:
                raise ValueError("identity.aux_attr_weight > 0 needs attribute annotations in the data roots")
        self.sampler = PKSampler(
            self.labels[splits.train], ic.p, ic.k, batches_per_epoch=cfg.optim.batches_per_epoch,
            replacement=ic.replacement, min_images=cfg.data.min_images_per_identity, seed=cfg.seed,
            rank=dist.rank, world_size=dist.world,
        )
        self.batches_per_epoch = len(self.sampler)
        self.unlabelled = data.unlabelled_rows()
        if ic.unlabelled_per_batch > 0 and (not ic.teacher or len(self.unlabelled) == 0):
            raise ValueError("identity.unlabelled_per_batch > 0 needs identity.teacher and data.unlabelled_roots")
        if len(self.unlabelled) and ic.unlabelled_per_batch == 0:
            log.warning("%d unlabelled images are loaded but identity.unlabelled_per_batch is 0: unused",
                        len(self.unlabelled))
        if ic.unlabelled_per_batch > 0 and ic.aux_attr_weight > 0:
            raise ValueError("identity.aux_attr_weight needs attributes, which unlabelled images lack")
        if ic.teacher:
            rows = self._drawable_rows(num_classes)
            if ic.unlabelled_per_batch > 0:
                rows = np.concatenate([rows, self.unlabelled])
            self.teacher = prepare_teacher(cfg, data, rows, self.device, dist, progress)
            self.provenance["teacher"] = {"model": str(ic.teacher), "fingerprint": self.teacher.teacher,
                                          "views": self.teacher.views, "centred": self.teacher.center}

    def _drawable_rows(self, num_classes: int) -> np.ndarray:
        """Training rows the sampler can draw (identities with enough images): only they need teacher vectors."""
        train = self.splits.train
        counts = np.bincount(self.labels[train], minlength=num_classes)
        return train[counts[self.labels[train]] >= max(1, self.cfg.data.min_images_per_identity)]

    def batches(self, epoch: int) -> Iterable[np.ndarray]:
        self.sampler.set_epoch(epoch)  # now, not when the first batch is drawn
        train = np.asarray(self.splits.train)
        u = self.cfg.identity.unlabelled_per_batch
        if u == 0:
            return (train[np.asarray(b)] for b in self.sampler)
        extra = unlabelled_batches(self.unlabelled, u, self.batches_per_epoch, self.cfg.seed, epoch, self.dist.rank)
        return (np.concatenate([train[np.asarray(b)], e]) for b, e in zip(self.sampler, extra))

    def evaluate(self, net: nn.Module, rows: np.ndarray) -> dict:
        cap = self.cfg.identity.eval_max_images
        if cap and len(rows) > cap:  # the same identities every epoch: the curve compares like with like
            rows = identity_subset(rows, self.data.table["identity"].to_numpy(), cap, self.cfg.seed)
        return evaluate_identity_configured(self.cfg, net, self.data, rows, self.device)

    def log_epoch(self, entry: dict) -> None:
        tr, val, test = entry["train"], entry["val"], entry["test"]
        log.info(
            "epoch %d: loss %.4f (active triplets %.2f, distill %.4f), %.0f img/s | val AUC %.4f acc %.4f | "
            "test AUC %.4f acc %.4f",
            entry["epoch"], tr["loss"], tr.get("active", float("nan")), tr.get("distill", float("nan")),
            tr["images_per_s"], val["auc"], val["accuracy"], test["auc"], test["accuracy"],
        )

    def draw_metrics(self, ax: "Axes", history: list[dict]) -> None:
        ep = [h["epoch"] for h in history]
        for split in ("val", "test"):
            ax.plot(ep, [h[split]["auc"] for h in history], "o-", label=f"{split} ROC AUC")
            ax.plot(ep, [h[split]["accuracy"] for h in history], "s--", label=f"{split} pair accuracy")
        ax.set_title("verification on held-out identities")

    def finish(self, run: Path, provenance: dict) -> None:
        export_identity_model(run, self.cfg, self.data, self.device, provenance)


TASKS: dict[str, type[Task]] = {t.name: t for t in (AttributeTask, IdentityTask)}


def task_class(name: str) -> type[Task]:
    """The task called `name` (config key `task`)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}: {' | '.join(TASKS)}") from None


def make_task(cfg: TrainConfig, data: FaceData, splits: Splits, dist: Dist, device: torch.device, *,
              resume: bool = False, progress: bool = True) -> Task:
    """Build `cfg.task`'s network, module, batches and (for identity with a teacher) teacher targets."""
    return task_class(cfg.task)(cfg, data, splits, dist, device, resume=resume, progress=progress)


# --------------------------------------------------------------------------------------------------
# batches and labels


def attribute_batches(rows: np.ndarray, batch_size: int, seed: int, epoch: int, dist: Dist,
                      limit: int | None) -> list[np.ndarray]:
    """A seeded shuffle of `rows` per epoch, cut into full batches; each rank gets an equal share."""
    perm = np.random.default_rng([seed, epoch]).permutation(rows)
    per_rank = len(perm) // dist.world
    mine = perm[dist.rank * per_rank : (dist.rank + 1) * per_rank]  # equal share on every rank
    batches = [np.sort(mine[i : i + batch_size]) for i in range(0, len(mine) - batch_size + 1, batch_size)]
    return batches[:limit] if limit else batches


def identity_subset(rows: np.ndarray, identities: np.ndarray, max_images: int, seed: int) -> np.ndarray:
    """Whole identities of `rows`, in a seeded order, until about `max_images` images (sorted rows)."""
    ids = identities[rows]
    order = np.random.default_rng([seed, 2]).permutation(np.unique(ids))
    keep, n = [], 0
    for ident in order:
        if n >= max_images:
            break
        keep.append(ident)
        n += int((ids == ident).sum())
    return np.sort(rows[np.isin(ids, keep)])


def unlabelled_batches(rows: np.ndarray, per_batch: int, n_batches: int, seed: int, epoch: int, rank: int
                       ) -> list[np.ndarray]:
    """`n_batches` blocks of `per_batch` of `rows`: a seeded shuffle per (epoch, rank), continued into
    the next shuffle when the epoch needs more than one pass."""
    rng = np.random.default_rng([seed, epoch, rank, 1])
    need = per_batch * n_batches
    order = np.concatenate([rng.permutation(rows) for _ in range(-(-need // max(1, len(rows))))])
    return [order[i * per_batch : (i + 1) * per_batch] for i in range(n_batches)]


def dense_labels(ids: np.ndarray, train_rows: np.ndarray) -> tuple[np.ndarray, int]:
    """(N,) int64 class ids 0..C-1 over the training identities (CosFace needs them dense), -1 for the
    others, and C."""
    uniq = np.unique(ids[train_rows])
    lut = {int(v): i for i, v in enumerate(uniq)}
    return np.array([lut.get(int(v), -1) for v in ids], dtype=np.int64), len(uniq)
