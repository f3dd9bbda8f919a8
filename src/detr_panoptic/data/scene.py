"""One synthetic street scene: an ordered list of textured polygons (``Scene``, built by ``build_scene``
from a numpy ``Generator``), rasterised to Cityscapes label/instance ids (``rasterize``) and rendered to
RGB (``render``). ``data.synthetic`` writes scenes as a Cityscapes tree; see its docstring for what a scene
holds. The layers are drawn in a fixed order: the random stream, and so every generated dataset, depends
on it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from detr_panoptic.utils.errors import UserInputError

# Label ids (Cityscapes labels.py).
EGO_VEHICLE, RECTIFICATION_BORDER, OUT_OF_ROI = 1, 2, 3
ROAD, SIDEWALK, BUILDING, WALL, FENCE = 7, 8, 11, 12, 13
POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY = 17, 19, 20, 21, 22, 23
PERSON, RIDER, CAR, TRUCK, CARAVAN, TRAILER, BICYCLE = 24, 25, 26, 27, 29, 30, 33

# Texture kinds (a material mixes them with its own amplitudes).
NOISE, BLOTCH, WINDOWS, TILES, GRADIENT, STRIPES = range(6)
Point = tuple[float, float]


@dataclass
class Material:
    color: tuple[float, float, float]
    noise: float = 8.0            # per-pixel Gaussian noise (std, in 0..255 units)
    blotch: float = 0.0           # low-frequency noise amplitude
    windows: float = 0.0          # darkening of a window grid
    tiles: float = 0.0            # darkening of tile joints
    gradient: float = 0.0         # brightening towards the top of the image
    stripes: float = 0.0          # fine vertical stripes (bark, grilles)


@dataclass
class Scene:
    height: int
    width: int
    # (value written to instanceIds, material index, label name for polygons.json, polygon points)
    shapes: list[tuple[int, int, str, list[Point]]] = field(default_factory=list)
    materials: list[Material] = field(default_factory=list)

    def material(self, material: Material) -> int:
        self.materials.append(material)
        return len(self.materials) - 1

    def add(self, value: int, material: int, label: str, polygon: Sequence[Point]) -> None:
        self.shapes.append((value, material, label, [(float(x), float(y)) for x, y in polygon]))


# ---------------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------------
def _rect(x0: float, y0: float, x1: float, y1: float) -> list[Point]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 16) -> list[Point]:
    return [(cx + rx * math.cos(2 * math.pi * i / n), cy + ry * math.sin(2 * math.pi * i / n)) for i in range(n)]


def _ring(cx: float, cy: float, r: float, thickness: float, n: int = 16) -> list[Point]:
    """A closed ring as one polygon (outer circle, then inner circle backwards, joined by a slit)."""
    outer = _ellipse(cx, cy, r, r, n) + [(cx + r, cy)]
    inner_r = max(r - thickness, 0.0)
    inner = [(cx + inner_r * math.cos(-2 * math.pi * i / n), cy + inner_r * math.sin(-2 * math.pi * i / n))
             for i in range(n + 1)]
    return outer + inner


def _bar(p: Point, q: Point, thickness: float) -> list[Point]:
    """A thick segment from p to q as a quadrilateral."""
    dx, dy = q[0] - p[0], q[1] - p[1]
    length = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / length * thickness / 2, dx / length * thickness / 2
    return [(p[0] + nx, p[1] + ny), (q[0] + nx, q[1] + ny), (q[0] - nx, q[1] - ny), (p[0] - nx, p[1] - ny)]


def _jitter(rng: np.random.Generator, color: Sequence[float], amount: float) -> tuple[float, float, float]:
    c = np.clip(np.asarray(color, float) + rng.normal(0, amount, 3), 0, 255)
    return (float(c[0]), float(c[1]), float(c[2]))


# ---------------------------------------------------------------------------------------------------
# Scene layout
# ---------------------------------------------------------------------------------------------------
def _stuff(scene: Scene, rng: np.random.Generator, horizon: float, street_furniture: bool = True
           ) -> tuple[float, float, float]:
    """Background layers; returns the road's (vanishing x, half width at the horizon, half width at bottom).

    ``street_furniture=False`` leaves out fences, poles, traffic signs and traffic lights. The layers are
    drawn in this order (the random stream, and so every generated dataset, depends on it)."""
    _sky_and_buildings(scene, rng, horizon)
    road = _ground_and_road(scene, rng, horizon)
    _fence_and_trees(scene, rng, horizon, street_furniture)
    if street_furniture:
        _poles(scene, rng, horizon, *road)
    return road


def _sky_and_buildings(scene: Scene, rng: np.random.Generator, horizon: float) -> None:
    h, w = scene.height, scene.width
    sky = scene.material(Material(_jitter(rng, (110, 160, 215), 12), noise=3, gradient=45, blotch=6))
    scene.add(SKY, sky, "sky", _rect(-1, -1, w + 1, horizon + 2))

    x = -rng.uniform(0, 0.05) * w
    while x < w:
        bw = rng.uniform(0.07, 0.22) * w
        top = max(horizon - rng.uniform(0.12, 0.38) * h, 0.0)
        label_id, name = (WALL, "wall") if rng.random() < 0.08 else (BUILDING, "building")
        tone = rng.uniform(90, 190)
        mat = scene.material(Material(_jitter(rng, (tone, tone * rng.uniform(0.85, 1.0), tone * rng.uniform(0.7, 0.95)), 10),
                                      noise=6, windows=rng.uniform(35, 70) if label_id == BUILDING else 0,
                                      blotch=10))
        scene.add(label_id, mat, name, _rect(x, top, x + bw, horizon + 0.02 * h))
        x += bw


def _ground_and_road(scene: Scene, rng: np.random.Generator, horizon: float) -> tuple[float, float, float]:
    """Sidewalk, maybe terrain, the road and its markings; the road's (vanishing x, half widths)."""
    h, w = scene.height, scene.width
    ground = scene.material(Material(_jitter(rng, (175, 150, 165), 10), noise=7, tiles=30))
    scene.add(SIDEWALK, ground, "sidewalk", _rect(-1, horizon, w + 1, h + 1))
    if rng.random() < 0.6:
        terrain = scene.material(Material(_jitter(rng, (140, 170, 95), 12), noise=12, blotch=25))
        side = rng.random() < 0.5
        y0 = horizon + rng.uniform(0.05, 0.2) * (h - horizon)
        xa = 0 if side else w
        scene.add(TERRAIN, terrain, "terrain", [(xa, y0), (xa + (1 if side else -1) * rng.uniform(0.1, 0.25) * w, y0),
                                                (xa, y0 + rng.uniform(0.2, 0.5) * (h - horizon))])

    vanish = w * rng.uniform(0.35, 0.65)
    top_half = w * rng.uniform(0.04, 0.1)
    bottom_half = w * rng.uniform(0.4, 0.7)
    road = scene.material(Material(_jitter(rng, (85, 80, 88), 8), noise=10, blotch=8))
    scene.add(ROAD, road, "road", [(vanish - top_half, horizon), (vanish + top_half, horizon),
                                   (vanish + bottom_half, h + 1), (vanish - bottom_half, h + 1)])
    marking = scene.material(Material(_jitter(rng, (225, 225, 215), 6), noise=8))
    t = 0.08
    while t < 1.0:
        t2 = min(t + 0.07 + 0.05 * t, 1.0)
        y_a, y_b = horizon + t * t * (h - horizon), horizon + t2 * t2 * (h - horizon)
        scene.add(ROAD, marking, "road", _bar((vanish, y_a), (vanish, y_b), max(1.0, 0.012 * w * t)))
        t = t2 + 0.06 + 0.05 * t
    return vanish, top_half, bottom_half


