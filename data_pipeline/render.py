"""Built-in rendered source: MiniWorld (Farama) multi-room scenes rendered headless with EGL.

A scene (one per seed) is four 4 m x 4 m rooms in a 2x2 ring around the world origin, joined by
1.6 m wide doorways, each room with its own wall/floor texture and 2-4 objects (boxes, balls,
keys; every (kind, colour) at most once per scene) in its corners. The camera stays on the
room-centre lines, looks around, walks through doorways and returns to exact earlier poses:
an exact revisit renders a pixel-identical frame (``revisit_of`` marks them).

Conventions of ``read``'s clip (DESIGN §2.1):
  * world frame = MiniWorld's: metres, y up, floor at y = 0; the camera is 1.5 m above the floor.
  * K float32 [T, 3, 3] in pixels of the stored frames: fy = (H / 2) / tan(fov_y / 2) with
    MiniWorld's vertical fov (60 deg), fx = fy (gluPerspective has square pixels), cx = W / 2,
    cy = H / 2; pixel (u, v) (column, row, row 0 at the top) has its centre at (u + 0.5, v + 0.5).
  * c2w float32 [T, 4, 4] camera-to-world, OpenCV axes (x right, y down, z forward), built from
    the same eye / look direction / up (0, 1, 0) that MiniWorld passes to gluLookAt.
  * depth float16 [T, H, W]: z-depth along the optical axis in metres, from the 16-bit depth
    buffer: steps of about 4e-4 * z^2 m (1 cm at 5 m), plus float16 rounding.
  * objects: ``object_names`` str [n] (e.g. "red_box"), ``object_positions`` float32 [n, 3]
    (world centre of the object's bounding box), ``object_sizes`` float32 [n] (largest extent of
    that box, m); ``objects`` holds the same as a list of {name, position, size} dicts for
    convenience: drop it before ``clip.save_clip``, which refuses anything needing pickle.
  * revisit_of int32 [T]: index of the first earlier frame with the identical pose, else -1.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os

import numpy as np

FPS = 10
NEAR, FAR = 0.04, 100.0        # MiniWorld's gluPerspective clipping planes (m)
FOV_Y = 60.0                   # MiniWorld's default vertical field of view (deg)
ROOM, DOOR = 4.0, 1.6          # room side, doorway width (m)
MOVE, TURN, TILT = 0.2, 9.0, 3.0   # per-frame steps: metres, yaw degrees, pitch degrees
DEFAULTS = {"scenes": 4, "frames": 128, "hw": [64, 64], "seed": 0}

# Room i has its centre at CENTRES[i]; rooms i and i+1 (mod 4) share a wall with a doorway.
CENTRES = ROOM / 2 * np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
WALL_TEX = ["brick_wall", "cinder_blocks", "concrete", "drywall", "stucco", "wood_planks", "marble", "metal_grill"]
FLOOR_TEX = ["floor_tiles_bw", "asphalt", "wood", "concrete_tiles", "rock", "airduct_grate", "cardboard"]
KINDS = ["box", "ball", "key"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "grey"]


def _spec_value(key, value):
    """Check and normalise one spec entry; raise ValueError naming it."""
    if key not in DEFAULTS:
        raise ValueError(f"render spec: unknown key {key!r} (known: {', '.join(DEFAULTS)})")
    try:
        if key == "hw":
            parts = value.lower().split("x") if isinstance(value, str) else value
            parts = [parts] if isinstance(parts, int) else list(parts)
            hw = [int(p) for p in parts] * (2 if len(parts) == 1 else 1)
            exact = not any(isinstance(p, (bool, float)) for p in parts)     # 64.5 must not become 64
            if len(hw) == 2 and exact and all(8 <= p <= 4096 for p in hw):
                return hw
        elif not isinstance(value, (bool, float)):
            v = int(value)
            if v >= (0 if key == "seed" else 1):
                return v
    except (TypeError, ValueError):
        pass
    want = "HxW with 8 <= H, W <= 4096" if key == "hw" else ("an int >= 0" if key == "seed" else "an int >= 1")
    raise ValueError(f"render spec: bad value {value!r} for {key!r} (expected {want})")


def find_inputs(spec: str) -> list[dict]:
    """Parse a render spec (YAML/JSON file or ``"scenes=8,frames=256,hw=64x64,seed=0"``) -> one descriptor per scene."""
    spec = str(spec).strip()
    if os.path.isfile(spec):
        with open(spec) as f:
            text = f.read()
        if spec.endswith(".json"):
            entries = json.loads(text)
        else:
            import yaml
            try:
                entries = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"render spec {spec}: not valid YAML ({e})") from e
        if not isinstance(entries, dict):
            raise ValueError(f"render spec {spec}: expected a mapping of {', '.join(DEFAULTS)}")
    elif spec and "=" not in spec:
        raise ValueError(f"render spec {spec!r}: neither an existing file nor key=value pairs")
    else:
        entries = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, value = (s.strip() for s in item.partition("="))
            if not sep or key in entries:
                raise ValueError(f"render spec: bad or repeated entry {item!r} (expected key=value)")
            entries[key] = value
    cfg = dict(DEFAULTS, **{k: _spec_value(k, v) for k, v in entries.items()})
    return [{"id": f"render-{s:05d}", "seed": s, "frames": cfg["frames"], "hw": list(cfg["hw"])}
            for s in range(cfg["seed"], cfg["seed"] + cfg["scenes"])]


def _scene(seed: int) -> dict:
    """Layout of scene ``seed``: room textures, doorways, objects (kind, colour, size, x, z, dir)."""
    rng = np.random.default_rng([seed, 0x4E11D])
    walls, floors = rng.permutation(WALL_TEX)[:4], rng.permutation(FLOOR_TEX)[:4]
    links = [(i, (i + 1) % 4) for i in range(4)]
    if rng.random() < 0.5:                        # half the scenes: a U of rooms, not a ring
        links.pop(int(rng.integers(4)))
    combos = [(k, c) for k in KINDS for c in COLOURS]
    picks = iter(rng.permutation(len(combos)))
    objects = []
    for room, (cx, cz) in enumerate(CENTRES):
        # Objects sit in corner zones, >= 0.4 m from the centre lines the camera moves on and
        # from the walls (bounding radius <= 0.57 m for the largest box).
        for corner in rng.permutation(4)[: int(rng.integers(2, 5))]:
            kind, colour = combos[next(picks)]
            size = {"box": rng.uniform(0.5, 0.8), "ball": rng.uniform(0.5, 0.7), "key": 0.4}[kind]
            sx, sz = (1 if corner & 1 else -1), (1 if corner & 2 else -1)
            x, z = cx + sx * ROOM * rng.uniform(0.25, 0.34), cz + sz * ROOM * rng.uniform(0.25, 0.34)
            objects.append(dict(kind=kind, colour=colour, size=float(size), room=room,
                                x=float(x), z=float(z), dir=float(rng.uniform(-math.pi, math.pi))))
    return dict(walls=list(walls), floors=list(floors), links=links, objects=objects)


def _room_of(x: float, z: float) -> int:
    """Room whose quadrant strictly contains (x, z), or -1 on a dividing wall line (doorways)."""
    for i, (cx, cz) in enumerate(CENTRES):
        if x * cx > 0 and z * cz > 0:
            return i
    return -1


def _path(scene: dict, frames: int, seed: int) -> np.ndarray:
    """Camera poses float64 [frames, 4] = (x, z, yaw deg, pitch deg) on the room-centre lines."""
    rng = np.random.default_rng([seed, 0xCA11])
    nbrs = {i: [b if a == i else a for a, b in scene["links"] if i in (a, b)] for i in range(4)}
    wrap = lambda a: (a + 180.0) % 360.0 - 180.0                       # noqa: E731
    room, prev, visit = int(rng.integers(4)), -1, 0
    poses = [(*CENTRES[room], float(np.round(rng.uniform(-180, 180))), 0.0)]
    visit_of = [visit]                                                  # visit counter at each pose

    def go(x, z, yaw, pitch):
        """Append a smooth move from the last pose to (x, z, yaw, pitch), ending on it exactly."""
        x0, z0, y0, p0 = poses[-1]
        if (x, z, yaw, pitch) == (x0, z0, y0, p0):
            return                                                      # no standing-still frames
        dyaw = wrap(yaw - y0)
        n = max(1, math.ceil(max(math.hypot(x - x0, z - z0) / MOVE, abs(dyaw) / TURN, abs(pitch - p0) / TILT)))
        for i in range(1, n):
            f = i / n
            poses.append((x0 + f * (x - x0), z0 + f * (z - z0), wrap(y0 + f * dyaw), p0 + f * (pitch - p0)))
        poses.append((x, z, yaw, pitch))
        visit_of.extend([visit] * n)

    def walk(x, z):
        """Turn to face (x, z), then move there straight (all moves run along the centre lines)."""
        x0, z0 = poses[-1][:2]
        if (x, z) != (x0, z0):
            heading = math.degrees(math.atan2(-(z - z0), x - x0))       # MiniWorld: dir_vec = (cos, 0, -sin)
            go(x0, z0, heading, 0.0)
            go(x, z, heading, 0.0)

    def look_around():
        """Rotate in place (sometimes tilting up or down and back)."""
        x, z, yaw, _ = poses[-1]
        go(x, z, wrap(yaw + 30.0 * rng.choice([-4, -3, -2, 2, 3, 4])), float(rng.choice([0, 0, -15, 10])))
        go(x, z, poses[-1][2], 0.0)

    while len(poses) < frames:
        # Back in a room seen before: first return to an exact pose of an earlier visit.
        here = [j for j in range(len(poses)) if _room_of(*poses[j][:2]) == room]
        old = [j for j in here if visit_of[j] < visit]
        if not old:
            look_around()
            old = [j for j in here if j < len(poses) - 20] * int(rng.random() < 0.3)   # same-visit return
        if old:
            j = int(rng.choice(old))
            walk(*poses[j][:2])
            go(*poses[j])
            look_around()
            walk(*CENTRES[room])
        # Often go straight back where we came from, so that leaving and returning happens early.
        nxt = prev if prev in nbrs[room] and rng.random() < 0.7 else int(rng.choice(nbrs[room]))
        walk(*(CENTRES[room] + CENTRES[nxt]) / 2)                       # through the doorway
        room, prev, visit = nxt, room, visit + 1
        walk(*CENTRES[room])
    return np.array(poses[:frames], dtype=np.float64)


_ENV = None
_FBS: dict = {}


def _env():
    """The process's MiniWorld env, created on first use (a forked child must not inherit a used one)."""
    global _ENV
    if _ENV is None:
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
        import pyglet
        pyglet.options["headless"] = True                              # EGL, no X server
        from miniworld.entity import Box, MeshEnt
        from miniworld.miniworld import MiniWorldEnv
        from miniworld.params import DEFAULT_PARAMS

        class Scenes(MiniWorldEnv):
            scene = _scene(0)

            def _gen_world(self):
                sc = self.scene
                rooms = [self.add_rect_room(cx - ROOM / 2, cx + ROOM / 2, cz - ROOM / 2, cz + ROOM / 2,
                                            wall_tex=w, floor_tex=f, ceil_tex="ceiling_tiles")
                         for (cx, cz), w, f in zip(CENTRES, sc["walls"], sc["floors"])]
                for a, b in sc["links"]:
                    mx, mz = (CENTRES[a] + CENTRES[b]) / 2
                    if CENTRES[a][0] == CENTRES[b][0]:                 # rooms stacked in z: door spans x
                        self.connect_rooms(rooms[a], rooms[b], min_x=mx - DOOR / 2, max_x=mx + DOOR / 2, max_y=2.2)
                    else:
                        self.connect_rooms(rooms[a], rooms[b], min_z=mz - DOOR / 2, max_z=mz + DOOR / 2, max_y=2.2)
                for o in sc["objects"]:
                    ent = (Box(o["colour"], o["size"]) if o["kind"] == "box" else
                           MeshEnt(f"{o['kind']}_{o['colour']}", o["size"], static=True))
                    self.place_entity(ent, pos=np.array([o["x"], 0.0, o["z"]]), dir=o["dir"])
                self.place_agent(pos=np.array([CENTRES[0][0], 0.0, CENTRES[0][1]]), dir=0.0)

        with contextlib.redirect_stdout(io.StringIO()):               # MSAA fallback notices on llvmpipe
            _ENV = Scenes(obs_width=64, obs_height=64, window_width=8, window_height=8,
                          params=DEFAULT_PARAMS.no_random(), domain_rand=False)
    return _ENV


