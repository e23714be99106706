"""Dependency-free (numpy only) renderer of camera-annotated clips with exact revisits.

Stand-in for the MiniWorld renderer in tests and demos. The scene is the inside of an
axis-aligned box room [-R, R]^3 (R = 2 m) whose six walls carry distinct procedural
textures; images are ray cast analytically.

Conventions (same as model/camera.py):
  * K float32 [3, 3] in pixels: fy = 0.5 * H / tan(30 deg) (60 deg vertical fov), fx = fy,
    cx = W / 2, cy = H / 2. Pixel (u, v) (column, row) has its centre at (u + 0.5, v + 0.5),
    i.e. its ray direction in camera coordinates is K^-1 @ [u + 0.5, v + 0.5, 1].
  * c2w float32 [4, 4] camera-to-world with OpenCV axes (x right, y down, z forward).
    The world y axis also points down, so the identity pose looks along +z, upright.
  * Walls are unlit: a surface point has the same colour from every viewpoint, so the same
    pose renders pixel-identical frames and different views of one point agree exactly.
"""
from __future__ import annotations

import numpy as np

ROOM_HALF = 2.0          # R: the room is [-R, R]^3 metres
VFOV_DEG = 60.0
N_SINES = 3


def _wall_id(axis, positive):
    """Wall index 0..5 = 2 * axis + (1 if the wall is at +R else 0); e.g. 5 is the z = +R wall."""
    return 2 * np.asarray(axis) + np.asarray(positive, dtype=np.int64)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _texture_params(seed: int) -> list[dict]:
    """Per-wall random texture parameters, deterministic in ``seed``."""
    rng = np.random.default_rng([seed, 0x5EED])
    hue_order = rng.permutation(6)                 # distinct hue slot per wall
    params = []
    for w in range(6):
        ang = rng.uniform(0, 2 * np.pi, N_SINES)
        freq = rng.uniform(0.4, 1.5, N_SINES)     # cycles per metre: low frequency
        params.append(dict(
            base=_hsv_to_rgb((hue_order[w] + rng.uniform(-0.15, 0.15)) / 6.0, 0.65, 0.8),
            k=2 * np.pi * freq[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1),   # [S, 2] rad/m
            phase=rng.uniform(0, 2 * np.pi, N_SINES),                                  # [S]
            amp=rng.uniform(-0.12, 0.12, (N_SINES, 3)),                                # [S, 3] per channel
            cell=rng.uniform(0.35, 0.7),          # checker cell size (m)
            stripes=bool(rng.integers(2)),        # stripes instead of checker on some walls
        ))
    return params


def texture(wall: int, ab: np.ndarray, seed: int, params: list[dict] | None = None) -> np.ndarray:
    """Colour of ``wall`` at in-wall coordinates ab [..., 2] (metres) -> uint8 [..., 3].

    ab are the two world coordinates other than the wall's normal axis, in x, y, z order
    (e.g. (x, y) on the z walls).
    """
    p = (params or _texture_params(seed))[wall]
    ab = np.asarray(ab, dtype=np.float64)
    waves = np.sin(ab @ p["k"].T + p["phase"])                         # [..., S]
    cells = np.floor(ab / p["cell"]).astype(np.int64)                  # [..., 2]
    on = (cells[..., 0] % 2) if p["stripes"] else ((cells[..., 0] + cells[..., 1]) % 2)
    rgb = p["base"] * (0.7 + 0.3 * on[..., None]) + waves @ p["amp"]   # [..., 3]
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def _shade(pts: np.ndarray, wall: np.ndarray, seed: int) -> np.ndarray:
    """Texture lookup for surface points pts [N..., 3] on walls wall [N...] -> uint8 [N..., 3]."""
    params = _texture_params(seed)
    out = np.zeros(pts.shape, dtype=np.uint8)
    for w in range(6):
        m = wall == w
        if m.any():
            keep = [a for a in range(3) if a != w // 2]                  # in-wall axes
            out[m] = texture(w, pts[m][:, keep], seed, params)
    return out


def intrinsics(hw: tuple[int, int]) -> np.ndarray:
    """Pinhole K float32 [3, 3] for an (H, W) image: 60 deg vertical fov, square pixels, centred."""
    h, w = hw
    f = 0.5 * h / np.tan(np.deg2rad(VFOV_DEG) / 2)
    return np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]], dtype=np.float32)