def _fence_and_trees(scene: Scene, rng: np.random.Generator, horizon: float, street_furniture: bool) -> None:
    h, w = scene.height, scene.width
    if street_furniture and rng.random() < 0.35:
        fence = scene.material(Material(_jitter(rng, (150, 130, 115), 10), noise=6, stripes=40))
        x0 = rng.uniform(0, 0.6) * w
        scene.add(FENCE, fence, "fence", _rect(x0, horizon - 0.05 * h, x0 + rng.uniform(0.1, 0.3) * w, horizon + 0.01 * h))

    for _ in range(rng.integers(1, 5)):  # trees: a trunk and a blobby crown, all vegetation
        cx = rng.uniform(0, w)
        base = horizon + rng.uniform(0.0, 0.15) * (h - horizon)
        size = rng.uniform(0.06, 0.16) * h
        crown = scene.material(Material(_jitter(rng, (70, 120, 40), 15), noise=14, blotch=35))
        trunk = scene.material(Material(_jitter(rng, (95, 75, 55), 10), noise=8, stripes=20))
        scene.add(VEGETATION, trunk, "vegetation", _rect(cx - 0.08 * size, base - 1.3 * size, cx + 0.08 * size, base))
        for _ in range(3):
            scene.add(VEGETATION, crown, "vegetation",
                      _ellipse(cx + rng.uniform(-0.3, 0.3) * size, base - size * rng.uniform(1.4, 1.9),
                               size * rng.uniform(0.45, 0.75), size * rng.uniform(0.4, 0.6), 12))


