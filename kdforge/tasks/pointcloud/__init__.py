"""Point clouds, cameras and bird's-eye-view 3D perception on the one Trainer.

* `scenes`: procedural LiDAR scenes from one `SceneSpec` (ground, categories, clutter poles,
  oriented boxes, per-point semantic labels); `sequences`: short sequences of them with parked and
  moving objects, and `autolabel` boxes from their motion; `kitti`: a user's KITTI-style `.bin` /
  label / calib files (one-line errors).
* `cameras`: pinhole multi-camera RGB / depth / label renderings of the same scenes (ray cast) and
  the points each camera sees; `geometry`: projection / unprojection (kornia), voxelisation with
  its inverse map.
* `iou` (rotated BEV / 3D IoU via shapely), `metrics` (KITTI R40 BEV / 3D AP), `clusters`
  (super-voxels, cosine k-means, Hungarian-matched mIoU via scipy).
* `models` (pillar BEV detector with CenterPoint heads, teacher and student sizes), `camera_bev`
  (a Lift-Splat multi-camera detector on the same grid and heads), `segmentation` (a point-wise
  network with voxel / pillar context).
* `task`: the BEV detection Task, its module and the recipe runner methods share.

Methods on it (kdforge/methods/): rdd (teacher -> compact LiDAR detector), distillbev (LiDAR
teacher -> camera student), pointdc (unsupervised 2D -> 3D distillation and super-voxel
clustering), upvl (motion + 2D vision-language auto-labels). Needs the `pointcloud` extra (kornia,
shapely).
"""