def intrinsics(h: int, w: int, fov_y_deg: float = FOV_Y) -> np.ndarray:
    """Pinhole K float64 [3, 3] of gluPerspective(fov_y, w / h) on an h x w image (pixel centres at +0.5)."""
    f = 0.5 * h / math.tan(math.radians(fov_y_deg) / 2)
    return np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]], dtype=np.float64)


def look_at_c2w(eye, forward, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """Camera-to-world float64 [4, 4] in OpenCV axes for gluLookAt(eye, eye + forward, up)."""
    f = np.asarray(forward, np.float64) / np.linalg.norm(forward)
    s = np.cross(f, up)
    s /= np.linalg.norm(s)                                             # gluLookAt's side (camera x)
    u = np.cross(s, f)                                                 # gluLookAt's up (camera -y)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([s, -u, f], axis=1)                         # columns: x right, y down, z forward
    c2w[:3, 3] = eye
    return c2w


def _load(seed: int):
    """The env with scene ``seed`` loaded (rebuilt only when the seed changes)."""
    env = _env()
    if getattr(env, "loaded_seed", None) != seed:
        env.scene = _scene(seed)
        env.reset(seed=seed)
        env.loaded_seed = seed
    return env


def render_poses(seed: int, poses, hw) -> dict:
    """Render scene ``seed`` from poses [T, 4] = (x, z, yaw deg, pitch deg) -> frames, depth, K, c2w (as ``read``)."""
    h, w = _spec_value("hw", hw)
    poses = np.asarray(poses, np.float64).reshape(-1, 4)
    env = _load(seed)
    if (h, w) not in _FBS:
        from miniworld.opengl import FrameBuffer
        _FBS[(h, w)] = FrameBuffer(w, h, 4)                            # 4x MSAA: llvmpipe's maximum
    fb, agent, T = _FBS[(h, w)], env.agent, len(poses)
    rgb, depth = np.empty((T, h, w, 3), np.uint8), np.empty((T, h, w), np.float16)
    c2w = np.empty((T, 4, 4), np.float64)
    for t, (x, z, yaw, pitch) in enumerate(poses):
        agent.pos, agent.dir, agent.cam_pitch = np.array([x, 0.0, z]), math.radians(yaw), pitch
        rgb[t] = env.render_obs(fb)                                    # [H, W, 3], already flipped: row 0 on top
        depth[t] = fb.get_depth_map(NEAR, FAR)[..., 0]                 # [H, W] eye-space z of the same render
        c2w[t] = look_at_c2w(agent.cam_pos, agent.cam_dir)             # what render_obs gave gluLookAt
    K = np.repeat(intrinsics(h, w, agent.cam_fov_y)[None], T, 0)      # [T, 3, 3]
    return {"frames": rgb, "depth": depth, "K": K.astype(np.float32), "c2w": c2w.astype(np.float32)}


def read(desc: dict) -> dict:
    """Render the scene described by ``desc`` (from ``find_inputs``) -> canonical clip with depth and objects."""
    try:
        seed, frames = _spec_value("seed", desc["seed"]), _spec_value("frames", desc["frames"])
        hw = _spec_value("hw", desc["hw"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"render descriptor {desc!r}: needs seed, frames, hw ({e})") from e
    scene = _scene(seed)
    poses = _path(scene, frames, seed)                                 # [T, 4]
    clip = render_poses(seed, poses, hw)
    first: dict = {}
    revisit = np.array([first.setdefault(tuple(p), t) for t, p in enumerate(poses)], np.int32)
    revisit[revisit == np.arange(frames)] = -1                         # -1: pose not seen before
    objs = []
    for o, ent in zip(scene["objects"], _env().entities):             # entities: objects in order, then agent
        ext = ent.size if o["kind"] == "box" else (ent.mesh.max_coords - ent.mesh.min_coords) * ent.scale
        objs.append({"name": f"{o['colour']}_{o['kind']}", "position": [o["x"], float(ent.height) / 2, o["z"]],
                     "size": float(np.max(ext))})
    return dict(
        clip, fps=FPS, source="render", video_id=str(desc.get("id", f"render-{seed:05d}")),
        revisit_of=revisit,
        object_names=np.array([o["name"] for o in objs], dtype=str),
        object_positions=np.array([o["position"] for o in objs], np.float32).reshape(-1, 3),
        object_sizes=np.array([o["size"] for o in objs], np.float32),
    )