def _poles(scene: Scene, rng: np.random.Generator, horizon: float, vanish: float, top_half: float,
           bottom_half: float) -> None:
    """Poles at the road sides, most carrying a traffic sign or a traffic light."""
    h, w = scene.height, scene.width
    pole_mat = scene.material(Material(_jitter(rng, (150, 150, 150), 10), noise=5, stripes=10))
    for _ in range(rng.integers(0, 4)):
        left = rng.random() < 0.5
        foot = horizon + rng.uniform(0.15, 0.8) * (h - horizon)
        s = (foot - horizon) / (h - horizon)
        px = (vanish - top_half - (bottom_half - top_half) * s * rng.uniform(1.1, 1.4) if left
              else vanish + top_half + (bottom_half - top_half) * s * rng.uniform(1.1, 1.4))
        height, thick = (0.25 + 0.55 * s) * h, max(1.0, 0.012 * w * s)
        scene.add(POLE, pole_mat, "pole", _rect(px - thick, foot - height, px + thick, foot))
        top = foot - height
        if rng.random() < 0.6:
            sign = scene.material(Material(_jitter(rng, (215, 205, 40), 12), noise=6))
            r = max(1.5, 0.04 * h * (0.3 + s))
            shape = _ellipse(px, top, r, r, 10) if rng.random() < 0.5 else [(px - r, top - r), (px + r, top - r), (px, top + r)]
            scene.add(TRAFFIC_SIGN, sign, "traffic sign", shape)
        elif rng.random() < 0.5:
            light = scene.material(Material(_jitter(rng, (35, 35, 30), 5), noise=5, windows=-120))
            r = max(1.5, 0.02 * h * (0.3 + s))
            scene.add(TRAFFIC_LIGHT, light, "traffic light", _rect(px - r, top - 3 * r, px + r, top + 3 * r))


def _car(scene: Scene, rng: np.random.Generator, value: int, label: str, fx: float, fy: float, scale: float,
         truck: bool = False) -> None:
    h = scene.height
    length = scale * h * (0.55 if truck else rng.uniform(0.36, 0.46))
    body_h = scale * h * (0.32 if truck else 0.13)
    paint = scene.material(Material(_jitter(rng, rng.uniform(30, 230, 3), 5), noise=7, blotch=6))
    glass = scene.material(Material(_jitter(rng, (45, 60, 80), 8), noise=5, gradient=20))
    rubber = scene.material(Material(_jitter(rng, (25, 25, 25), 4), noise=4))
    wheel_r = scale * h * (0.05 if truck else 0.04)
    x0, x1 = fx - length / 2, fx + length / 2
    bottom = fy - wheel_r * 0.8
    if truck:
        cab_w = length * 0.28
        scene.add(value, paint, label, _rect(x0 + cab_w, bottom - body_h, x1, bottom))
        cab = scene.material(Material(_jitter(rng, rng.uniform(40, 220, 3), 5), noise=7))
        scene.add(value, cab, label, [(x0, bottom), (x0, bottom - body_h * 0.55), (x0 + cab_w * 0.3, bottom - body_h * 0.75),
                                      (x0 + cab_w, bottom - body_h * 0.75), (x0 + cab_w, bottom)])
        scene.add(value, glass, label, _rect(x0 + cab_w * 0.3, bottom - body_h * 0.7, x0 + cab_w * 0.9, bottom - body_h * 0.5))
        wheels = (x0 + cab_w * 0.5, x1 - length * 0.25, x1 - length * 0.1)
    else:
        scene.add(value, paint, label, [(x0, bottom), (x0, bottom - body_h * 0.8), (x0 + length * 0.05, bottom - body_h),
                                        (x1 - length * 0.04, bottom - body_h), (x1, bottom - body_h * 0.7), (x1, bottom)])
        cabin = [(x0 + length * 0.2, bottom - body_h), (x0 + length * 0.32, bottom - body_h * 1.8),
                 (x1 - length * 0.3, bottom - body_h * 1.8), (x1 - length * 0.15, bottom - body_h)]
        scene.add(value, paint, label, cabin)
        scene.add(value, glass, label, [(x0 + length * 0.25, bottom - body_h * 1.05), (x0 + length * 0.34, bottom - body_h * 1.7),
                                        (x1 - length * 0.32, bottom - body_h * 1.7), (x1 - length * 0.2, bottom - body_h * 1.05)])
        wheels = (x0 + length * 0.2, x1 - length * 0.2)
    for wx in wheels:
        scene.add(value, rubber, label, _ellipse(wx, fy - wheel_r, wheel_r, wheel_r, 12))


