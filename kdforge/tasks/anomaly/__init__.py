"""Unsupervised anomaly detection (issue 14): teacher-student reverse distillation on normal images only.

`data` (seeded procedural textures with injected defects and their pixel masks; a user's MVTec AD
folders), `models` (frozen teacher encoder via FeatureTap, one-class bottleneck, reverse decoder),
`metrics` (anomaly maps, Gaussian smoothing, image / pixel AUROC via scikit-learn) and `task`
(the anomaly Task on the one Trainer). Recipes: `method: rd` (kdforge/methods/rd.py,
configs/anomaly/rd.yaml) and `method: memkd` (kdforge/methods/memkd.py).
"""
