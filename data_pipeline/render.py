"""Built-in rendered source: MiniWorld (Farama) multi-room scenes rendered headless with EGL.

A scene (one per seed) is four 4 m x 4 m rooms in a 2x2 ring around the world origin, joined by
1.6 m wide doorways, each room with its own wall/floor texture and 2-4 objects (boxes, balls,
keys; every (kind, colour) at most once per scene) in its corners. The camera stays on the
room-centre lines, looks around, walks through doorways and returns to exact earlier poses:
an exact revisit renders a pixel-identical frame (``revisit_of`` marks them). The spec key ``path``
picks how: "tour" (default) mostly returns after long gaps; "revisit" keeps coming back to views of a
few to ~20 frames before, so that training samples need the model's long-term memory
(``revisit_fraction`` measures this from depth and poses); "return" cuts between a few views 90 deg or
more apart, so that on coming back nothing in the last few frames shows the view: only memory has it.

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
import yaml

from decmem.data_pipeline.overlap import visible_in

FPS = 10
NEAR, FAR = 0.04, 100.0        # MiniWorld's gluPerspective clipping planes (m)
FOV_Y = 60.0                   # MiniWorld's default vertical field of view (deg)
ROOM, DOOR = 4.0, 1.6          # room side, doorway width (m)
MOVE, TURN, TILT = 0.2, 9.0, 3.0   # per-frame steps: metres, yaw degrees, pitch degrees
DEFAULTS = {"scenes": 4, "frames": 128, "hw": [64, 64], "seed": 0, "path": "tour"}
PATHS = ("tour", "revisit", "return")    # camera path kinds (see _path)

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
    if key == "path":
        if isinstance(value, str) and value in PATHS:
            return value
        raise ValueError(f"render spec: bad value {value!r} for 'path' (expected one of {', '.join(PATHS)})")
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
    """Parse a render spec (YAML/JSON file or ``"scenes=8,frames=256,hw=64x64,seed=0,path=revisit"``) -> one
    descriptor per scene (``path`` defaults to "tour"; the id does not depend on it)."""
    spec = str(spec).strip()
    if os.path.isfile(spec):
        with open(spec) as f:
            text = f.read()
        if spec.endswith(".json"):
            entries = json.loads(text)
        else:
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
    return [{"id": f"render-{s:05d}", "seed": s, "frames": cfg["frames"], "hw": list(cfg["hw"]), "path": cfg["path"]}
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


def _wrap(a: float) -> float:
    """Angle (deg) wrapped into [-180, 180)."""
    return (a + 180.0) % 360.0 - 180.0


class _Track:
    """A camera path being built: poses (x, z, yaw deg, pitch deg), each at most one per-frame step from the last."""

    def __init__(self, pose):
        self.poses, self.visit, self.visit_of = [pose], 0, [0]          # visit_of: visit counter at each pose

    def _add(self, pose):
        """Append one pose, tagged with the current visit."""
        self.poses.append(pose)
        self.visit_of.append(self.visit)

    def go(self, x, z, yaw, pitch):
        """Append a smooth move from the last pose to (x, z, yaw, pitch), ending on it exactly."""
        x0, z0, y0, p0 = self.poses[-1]
        if (x, z, yaw, pitch) == (x0, z0, y0, p0):
            return                                                      # no standing-still frames
        dyaw = _wrap(yaw - y0)
        n = max(1, math.ceil(max(math.hypot(x - x0, z - z0) / MOVE, abs(dyaw) / TURN, abs(pitch - p0) / TILT)))
        for i in range(1, n):
            f = i / n
            self._add((x0 + f * (x - x0), z0 + f * (z - z0), _wrap(y0 + f * dyaw), p0 + f * (pitch - p0)))
        self._add((x, z, yaw, pitch))

    def walk(self, x, z):
        """Turn to face (x, z), then move there straight (all moves run along the centre lines)."""
        x0, z0 = self.poses[-1][:2]
        if (x, z) != (x0, z0):
            heading = math.degrees(math.atan2(-(z - z0), x - x0))       # MiniWorld: dir_vec = (cos, 0, -sin)
            self.go(x0, z0, heading, 0.0)
            self.go(x, z, heading, 0.0)

    def retrace(self, i, dx=0.0, dz=0.0, dyaw=0.0, half=False):
        """Go back to pose ``i`` the way we came: the poses since, in reverse (exact revisits), at ``half`` speed
        with a midpoint between each two, or with an offset (dx, dz, dyaw) of at most a step, which the caller keeps
        on the centre lines, beside them (overlapping views rather than identical ones)."""
        shift = (lambda p: (p[0] + dx, p[1] + dz, _wrap(p[2] + dyaw), p[3])) if (dx, dz, dyaw) != (0, 0, 0) else None
        back = self.poses[i:-1][::-1]
        if shift:
            self.go(*shift(self.poses[-1]))                             # one frame aside, then the same steps
            back = [shift(p) for p in back]
        for p in back:
            if half:
                x, z, yaw, pitch = self.poses[-1]
                self._add(((x + p[0]) / 2, (z + p[1]) / 2, _wrap(yaw + _wrap(p[2] - yaw) / 2), (pitch + p[3]) / 2))
            self._add(p)
        self.go(*self.poses[i])                                         # back from aside (no-op otherwise)


def _tour(track: _Track, rng, nbrs: dict, room: int, frames: int):
    """Path kind "tour": look around, walk between rooms, and on coming back to a room first return to an exact
    pose of an earlier visit (so revisits mostly come after long gaps)."""
    prev = -1

    def look_around():
        """Rotate in place (sometimes tilting up or down and back)."""
        x, z, yaw, _ = track.poses[-1]
        track.go(x, z, _wrap(yaw + 30.0 * rng.choice([-4, -3, -2, 2, 3, 4])), float(rng.choice([0, 0, -15, 10])))
        track.go(x, z, track.poses[-1][2], 0.0)

    poses, visit_of = track.poses, track.visit_of
    while len(poses) < frames:
        # Back in a room seen before: first return to an exact pose of an earlier visit.
        here = [j for j in range(len(poses)) if _room_of(*poses[j][:2]) == room]
        old = [j for j in here if visit_of[j] < track.visit]
        if not old:
            look_around()
            old = [j for j in here if j < len(poses) - 20] * int(rng.random() < 0.3)   # same-visit return
        if old:
            j = int(rng.choice(old))
            track.walk(*poses[j][:2])
            track.go(*poses[j])
            look_around()
            track.walk(*CENTRES[room])
        # Often go straight back where we came from, so that leaving and returning happens early.
        nxt = prev if prev in nbrs[room] and rng.random() < 0.7 else int(rng.choice(nbrs[room]))
        track.walk(*(CENTRES[room] + CENTRES[nxt]) / 2)                 # through the doorway
        room, prev, track.visit = nxt, room, track.visit + 1
        track.walk(*CENTRES[room])


def _revisit(track: _Track, rng, nbrs: dict, room: int, frames: int):
    """Path kind "revisit": moves that come back to views of a few to ~20 frames before, so that a training
    sample's frames often show what the model's window has lost but its memory has (``revisit_fraction``).

    From the room centre, mixed at random: loops of the gaze drifting sideways, pans away and back (exact pose
    revisits), tilts, short walks along a centre line and back, steps through a doorway and back; now and then a
    turn to a new heading. Ways back sometimes run one step or half a turn step beside the way out (overlapping
    views, not identical ones). Walks mostly look around in loops too. After 40-110 frames in a room the camera
    moves on to a neighbouring one, often to an exact pose of an earlier visit there.
    """
    poses = track.poses

    def aside(x, z):
        """A random offset (dx, dz, dyaw) of one step or half a turn step for a way back beside the way out, or
        none (most of the time): dx, dz only at the room centre, where both centre lines cross."""
        u = rng.random()
        if u < 0.7:
            return 0.0, 0.0, 0.0
        if u < 0.85 or (x, z) != tuple(CENTRES[room]):
            return 0.0, 0.0, float(rng.choice([-0.5, 0.5]) * TURN)
        step = float(rng.choice([-MOVE, MOVE]))
        return (step, 0.0, 0.0) if rng.random() < 0.5 else (0.0, step, 0.0)

    def pan():
        """Pan away by 45-135 deg (sometimes tilting) and back (sometimes at half speed), 2-3 times, then the same
        to the other side: each way back, and each pass after the first, shows again what the pass before saw a few
        frames earlier."""
        x, z, yaw, _ = poses[-1]
        a = TURN * int(rng.choice([5, 5, 5, 5, 5, 6, 6, 6, 7, 8, 10, 15])) * rng.choice([-1, 1])
        pitch = float(rng.choice([0, 0, 0, -6, 6]))
        for side in (a, -a):
            for _ in range(int(rng.choice([2, 2, 3]))):
                i = len(poses) - 1
                track.go(x, z, _wrap(yaw + side), pitch)
                track.retrace(i, *aside(x, z), half=rng.random() < 0.1)

    def loops(n, yaw, ry, rp, drift=0.0, to=None):
        """``n`` waypoints (6 a loop) of the gaze looping around ``yaw`` (yaw +-ry, pitch up or down to 2 rp),
        drifting ``drift`` deg a waypoint, moving evenly to ``to`` on the way if given; ends level there.
        Each loop sees again most of what the one before saw 4-8 frames earlier."""
        x0, z0 = poses[-1][:2]
        x1, z1 = (x0, z0) if to is None else to
        up, sense = rng.choice([-1, 1]), rng.choice([-1, 1])
        for k in range(1, n):
            ph, f = sense * k * math.pi / 3, k / n
            track.go(x0 + f * (x1 - x0), z0 + f * (z1 - z0), _wrap(yaw + ry * math.sin(ph) + drift * k),
                     up * rp * (1 - math.cos(ph)))
        track.go(x1, z1, _wrap(yaw + drift * n), 0.0)

    def circle():
        """Look around in small loops (~12 frames each) 3-5 times, drifting sideways by 7-20 deg a loop."""
        loops(6 * int(rng.integers(3, 6)), poses[-1][2], TURN * rng.uniform(1.3, 2), TILT * rng.uniform(1.5, 2),
              drift=TURN * rng.uniform(0.75, 2.25) * rng.choice([-1, 1]) / 6)

    def roam(x, z):
        """Walk to (x, z) like ``track.walk``, mostly looking around in loops on the way (a loop per 6 steps)."""
        x0, z0 = poses[-1][:2]
        if rng.random() < 0.2 or (x, z) == (x0, z0):
            track.walk(x, z)
            return
        heading = math.degrees(math.atan2(-(z - z0), x - x0))
        track.go(x0, z0, heading, 0.0)
        loops(max(1, round(math.hypot(x - x0, z - z0) / MOVE)), heading, TURN * rng.uniform(1, 1.7),
              TILT * rng.uniform(1, 2), to=(x, z))

    def tilt():
        """Look up or down (turning a little too) and back."""
        x, z, yaw, _ = poses[-1]
        i = len(poses) - 1
        track.go(x, z, _wrap(yaw + TURN * int(rng.integers(-3, 4))), float(rng.choice([-15, -12, 12, 15])))
        track.retrace(i, *aside(x, z))

    def axis(yaw):
        """The centre-line direction (deg) nearest to ``yaw``, sometimes another one."""
        near = 90.0 * round(yaw / 90.0)
        return _wrap(near + 90.0 * int(rng.choice([0, 0, 0, 0, 0, 1, -1, 2])))

    def stroll():
        """Walk 3-6 steps along a centre line and come back: backing up the same way, or turning round, walking
        back and turning round the other way (the second turn sees the first one's views from elsewhere)."""
        x, z, yaw, _ = poses[-1]
        i = len(poses) - 1
        h, k = axis(yaw), int(rng.integers(3, 7))
        ux, uz = round(math.cos(math.radians(h))), -round(math.sin(math.radians(h)))   # exactly along the line
        roam(x + k * MOVE * ux, z + k * MOVE * uz)
        if rng.random() < 0.85:
            track.retrace(i, half=rng.random() < 0.5)
            return
        sense = float(rng.choice([-90.0, 90.0]))
        x1, z1 = poses[-1][:2]
        track.go(x1, z1, _wrap(h + sense), 0.0)
        track.go(x1, z1, _wrap(h + 2 * sense), 0.0)
        loops(k, _wrap(h + 2 * sense), TURN * rng.uniform(0, 1.7), TILT * rng.uniform(0, 2), to=(x, z))
        track.go(x, z, _wrap(h + sense), 0.0)
        track.go(x, z, h, 0.0)

    def peek():
        """Step through a doorway, look around in the next room, come back and look at that room again."""
        x, z = poses[-1][:2]
        nb = int(rng.choice(nbrs[room]))
        door = (CENTRES[room] + CENTRES[nb]) / 2
        i = len(poses) - 1
        roam(*door)
        roam(*(door + (CENTRES[nb] - door) * rng.integers(2, 6) * MOVE / (ROOM / 2)))
        pan()
        if rng.random() < 0.5:
            track.retrace(i)
            return
        roam(x, z)                                                      # turn round, walk back,
        track.go(x, z, math.degrees(math.atan2(-(door[1] - z), door[0] - x)), 0.0)   # face the room we left

    def move():
        """Go through a doorway to a neighbour's centre, mostly the one left longest ago (so long paths tour all
        rooms and come back to each after hundreds of frames); in a room seen before, often to an old pose and back."""
        nonlocal room
        last = {_room_of(*p[:2]): t for t, p in enumerate(poses)}        # room -> last frame in it
        nb = min(nbrs[room], key=lambda r: last.get(r, -1)) if rng.random() < 0.7 else int(rng.choice(nbrs[room]))
        roam(*(CENTRES[room] + CENTRES[nb]) / 2)
        room, track.visit = nb, track.visit + 1
        roam(*CENTRES[room])
        old = [j for j in range(len(poses)) if _room_of(*poses[j][:2]) == room and track.visit_of[j] < track.visit]
        if old and rng.random() < 0.5:
            j = int(rng.choice(old))
            roam(*poses[j][:2])                                         # on a centre line through the centre
            track.go(*poses[j])
            roam(*CENTRES[room])

    def turn():
        """Turn to a new heading: new views."""
        x, z, yaw, _ = poses[-1]
        track.go(x, z, _wrap(yaw + TURN * int(rng.integers(5, 21)) * rng.choice([-1, 1])), 0.0)

    # Stay 40-110 frames in a room, mixing moves, then go on to the next.
    moves, stay, since = [circle, pan, tilt, stroll, peek, turn], int(rng.integers(40, 110)), 0
    while len(poses) < frames:
        if len(poses) - since >= stay:
            move()
            stay, since = int(rng.integers(40, 110)), len(poses)
        else:
            moves[int(rng.choice(len(moves), p=[0.6, 0.2, 0.05, 0.07, 0.05, 0.03]))]()


def _return(track: _Track, rng, nbrs: dict, room: int, frames: int, recent: int = 20):
    """Path kind "return": 2-5 frames of small pans (within a turn step) and tilts at one view, then a cut (one frame) to another view:
    back to one left at most ``recent`` frames ago (60%), else a new one. Views that share a position are >= 90 deg
    of yaw apart (the frame is 60 deg wide), so on coming back the frames just before show nothing of the view:
    what the camera sees again only long-term memory holds (``revisit_fraction``'s ``far``). A new view is a new
    heading at the current position when one is free, else the centre of a neighbouring room.

    The "revisit" path never has this: it moves at most a turn step a frame, so the last 3 frames always show
    most of what comes back. Cuts are camera jumps, as in edited video or a game's teleport; the poses say where.
    A return lands on the view's first pose exactly (a pixel-identical frame, ``revisit_of``).
    """
    poses = track.poses
    views, last, cur = [poses[-1]], {0: 0}, 0                           # view poses; view -> last frame at it

    def dwell():
        """2-5 frames of small moves around the view: yaw by up to a turn step but never more than one from the view's
        own (so views stay apart), pitch by a tilt step (|pitch| <= 12)."""
        for _ in range(int(rng.integers(2, 6))):
            x, z, yaw, pitch = poses[-1]
            dyaw, dp = 0.0, 0.0
            while dyaw == 0.0 and dp == 0.0:
                dyaw = TURN * float(rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0]))
                if abs(_wrap(yaw + dyaw - views[cur][2])) > TURN:
                    dyaw = 0.0
                dp = TILT * float(rng.choice([-1.0, 0.0, 1.0])) if abs(pitch) < 12 else -TILT * math.copysign(1.0, pitch)
            track._add((x, z, _wrap(yaw + dyaw), pitch + dp))

    def new_view():
        """A heading >= 90 deg from every recent view at this position, else at a neighbouring room's centre."""
        here = tuple(map(float, views[cur][:2]))
        for x, z in [here] + [tuple(map(float, CENTRES[r])) for r in rng.permutation(nbrs[room])]:
            taken = [views[i][2] for i, t in last.items() if t >= len(poses) - recent and views[i][:2] == (x, z)]
            free = [a for a in np.arange(-180.0, 180.0, TURN) if all(abs(_wrap(a - b)) >= 90.0 for b in taken)]
            if free:
                return (x, z, float(rng.choice(free)), float(rng.choice([0.0, 0.0, -6.0, 6.0])))
        return None                                                     # every heading near a recent view

    while len(poses) < frames:
        dwell()
        last[cur] = len(poses) - 1
        back = [i for i, t in last.items() if i != cur and t >= len(poses) - recent]
        view = None if back and rng.random() < 0.6 else new_view()
        if view is None:
            cur = int(rng.choice(back))                                 # back is never empty when nothing is free
        else:
            views.append(view)
            cur = len(views) - 1
        room = _room_of(*views[cur][:2])
        track.visit += 1
        track._add(views[cur])                                          # the cut