def _person(scene: Scene, rng: np.random.Generator, value: int, label: str, fx: float, fy: float, scale: float,
            seated: bool = False) -> None:
    h = scene.height
    tall = scale * h * rng.uniform(0.36, 0.44)
    width = tall * 0.26
    skin = scene.material(Material(_jitter(rng, (215, 170, 135), 20), noise=5))
    shirt = scene.material(Material(_jitter(rng, rng.uniform(20, 240, 3), 10), noise=10, blotch=10))
    trousers = scene.material(Material(_jitter(rng, rng.uniform(20, 110, 3), 10), noise=8, stripes=8))
    head_r = tall * 0.08
    hip = fy - tall * 0.47
    shoulder = fy - tall * 0.82
    if seated:  # legs bent forward towards the pedals
        knee = (fx + width * 0.9, hip + tall * 0.05)
        scene.add(value, trousers, label, _bar((fx, hip), knee, width * 0.4))
        scene.add(value, trousers, label, _bar(knee, (fx + width * 0.8, fy), width * 0.35))
    else:
        stride = width * rng.uniform(0.0, 0.5)
        scene.add(value, trousers, label, _bar((fx - width * 0.2, hip), (fx - width * 0.2 - stride, fy), width * 0.4))
        scene.add(value, trousers, label, _bar((fx + width * 0.2, hip), (fx + width * 0.2 + stride, fy), width * 0.4))
    scene.add(value, shirt, label, [(fx - width / 2, shoulder), (fx + width / 2, shoulder),
                                    (fx + width * 0.42, hip + tall * 0.03), (fx - width * 0.42, hip + tall * 0.03)])
    arm_end = (fx + width * 1.1, hip - tall * 0.1) if seated else (fx + width * 0.6, hip)
    scene.add(value, shirt, label, _bar((fx + width * 0.4, shoulder + head_r * 0.3), arm_end, width * 0.25))
    scene.add(value, skin, label, _ellipse(fx, shoulder - head_r * 1.1, head_r * 0.9, head_r * 1.1, 12))


def _bicycle(scene: Scene, rng: np.random.Generator, value: int, label: str, fx: float, fy: float, scale: float) -> float:
    """Draws a bicycle centred at fx; returns the saddle's x."""
    h = scene.height
    r = scale * h * 0.075
    gap = r * 2.4
    frame = scene.material(Material(_jitter(rng, rng.uniform(40, 230, 3), 10), noise=6))
    tyre = scene.material(Material(_jitter(rng, (30, 30, 30), 4), noise=4))
    back, front = (fx - gap / 2, fy - r), (fx + gap / 2, fy - r)
    thick = max(1.0, r * 0.18)
    scene.add(value, tyre, label, _ring(back[0], back[1], r, thick * 1.3))
    scene.add(value, tyre, label, _ring(front[0], front[1], r, thick * 1.3))
    saddle = (fx - gap * 0.1, fy - r * 2.1)
    bar = (fx + gap * 0.35, fy - r * 2.3)
    pedal = (fx, fy - r)
    for p, q in ((back, pedal), (pedal, saddle), (saddle, back), (pedal, bar), (bar, front), (saddle, bar)):
        scene.add(value, frame, label, _bar(p, q, thick))
    return saddle[0]


