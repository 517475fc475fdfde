"""Task settings beyond labelled single-label classification, one package each.

Every package owns what its setting needs and the classification Trainer lacks: its data (or
a split of existing data), its metric (pure functions), its models or heads and a small
training loop built on `kdforge.tasks.common`. The seed methods that live in such a setting
(`kdforge.methods.l2d`, `crkd`, `wad`, ...) import their package; nothing is imported here, so
`import kdforge.tasks` stays cheap.

* `multilabel/`: several objects per image, multi-hot targets, mAP, BCE (L2D).
* `ncd/`: known/novel class split, Hungarian clustering accuracy, UNO discovery baseline (CrKD).
* `ssl/`: labelled set plus an unlabelled pool polluted with unknown classes (WAD).
"""