def cast_rays(K: np.ndarray, c2w: np.ndarray, hw: tuple[int, int]):
    """Exit points of pixel-centre rays from inside the room.

    K [..., 3, 3], c2w [..., 4, 4] -> (points float64 [..., H, W, 3], wall int64 [..., H, W]).
    """
    h, w = hw
    K = np.asarray(K, dtype=np.float64)
    c2w = np.asarray(c2w, dtype=np.float64)
    v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    pix = np.stack([u, v, np.ones_like(u)], -1)                              # [H, W, 3]
    cam = np.einsum("...ij,hwj->...hwi", np.linalg.inv(K), pix)              # [..., H, W, 3]
    d = np.einsum("...ij,...hwj->...hwi", c2w[..., :3, :3], cam)             # world directions
    o = c2w[..., None, None, :3, 3]                                          # [..., 1, 1, 3]
    if np.any(np.abs(c2w[..., :3, 3]) >= ROOM_HALF):
        raise ValueError("camera centre must lie strictly inside the room [-R, R]^3")
    with np.errstate(divide="ignore", invalid="ignore"):
        # Distance along the ray to the +-R plane it is heading for, per axis; inf if parallel.
        t = np.where(d != 0, (np.sign(d) * ROOM_HALF - o) / d, np.inf)      # [..., H, W, 3]
    axis = np.argmin(t, axis=-1)                                             # exit axis
    t_exit = np.take_along_axis(t, axis[..., None], -1)                      # [..., H, W, 1]
    pts = o + t_exit * d
    d_axis = np.take_along_axis(d, axis[..., None], -1)[..., 0]
    # Snap the exit coordinate exactly onto its wall so texture lookups see the true plane.
    np.put_along_axis(pts, axis[..., None], (np.sign(d_axis) * ROOM_HALF)[..., None], -1)
    return pts, _wall_id(axis, d_axis > 0)


def render_frames(K: np.ndarray, c2w: np.ndarray, hw: tuple[int, int], seed: int) -> np.ndarray:
    """Render cameras K [T, 3, 3] (or one [3, 3] for all), c2w [T, 4, 4] in the room -> uint8 [T, H, W, 3]."""
    c2w = np.asarray(c2w)
    K = np.broadcast_to(np.asarray(K), c2w.shape[:-2] + (3, 3))
    pts, wall = cast_rays(K, c2w, hw)
    return _shade(pts, wall, seed)


def _rot_yaw_pitch(yaw: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """R = Ry(yaw) @ Rx(pitch) -> [T, 3, 3]; positive yaw turns right (+z towards +x), y down."""
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    z, o = np.zeros_like(yaw), np.ones_like(yaw)
    ry = np.stack([np.stack([cy, z, sy], -1), np.stack([z, o, z], -1), np.stack([-sy, z, cy], -1)], -2)
    rx = np.stack([np.stack([o, z, z], -1), np.stack([z, cp, -sp], -1), np.stack([z, sp, cp], -1)], -2)
    return ry @ rx


def revisit_path(n_frames: int, seed: int) -> np.ndarray:
    """Smooth camera path that turns/moves away and returns exactly -> c2w float32 [T, 4, 4].

    Yaw follows 150 deg * sin(2 pi s) (0 -> +150 -> 0 -> -150 -> 0) while the centre traces a
    figure-eight, s in [0, 1]. Frame 0, the middle frame (odd T) and the last frame share one
    pose exactly. The camera stays >= 0.3 m from every wall.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    rng = np.random.default_rng([seed, 0xCA3])
    start = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.3, 0.3), rng.uniform(-0.8, 0.8)])
    yaw0 = rng.uniform(-np.pi, np.pi)
    loop = rng.uniform(0.2, 0.5)                      # figure-eight half-size (m)
    span = max(n_frames - 1, 1)
    s = (np.arange(n_frames) % span) / span           # last frame wraps to exactly s = 0

    def wave(k):
        # sin(2 pi k s), with float noise at its zeros (e.g. sin(pi) = 1.2e-16) snapped to 0
        # so that revisits are bit-exact, not merely close.
        x = np.sin(2 * np.pi * k * s)
        return np.where(np.abs(x) < 1e-9, 0.0, x)

    yaw = yaw0 + np.deg2rad(150.0) * wave(1)
    pitch = np.deg2rad(8.0) * wave(2)
    local = np.stack([loop * wave(1), 0.1 * wave(2), 0.5 * loop * wave(2)], -1)   # [T, 3]
    c, sn = np.cos(yaw0), np.sin(yaw0)
    # Rotate the figure-eight by the start yaw so its shape is seed-independent in camera terms.
    world = local @ np.array([[c, 0, -sn], [0, 1, 0], [sn, 0, c]])
    c2w = np.tile(np.eye(4), (n_frames, 1, 1))
    c2w[:, :3, :3] = _rot_yaw_pitch(yaw, pitch)
    c2w[:, :3, 3] = start + world                     # |coord| <= 0.8 + 0.56 < R - 0.3
    return c2w.astype(np.float32)


def synthetic_clip(n_frames: int = 64, hw: tuple[int, int] = (32, 32), seed: int = 0) -> dict:
    """A canonical clip dict (frames, K, c2w, fps, source, video_id) of a revisiting camera."""
    c2w = revisit_path(n_frames, seed)                                   # [T, 4, 4]
    K = np.repeat(intrinsics(hw)[None], n_frames, axis=0)                # [T, 3, 3]
    return {
        "frames": render_frames(K, c2w, hw, seed),
        "K": K,
        "c2w": c2w,
        "fps": 10,
        "source": "synthetic",
        "video_id": f"synthetic-{seed:05d}",
    }