def _road_x(rng: np.random.Generator, vanish: float, top_half: float, bottom_half: float, s: float) -> float:
    half = top_half + (bottom_half - top_half) * s
    return vanish + rng.uniform(-0.85, 0.85) * half


def _side_x(rng: np.random.Generator, w: float, vanish: float, top_half: float, bottom_half: float, s: float) -> float:
    half = top_half + (bottom_half - top_half) * s
    if rng.random() < 0.5:
        return rng.uniform(max(0.0, vanish - half - 0.35 * w), max(1.0, vanish - half * 1.02))
    return rng.uniform(min(w - 1.0, vanish + half * 1.02), min(w, vanish + half + 0.35 * w))


@dataclass(frozen=True)
class SceneOptions:
    """What the generated scenes contain (the defaults: the full mix described in the module docstring).

    ``density`` scales the number of cars, persons, riders and bicycles (1: 2-13 things per image);
    ``near`` is the nearest-to-farthest placement bound of things in 0..1 (0.12: things from the horizon to
    the bottom edge; larger values keep them closer to the camera, hence larger); ``street_furniture``
    draws fences, poles, traffic signs and traffic lights (thin structures only a few pixels wide at low
    resolution).
    """

    density: float = 1.0
    near: float = 0.12
    street_furniture: bool = True

    def __post_init__(self) -> None:
        if not (self.density >= 0):
            raise UserInputError(f"scene density must be >= 0, got {self.density!r}")
        if not (0.0 <= self.near < 0.95):
            raise UserInputError(f"scene 'near' must be in [0, 0.95), got {self.near!r}")


