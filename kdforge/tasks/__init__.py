"""Task settings: what a run trains, one package each; the one Trainer trains them all.

Every package owns what its setting needs beyond labelled single-label classification: its data
(or a split of existing data), its metrics (pure functions), its models or heads and a `Task`
(`kdforge.tasks.base`) that turns them into batches, losses and evaluations for
`kdforge.train.trainer.Trainer`. Multi-stage methods run each stage as an ordinary run directory
(`kdforge.train.stages`). The seed methods of a setting (`kdforge.methods.l2d`, `crkd`, `wad`, ...)
import their package; nothing is imported here, so `import kdforge.tasks` stays cheap.

* `classification.py`: labelled image classification (the core's `RunConfig` runs).
* `multilabel/`: several objects per image, multi-hot targets, mAP, BCE (L2D).
* `ncd/`: known/novel class split, Hungarian clustering accuracy, UNO discovery baseline (CrKD).
* `ssl/`: labelled set plus an unlabelled pool polluted with unknown classes (WAD).
* `selfsup/`: DINO-style self-distillation with an EMA teacher, k-NN / linear-probe evaluation (AdaSim).
* `datafree/`: a teacher trained on data the student never sees, a web pool (KD^3).
* `domain/`: source/target domains with new target classes (OTD).
"""
