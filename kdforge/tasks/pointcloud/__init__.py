"""Point clouds and bird's-eye-view 3D detection on the one Trainer.

`scenes` (procedural LiDAR scenes from one `SceneSpec`: ground, categories, clutter, oriented boxes,
per-point semantic labels), `kitti` (a user's KITTI-style `.bin` / label / calib files, one-line
errors), `geometry` (pinhole projection / unprojection via kornia, voxelisation with its inverse
map), `cameras` (pinhole multi-camera RGB / depth / label renderings of the same scenes and
the points each camera sees), `iou` (rotated BEV / 3D IoU via shapely), `metrics` (KITTI R40 BEV / 3D AP), `models` (pillar
BEV detector with CenterPoint heads, teacher and student sizes) and `task` (the Task, its module,
the recipe runner methods share). Methods on it: rdd (kdforge/methods/rdd.py). Needs the
`pointcloud` extra (kornia, shapely).
"""