def _path(scene: dict, frames: int, seed: int, kind: str = "tour") -> np.ndarray:
    """Camera poses float64 [frames, 4] = (x, z, yaw deg, pitch deg) on the room-centre lines.

    ``kind`` "tour" (``_tour``: the default, and the path of every dataset rendered before ``path`` existed),
    "revisit" (``_revisit``) or "return" (``_return``); all start from the same random room and heading.
    """
    rng = np.random.default_rng([seed, 0xCA11])
    nbrs = {i: [b if a == i else a for a, b in scene["links"] if i in (a, b)] for i in range(4)}
    room = int(rng.integers(4))
    track = _Track((*CENTRES[room], float(np.round(rng.uniform(-180, 180))), 0.0))
    {"tour": _tour, "revisit": _revisit, "return": _return}[kind](track, rng, nbrs, room, frames)
    return np.array(track.poses[:frames], dtype=np.float64)


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
        hw, kind = _spec_value("hw", desc["hw"]), _spec_value("path", desc.get("path", "tour"))
    except (KeyError, TypeError) as e:
        raise ValueError(f"render descriptor {desc!r}: needs seed, frames, hw ({e})") from e
    scene = _scene(seed)
    poses = _path(scene, frames, seed, kind)                           # [T, 4]
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


def revisit_fraction(clip: dict, window: int, clip_frames: int, coverage_min: float = 0.5, new_min: float = 0.05,
                     stride: int = 2) -> dict:
    """How often a clip's frames show again, beyond the model's short memory, what older frames showed.

    A training sample is ``clip_frames`` consecutive frames; the model's window (ALM) holds a frame and the
    ``window - 1`` before it, its long-term memory the sample's older frames. What frame t shows that its window
    does not (pixels, depth-based, ``data_pipeline.overlap``, every ``stride``-th pixel) is its *new* content; if that is
    >= ``new_min`` of the frame, either older frames saw >= ``coverage_min`` of it (memory can supply it) or not.
    Frames t >= window of every sample of the clip are scored:
      revisit   fraction of (sample, frame) pairs whose new content older frames of the same sample saw;
      gap       mean reach of those: the least g >= window such that frames t-g .. t-window cover the new content;
      novel     fraction of frames whose new content no older frame (>= window back, anywhere in the clip) saw;
      in_window fraction of frames with < new_min new content (walking ahead, small tilts: the window has it);
      covered   fraction of pairs where older frames of the sample see >= coverage_min of the whole frame, new or
                not (high for any smooth path: frame t-window mostly shows what t-1 does);
      far       fraction of pairs where the window sees less than coverage_min of frame t, yet older frames of
                the sample see >= coverage_min of the rest: most of the frame only long-term memory can supply
      returns   fraction of frames t >= clip_frames whose new content against the clip_frames - 1 frames before
                was seen by frames >= clip_frames back: coming back after more than a sample;
      samples   how many samples.
    """
    # Imported here: nothing else in data_pipeline depends on training.

    depth, K, c2w = clip["depth"], clip["K"], clip["c2w"]
    T = len(depth)
    if not 1 <= window < clip_frames <= T:
        raise ValueError(f"revisit_fraction: need 1 <= window ({window}) < clip_frames ({clip_frames}) <= frames ({T})")
    d = depth[:, ::stride, ::stride]
    valid = np.isfinite(d) & (d > 0)                                    # [T, h, w] pixels with a surface

    def new(t, recent):
        """bool mask of frame t's pixels that frames t-recent+1 .. t-1 do not see (None: < new_min of the frame)."""
        mask = valid[t].copy()
        for s in range(max(0, t - recent + 1), t):
            mask &= ~visible_in(depth[t], K[t], c2w[t], depth[s], K[s], c2w[s], stride=stride)
        return mask if mask.sum() >= max(1, new_min * valid[t].sum()) else None

    def reach(t, first, mask, last=0):
        """Least g >= first such that frames t-g .. t-first (none before ``last``) together see >= coverage_min
        of ``mask``, else None."""
        seen = np.zeros_like(mask)
        for s in range(t - first, last - 1, -1):                        # nearest first: stop once covered
            seen |= visible_in(depth[t], K[t], c2w[t], depth[s], K[s], c2w[s], stride=stride)
            if (seen & mask).sum() >= coverage_min * mask.sum():
                return t - s
        return None

    masks = {t: new(t, window) for t in range(window, T)}
    r = {t: None if m is None else reach(t, window, m) for t, m in masks.items()}
    r_all = {t: reach(t, window, valid[t], max(0, t - clip_frames + 1)) if valid[t].any() else None for t in masks}
    pairs = [(w, t) for w in range(T - clip_frames + 1) for t in range(w + window, w + clip_frames)]
    gaps = [r[t] for w, t in pairs if r[t] is not None and r[t] <= t - w]
    covered = [r_all[t] is not None and r_all[t] <= t - w for w, t in pairs]
    mostly_new = {t: m is not None and m.sum() > (1 - coverage_min) * valid[t].sum() for t, m in masks.items()}
    far = [mostly_new[t] and r[t] is not None and r[t] <= t - w for w, t in pairs]
    back = []
    for t in range(clip_frames, T):
        m = new(t, clip_frames)
        back.append(m is not None and reach(t, clip_frames, m) is not None)
    return {"revisit": len(gaps) / len(pairs), "gap": float(np.mean(gaps)) if gaps else 0.0,
            "novel": float(np.mean([masks[t] is not None and r[t] is None for t in masks])),
            "in_window": float(np.mean([m is None for m in masks.values()])), "covered": float(np.mean(covered)),
            "far": float(np.mean(far)),
            "returns": float(np.mean(back)) if back else 0.0, "samples": T - clip_frames + 1}