def build_scene(rng: np.random.Generator, height: int, width: int, *, things: bool = True,
                options: SceneOptions | None = None) -> Scene:
    """A random street scene as an ordered list of labelled polygons (see the module docstring and
    ``SceneOptions``; default: the full mix)."""
    options = options if options is not None else SceneOptions()
    density = options.density
    scene = Scene(height, width)
    horizon = height * rng.uniform(0.36, 0.5)
    vanish, top_half, bottom_half = _stuff(scene, rng, horizon, options.street_furniture)
    span = height - horizon

    # Things, each as (foot y, kind); drawn far (small y) to near.
    objects: list[tuple[float, str]] = []
    if things:
        def count(low: int, high: int) -> int:
            return round(int(rng.integers(low, high)) * density)

        kinds = (["car"] * count(1, 6) + ["person"] * count(1, 6) + ["rider"] * count(0, 3)
                 + ["bicycle"] * count(0, 3))
        if rng.random() < 0.3:
            kinds.append("truck")
        if rng.random() < 0.15:
            kinds.append("caravan" if rng.random() < 0.5 else "trailer")
        if rng.random() < 0.45:
            kinds.append("persongroup" if rng.random() < 0.6 else "cargroup")
        objects = [(horizon + rng.uniform(options.near, 0.95) ** 1.3 * span, kind) for kind in kinds]
        objects.sort()
    counters: dict[int, int] = {}

    def instance(class_id: int) -> int:
        k = counters.get(class_id, 0)
        counters[class_id] = k + 1
        return class_id * 1000 + k

    for fy, kind in objects:
        s = max((fy - horizon) / span, 0.08)
        scale = 0.2 + 1.1 * s
        if kind in ("car", "truck", "caravan", "trailer"):
            class_id = {"car": CAR, "truck": TRUCK, "caravan": CARAVAN, "trailer": TRAILER}[kind]
            _car(scene, rng, instance(class_id), kind, _road_x(rng, vanish, top_half, bottom_half, s), fy, scale,
                 truck=kind != "car")
        elif kind == "person":
            _person(scene, rng, instance(PERSON), "person", _side_x(rng, width, vanish, top_half, bottom_half, s), fy, scale)
        elif kind == "bicycle":
            _bicycle(scene, rng, instance(BICYCLE), "bicycle", _side_x(rng, width, vanish, top_half, bottom_half, s), fy, scale)
        elif kind == "rider":
            x = _road_x(rng, vanish, top_half, bottom_half, s)
            saddle = _bicycle(scene, rng, instance(BICYCLE), "bicycle", x, fy, scale)
            _person(scene, rng, instance(RIDER), "rider", saddle, fy - scale * height * 0.16, scale * 0.9, seated=True)
        elif kind == "persongroup":  # a crowd: several overlapping persons with the class id as value
            x = _side_x(rng, width, vanish, top_half, bottom_half, s)
            for j in range(int(rng.integers(3, 7))):
                _person(scene, rng, PERSON, "persongroup", x + j * scale * height * 0.05, fy + rng.uniform(-2, 2) * s,
                        scale * rng.uniform(0.85, 1.0))
        elif kind == "cargroup":
            x = _road_x(rng, vanish, top_half, bottom_half, s)
            for j in range(int(rng.integers(2, 4))):
                _car(scene, rng, CAR, "cargroup", x + j * scale * height * 0.2, fy - j * 2 * s, scale * 0.9)

    if rng.random() < 0.5:  # the ego vehicle's bonnet along the bottom edge
        bonnet = scene.material(Material(_jitter(rng, (40, 40, 45), 6), noise=4, gradient=15))
        top = height * (1 - rng.uniform(0.05, 0.12))
        scene.add(EGO_VEHICLE, bonnet, "ego vehicle",
                  [(-1, height + 1), (-1, top + 0.04 * height), (width * 0.25, top), (width * 0.75, top),
                   (width + 1, top + 0.04 * height), (width + 1, height + 1)])
    if rng.random() < 0.3:  # a black out-of-ROI frame
        black = scene.material(Material((0.0, 0.0, 0.0), noise=0))
        t = max(1.0, 0.006 * width)
        for rect in (_rect(-1, -1, width + 1, t), _rect(-1, height - t, width + 1, height + 1),
                     _rect(-1, -1, t, height + 1), _rect(width - t, -1, width + 1, height + 1)):
            scene.add(OUT_OF_ROI, black, "out of roi", rect)
    return scene


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------
def rasterize(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(instance ids uint16 [H, W], material index int32 [H, W]) with later shapes on top."""
    ids = Image.new("I", (scene.width, scene.height), 0)
    materials = Image.new("I", (scene.width, scene.height), 0)
    draw_ids, draw_materials = ImageDraw.Draw(ids), ImageDraw.Draw(materials)
    for value, material, _, polygon in scene.shapes:
        points = [(round(x), round(y)) for x, y in polygon]
        draw_ids.polygon(points, fill=value)
        draw_materials.polygon(points, fill=material)
    return np.asarray(ids).astype(np.uint16), np.asarray(materials)


def _low_frequency(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    grid = rng.standard_normal((height // cell + 2, width // cell + 2)).astype(np.float32)
    small = Image.fromarray(grid, mode="F")
    return np.asarray(small.resize(((width // cell + 2) * cell, (height // cell + 2) * cell), Image.BILINEAR))[:height, :width]


def render(scene: Scene, material_map: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The RGB image uint8 [H, W, 3]: each pixel = its material's colour + that material's textures."""
    h, w = scene.height, scene.width
    table = np.array([[*m.color, m.noise, m.blotch, m.windows, m.tiles, m.gradient, m.stripes]
                      for m in scene.materials], np.float32)
    per_pixel = table[material_map]  # [H, W, 9]: r, g, b, noise, blotch, windows, tiles, gradient, stripes
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    cell = max(4, int(0.02 * w))
    windows = (((xx // cell) % 2 == 1) & ((yy // cell) % 3 != 0)).astype(np.float32)
    tile = max(4, int(0.03 * w))
    tiles = (((xx % tile) < max(1, tile // 8)) | ((yy % (tile // 2 + 1)) < 1)).astype(np.float32)
    gradient = 1.0 - yy / h
    stripes = ((xx // max(1, w // 400)) % 2).astype(np.float32)
    blotch = _low_frequency(rng, h, w, max(2, w // 60))
    shade = (per_pixel[..., 4] * blotch - per_pixel[..., 5] * windows - per_pixel[..., 6] * tiles
             + per_pixel[..., 7] * gradient - per_pixel[..., 8] * stripes)
    image = per_pixel[..., :3] + shade[..., None]
    image += per_pixel[..., 3:4] * rng.standard_normal((h, w, 3), dtype=np.float32)
    image *= rng.uniform(0.8, 1.15)  # global exposure
    return np.clip(image, 0, 255).astype(np.uint8)
