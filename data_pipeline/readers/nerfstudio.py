"""DL3DV / nerfstudio reader: ``transforms.json`` + an image folder.

Source convention (nerfstudio data format, as written by ``ns-process-data`` and shipped by DL3DV):
  * intrinsics ``fl_x fl_y cx cy w h`` (pixels of the full-resolution images of size w x h), given at
    the top level and/or per frame (per-frame values win); ``camera_angle_x`` (Blender / instant-ngp)
    is accepted when ``fl_x`` is absent: fl_x = 0.5 * w / tan(camera_angle_x / 2), fl_y = fl_x;
    ``w``/``h`` default to the size of the images actually read;
  * ``frames[i].file_path`` relative to the json's folder; ``frames[i].transform_matrix`` 4x4 (or 3x4)
    camera-to-world in **OpenGL/Blender camera axes** (x right, y up, z backward);
  * optional ``k1 k2 p1 p2`` distortion: not applied (recorded as ``distortion`` [T,4]);
    fisheye / equirectangular ``camera_model`` values are rejected (a pinhole K would be wrong).
Conversion:
  c2w_cv = c2w_gl @ diag(1, -1, -1, 1) (flip the camera y and z axes; the world frame is kept).
  K is rescaled to the images read: sx = W_img / w, sy = H_img / h; fx*=sx, cx*=sx, fy*=sy, cy*=sy.
  Frames are ordered by file name (natural order: digit runs compare as numbers).
  ``fps`` is the json's ``fps`` if present, else the nominal 30 (nerfstudio scenes carry no frame rate).
Image folder rule (``desc["images"]``): None reads ``file_path`` as written; a folder name such as
``"images_4"`` replaces the first directory component of every ``file_path`` (``images/f_001.png`` ->
``images_4/f_001.png``; a bare file name is put inside the folder). ``find_inputs`` picks None when the
first frame's file exists as written, else the first existing ``<dir>_2``, ``<dir>_4``, ``<dir>_8``.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
from PIL import Image

from decmem.data_pipeline.clip import validate_clip
from decmem.data_pipeline.readers._common import (
    intrinsics,
    make_id,
    natural_key,
    rotation_problem,
    unique_ids,
    walk_files,
)

SOURCE = "nerfstudio"
DEFAULT_FPS = 30.0
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])                   # flips camera y (up->down) and z (back->forward)
DOWNSCALES = (2, 4, 8)
REJECTED_MODELS = ("OPENCV_FISHEYE", "FISHEYE", "EQUIRECTANGULAR")


def _load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: transforms.json not found")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot parse JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list) or not meta["frames"]:
        raise ValueError(f"{path}: key 'frames' expected a non-empty list of frames")
    return meta


def _image_path(scene: str, file_path: str, images: str | None) -> str:
    rel = os.path.normpath(file_path)                          # also drops a leading "./"
    if images:
        parts = rel.split(os.sep)
        rel = os.path.join(images, *parts[1:]) if len(parts) > 1 else os.path.join(images, rel)
    return os.path.join(scene, rel)


def _pick_images(scene: str, meta: dict) -> str | None:
    """None if the first frame exists as written, else the first downscaled folder holding it."""
    fp = str(meta["frames"][0].get("file_path", ""))
    if os.path.isfile(_image_path(scene, fp, None)):
        return None
    parts = os.path.normpath(fp).split(os.sep)
    first_dir = parts[0] if len(parts) > 1 else "images"
    for n in DOWNSCALES:
        cand = f"{first_dir}_{n}"
        if os.path.isfile(_image_path(scene, fp, cand)):
            return cand
    return None


def find_inputs(root: str) -> list[dict]:
    """Every directory under ``root`` holding transforms.json: [{"id", "transforms", "images"}], sorted by id."""
    out = []
    for js in walk_files(root, "transforms.json"):
        if os.path.basename(js) != "transforms.json":
            continue
        scene = os.path.dirname(js)
        try:
            images = _pick_images(scene, _load_json(js))
        except (ValueError, FileNotFoundError, AttributeError, TypeError):
            images = None                                    # read() reports the problem with its location
        out.append({"id": make_id(root, scene), "transforms": js, "images": images})
    return unique_ids(out, "transforms")


def _num(frame: dict, meta: dict, key: str, where: str, default=None) -> float | None:
    v = frame.get(key, meta.get(key, default))
    if v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: key {key!r} expected a number, got {v!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{where}: key {key!r} expected a finite number, got {v!r}")
    return x


def _read_image(path: str, where: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image not found (referenced by {where})")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))             # [H, W, 3] uint8; alpha is dropped
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot decode image referenced by {where} ({e})") from e


def read(desc: dict) -> dict:
    """Read one scene described by ``find_inputs`` -> validated canonical clip."""
    js = desc["transforms"]
    meta = _load_json(js)
    scene = os.path.dirname(js)
    model = str(meta.get("camera_model", "OPENCV")).upper()
    if model in REJECTED_MODELS:
        raise ValueError(f"{js}: key 'camera_model' is {model!r}; expected a pinhole model (PINHOLE, OPENCV, ...)")
    for i, fr in enumerate(meta["frames"]):
        if not isinstance(fr, dict) or not isinstance(fr.get("file_path"), str):
            raise ValueError(f"{js}: frames[{i}] expected an object with a string 'file_path'")
    order = sorted(range(len(meta["frames"])), key=lambda i: natural_key(meta["frames"][i]["file_path"]))
    imgs, c2w, intr, dist, names = [], [], [], [], []
    for i in order:
        fr, where = meta["frames"][i], f"{js}: frames[{i}]"
        try:
            M = np.asarray(fr.get("transform_matrix"), dtype=np.float64)
        except (TypeError, ValueError):
            M = np.zeros(0)
        if M.shape == (3, 4):
            M = np.vstack([M, [0.0, 0.0, 0.0, 1.0]])
        if M.shape != (4, 4) or not np.isfinite(M).all():
            raise ValueError(f"{where}: key 'transform_matrix' expected a finite 4x4 (or 3x4) matrix, "
                             f"got shape {M.shape}")
        problem = rotation_problem(M[:3, :3])
        if problem or np.abs(M[3] - [0, 0, 0, 1]).max() > 1e-6:
            raise ValueError(f"{where}: key 'transform_matrix' {problem or 'last row is not [0, 0, 0, 1]'}")
        img_path = _image_path(scene, fr["file_path"], desc.get("images"))
        img = _read_image(img_path, f"{where}.file_path")
        if imgs and img.shape != imgs[0].shape:
            raise ValueError(f"{img_path}: image size {img.shape[1]}x{img.shape[0]} differs from the first "
                             f"frame's {imgs[0].shape[1]}x{imgs[0].shape[0]}; expected one size per scene")
        H, W = img.shape[:2]
        w, h = _num(fr, meta, "w", where, W), _num(fr, meta, "h", where, H)
        fx = _num(fr, meta, "fl_x", where)
        if fx is None:
            angle = _num(fr, meta, "camera_angle_x", where)
            if angle is None:
                raise ValueError(f"{where}: key 'fl_x' is missing (neither per frame nor at the top level), "
                                 "and no 'camera_angle_x'")
            fx = 0.5 * w / math.tan(0.5 * angle)
        fy = _num(fr, meta, "fl_y", where, fx if "fl_x" not in fr and "fl_x" not in meta else None)
        if fy is None:
            raise ValueError(f"{where}: key 'fl_y' is missing (neither per frame nor at the top level)")
        cx, cy = _num(fr, meta, "cx", where, w / 2), _num(fr, meta, "cy", where, h / 2)
        if min(fx, fy, w, h) <= 0:
            raise ValueError(f"{where}: expected positive fl_x, fl_y, w, h, got {fx}, {fy}, {w}, {h}")
        sx, sy = W / w, H / h                                # full-resolution pixels -> pixels read
        intr.append((fx * sx, fy * sy, cx * sx, cy * sy))
        dist.append([_num(fr, meta, k, where, 0.0) for k in ("k1", "k2", "p1", "p2")])
        c2w.append(M @ GL_TO_CV)                             # [4, 4] OpenGL -> OpenCV camera axes
        imgs.append(img)
        names.append(fr["file_path"])
    intr_a = np.asarray(intr)                                # [T, 4] fx fy cx cy in pixels read
    fps = _num({}, meta, "fps", js, DEFAULT_FPS)
    clip = {
        "frames": np.stack(imgs),                            # [T, H, W, 3]
        "K": intrinsics(*intr_a.T),
        "c2w": np.stack(c2w).astype(np.float32),
        "fps": fps if fps and fps > 0 else DEFAULT_FPS,
        "source": SOURCE,
        "video_id": desc.get("id") or make_id(os.path.dirname(scene), scene),
        "distortion": np.asarray(dist, np.float32),
        "file_names": np.asarray(names),
        "camera_model": model,
    }
    return validate_clip(clip, name=js)
