"""A small synthetic Cityscapes tree: official layout and names, real polygon JSONs, learnable images.

Each frame is a street scene drawn as Cityscapes polygons, back to front: sky, buildings,
trees, road and sidewalks in perspective, poles with signs and lights, vehicles, people,
then the void classes the real data has (ego vehicle, rectification border, out of roi).
The JSONs carry the real dataset's quirks: deleted objects, cargroup/persongroup, license
plates on cars, polygons leaving the image. `_gtFine_labelIds.png` is rendered from the JSON
by our rasteriser ("ids"), which equals cityscapesscripts' json2labelImg. The image colours
each label region by class: a class colour plus a class texture (window grid, paving lines,
leafy blotches, sky gradient, fine grain), so a model can learn the classes from pixels.

Layout written, the files of the real gtFine_trainvaltest release (with_test adds the test
split: images, and in gtFine/test the release's placeholders, whose polygons hold only what
camera calibration knows: ego vehicle, rectification border, out of roi):

    OUT/leftImg8bit/{train,val[,test]}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    OUT/gtFine/{train,val[,test]}/<city>/<city>_<seq>_<frame>_gtFine_polygons.json
    OUT/gtFine/{train,val[,test]}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png     uint8
    OUT/gtFine/{train,val[,test]}/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png  uint16
    OUT/gtFine/{train,val[,test]}/<city>/<city>_<seq>_<frame>_gtFine_color.png        RGBA

labelIds and color are json2labelImg's "ids" and "color" encodings, instanceIds is
json2instanceImg's (id * 1000 + instance for classes with instances, the plain id for
groups and stuff), pixel for pixel.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from cache.errors import UserError
from dataprep.rasterize import Polygons, PolygonObject, render_label_image

# what the release's gtFine/test polygons hold: only the regions known without annotating
CALIBRATION_LABELS = ("ego vehicle", "rectification border", "out of roi")

DEFAULT_CITIES = ("aachen", "bochum", "cologne", "darmstadt")


def write_synthetic_tree(out: str | Path, frames: int, *, height: int = 1024, width: int = 2048,
                         seed: int = 0, cities: tuple[str, ...] = DEFAULT_CITIES,
                         val_fraction: float = 0.25, with_test: bool = False, photo: bool = False,
                         workers: int = 1, progress=None) -> dict[str, list[str]]:
    """Write `frames` labelled frames in total (train + val) under `out`; split -> sorted frame names.

    val gets max(2, round(frames * val_fraction)) frames and train the rest, so each has at
    least 2 frames; frames are dealt to `cities` in turn, so with 2+ cities each split spans
    2+ cities. with_test adds a test split of as many frames as val, with the release's
    placeholder ground truth (see the module docstring). The same
    arguments give the same files byte for byte, whatever `workers`.

    photo: photo-like images (`photo_like`), PNGs of ~2.3 MB at 2048x1024 as the real ones.
    workers: processes that write frames (each frame has its own seeded generator, so the
    output does not depend on it); progress() is called once per frame written.
    """
    counts = _split_counts(frames, val_fraction, with_test)
    if len(cities) < 2 or len(set(cities)) != len(cities):
        raise UserError(f"cities must be at least 2 distinct names, got {cities!r}")
    if height < 64 or width < 64:
        raise UserError(f"synthetic frames must be at least 64x64, got {width}x{height}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    out = Path(out)
    names, tasks = {}, []
    for split_index, (split, count) in enumerate(counts.items()):
        names[split] = []
        for i in range(count):
            city = cities[i % len(cities)]
            # seq numbers differ per split so that no two frames of the tree share a name
            stem = f"{city}_{split_index * 1000 + i // len(cities):06d}_{19 + 10 * i:06d}"
            tasks.append((out, split, city, stem, (seed, split_index, i), height, width, split != "test", photo))
            names[split].append(f"{city}/{stem}")
        names[split].sort()
    _run_frame_tasks(tasks, workers, progress)
    return names


def synthetic_frame_count(frames: int, *, val_fraction: float = 0.25, with_test: bool = False) -> int:
    """How many frames write_synthetic_tree writes (the total of its progress)."""
    return sum(_split_counts(frames, val_fraction, with_test).values())


def _frame_task(task) -> None:
    out, split, city, stem, seeds, height, width, labelled, photo = task
    _write_frame(out, split, city, stem, np.random.default_rng(list(seeds)), height, width, labelled,
                 photo=photo)


def _run_frame_tasks(tasks: list, workers: int | None, progress) -> None:
    """Every frame task, in this process (workers=1) or a pool of `workers` (None: every core)."""
    from dataprep.build import default_workers, worker_context

    workers = min(workers or default_workers(), len(tasks))
    if workers <= 1:
        for task in tasks:
            _frame_task(task)
            if progress is not None:
                progress()
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=worker_context()) as pool:
        for _ in pool.map(_frame_task, tasks, chunksize=1):
            if progress is not None:
                progress()


def _json_text(doc: dict) -> str:
    """One object per line: readable, and written by json's C encoder (indent= is pure Python, 10x slower)."""
    head = {key: value for key, value in doc.items() if key != "objects"}
    objects = ",\n".join("        " + json.dumps(obj) for obj in doc["objects"])
    return json.dumps(head)[:-1] + ', "objects": [\n' + objects + "\n    ]\n}\n"


def _split_counts(frames: int, val_fraction: float, with_test: bool) -> dict[str, int]:
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n_val = max(2, round(frames * val_fraction))
    if frames - n_val < 2:
        raise UserError(f"need at least 4 synthetic frames (2 train, 2 val), got {frames}")
    counts = {"train": frames - n_val, "val": n_val}
    if with_test:
        counts["test"] = n_val
    return counts


def synthetic_frame(rng: np.random.Generator, height: int, width: int):
    """(polygon document as written to JSON, labelIds uint8 (H, W), RGB image uint8 (H, W, 3))."""
    doc = {"imgHeight": height, "imgWidth": width, "objects": compose_scene(rng, height, width)}
    ids = _label_ids(doc)
    return doc, ids, paint_image(ids, rng)


def _label_ids(doc: dict) -> np.ndarray:
    """labelIds uint8 (H, W) of a polygon document (json2labelImg's "ids", by our rasteriser)."""
    objects = [PolygonObject(o["label"], o["polygon"], bool(o.get("deleted", 0))) for o in doc["objects"]]
    return render_label_image(Polygons(doc["imgHeight"], doc["imgWidth"], objects, "<synthetic>"), "ids")


def _write_frame(out: Path, split: str, city: str, stem: str, rng: np.random.Generator,
                 height: int, width: int, labelled: bool, photo: bool = False) -> None:
    doc, ids, rgb = synthetic_frame(rng, height, width)
    image_dir = out / "leftImg8bit" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    if photo:  # zlib's default level, as the real PNGs: their size and decode cost
        Image.fromarray(photo_like(rgb, rng)).save(image_dir / f"{stem}_leftImg8bit.png")
    else:  # compress_level=1: the pixels decode the same, and writing is several times faster
        Image.fromarray(rgb).save(image_dir / f"{stem}_leftImg8bit.png", compress_level=1)
    if not labelled:
        doc = placeholder_document(doc)
        ids = _label_ids(doc)
    write_ground_truth(out / "gtFine" / split / city, stem, doc, ids)


def placeholder_document(doc: dict) -> dict:
    """The polygon document the release ships for a test frame: the calibration regions only."""
    objects = [o for o in doc["objects"] if o["label"] in CALIBRATION_LABELS and not o.get("deleted")]
    return {"imgHeight": doc["imgHeight"], "imgWidth": doc["imgWidth"], "objects": objects}


def write_ground_truth(gt_dir: Path, stem: str, doc: dict, ids: np.ndarray) -> None:
    """The four gtFine files of a frame, as cityscapesscripts makes them from the polygons."""
    gt_dir.mkdir(parents=True, exist_ok=True)
    text = _json_text(doc)
    (gt_dir / f"{stem}_gtFine_polygons.json").write_text(text)
    Image.fromarray(ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")
    Image.fromarray(instance_ids(text)).save(gt_dir / f"{stem}_gtFine_instanceIds.png", compress_level=1)
    Image.fromarray(_COLOURS[ids]).save(gt_dir / f"{stem}_gtFine_color.png", compress_level=1)


def instance_ids(json_text: str) -> np.ndarray:
    """uint16 (H, W): json2instanceImg's image. Its own save fails with recent Pillow (13 here
    writes no 32-bit "I" PNG); older Pillow wrote these values as a 16-bit PNG, as we do."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage

    annotation = Annotation()
    annotation.fromJsonText(json_text)
    return np.asarray(createInstanceImage(annotation, "ids"), dtype=np.uint16)


def _colour_table() -> np.ndarray:
    """labelId -> RGBA: json2labelImg's "color" draws label.color, opaque, where "ids" draws label.id."""
    from cityscapesscripts.helpers.labels import labels
    table = np.zeros((256, 4), np.uint8)
    table[:, 3] = 255
    for label in labels:
        if label.id >= 0:
            table[label.id, :3] = label.color
    return table


_COLOURS = _colour_table()


# --- scene geometry -------------------------------------------------------------------------
# Shapes in metres: (x right, height up) around the object's ground point. A metre is
# M_PER_WIDTH * width * depth pixels, depth = 0 at the horizon and 1 at the image bottom.
M_PER_WIDTH = 0.12
PERSON = [(-0.22, 0), (-0.05, 0), (0, 0.8), (0.05, 0), (0.22, 0), (0.14, 0.9), (0.25, 1.0),
          (0.25, 1.4), (0.1, 1.5), (0.1, 1.55), (0.12, 1.7), (0, 1.78), (-0.12, 1.7), (-0.1, 1.55),
          (-0.1, 1.5), (-0.25, 1.4), (-0.25, 1.0), (-0.14, 0.9)]
RIDER = [(-0.3, 0.5), (0.2, 0.5), (0.3, 0.9), (0.35, 1.3), (0.15, 1.45), (0.12, 1.6), (0, 1.7),
         (-0.12, 1.6), (-0.1, 1.45), (-0.3, 1.3), (-0.35, 0.9)]
BICYCLE = [(-0.85, 0), (-0.15, 0), (0, 0.3), (0.15, 0), (0.85, 0), (0.85, 0.7), (0.4, 0.9),
           (0.3, 1.0), (-0.4, 0.9), (-0.85, 0.7)]
MOTORCYCLE = [(-1.0, 0), (1.0, 0), (1.0, 0.6), (0.6, 0.9), (0.2, 1.0), (-0.4, 0.85), (-1.0, 0.7)]
CAR_BACK = [(-0.9, 0), (0.9, 0), (0.92, 0.9), (0.7, 1.45), (-0.7, 1.45), (-0.92, 0.9)]
CAR_SIDE = [(-2.15, 0), (2.15, 0), (2.2, 0.7), (1.2, 0.85), (0.7, 1.45), (-1.1, 1.5), (-1.7, 0.9),
            (-2.2, 0.8)]
LICENSE_PLATE = [(-0.26, 0.38), (0.26, 0.38), (0.26, 0.5), (-0.26, 0.5)]
TRUCK_SIDE = [(-3.5, 0), (3.5, 0), (3.5, 2.4), (3.2, 2.9), (2.2, 2.9), (2.2, 3.4), (-3.5, 3.4)]
TRUCK_BACK = [(-1.25, 0), (1.25, 0), (1.25, 3.4), (-1.25, 3.4)]
BUS = [(-5.5, 0), (5.5, 0), (5.5, 2.9), (5.2, 3.2), (-5.2, 3.2), (-5.5, 2.9)]
TRAIN = [(-12, 0), (12, 0), (12, 3.4), (11, 3.9), (-11, 3.9), (-12, 3.4)]
PERSON_GROUP = [(-1.2, 0), (1.2, 0), (1.1, 1.6), (0.7, 1.75), (0.4, 1.6), (0, 1.8), (-0.4, 1.65),
                (-0.8, 1.75), (-1.1, 1.6)]
CAR_GROUP = [(-4.5, 0), (4.5, 0), (4.4, 1.3), (2.5, 1.5), (0.5, 1.35), (-1.5, 1.5), (-4.4, 1.35)]
STATIC_BIN = [(-0.35, 0), (0.35, 0), (0.35, 1.0), (-0.35, 1.0)]
DYNAMIC_CART = [(-0.4, 0), (0.4, 0), (0.45, 0.9), (-0.45, 0.9)]


class _SceneBuilder:
    """Builds one frame's object list in drawing order (back to front), as in the real JSONs."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.rng, self.h, self.w = rng, height, width
        self.horizon = height * rng.uniform(0.40, 0.50)
        self.vx = width * rng.uniform(0.4, 0.6)
        self.road_bottom = (width * rng.uniform(-0.15, 0.1), width * rng.uniform(0.9, 1.15))
        self.background: list[dict] = []
        self.depth_sorted: list[tuple[float, list[dict]]] = []  # (ground y, objects) drawn far to near

    # geometry helpers
    def y_at(self, depth: float) -> float:
        return self.horizon + depth * (self.h - self.horizon)

    def metre(self, ground_y: float) -> float:
        return M_PER_WIDTH * self.w * max((ground_y - self.horizon) / (self.h - self.horizon), 0.004)

    def road_edge(self, y: float, side: int) -> float:
        """x of the road's left (side=0) or right (side=1) edge at image row y."""
        t = (y - self.horizon) / (self.h - self.horizon)
        top = self.vx + (0.015 if side else -0.015) * self.w
        return top + t * (self.road_bottom[side] - top)

    def sidewalk_outer(self, y: float, side: int) -> float:
        t = (y - self.horizon) / (self.h - self.horizon)
        return self.road_edge(y, side) + (1 if side else -1) * (0.006 + 0.55 * t) * self.w

    def sidewalk_point(self, depth: float, side: int, across: float) -> tuple[float, float]:
        y = self.y_at(depth)
        inner, outer = self.road_edge(y, side), self.sidewalk_outer(y, side)
        return inner + across * (outer - inner), y

    def road_point(self, depth: float, across: float) -> tuple[float, float]:
        y = self.y_at(depth)
        return self.road_edge(y, 0) + across * (self.road_edge(y, 1) - self.road_edge(y, 0)), y

    def shape(self, points, ground: tuple[float, float], flip: bool = False) -> list[list[int]]:
        m, (gx, gy), sign = self.metre(ground[1]), ground, (-1 if flip else 1)
        return [[round(gx + sign * x * m), round(gy - y * m)] for x, y in points]

    def add(self, label: str, polygon) -> None:
        """A background object (sky, building, ground...): drawn before everything that stands."""
        self.background.append({"label": label, "polygon": _rounded(polygon)})

    def add_thing(self, parts: list[tuple[str, list]], ground_y: float) -> None:
        """Several polygons that belong together (car + plate, bicycle + rider) at one depth."""
        self.depth_sorted.append((ground_y, [{"label": label, "polygon": poly} for label, poly in parts]))

    def objects(self) -> list[dict]:
        ordered = sorted(self.depth_sorted, key=lambda item: item[0])
        return self.background + [obj for _, group in ordered for obj in group]


def compose_scene(rng: np.random.Generator, height: int, width: int) -> list[dict]:
    """The objects of one street scene as Cityscapes JSON objects, in drawing order."""
    scene = _SceneBuilder(rng, height, width)
    _add_sky_and_buildings(scene)
    _add_ground(scene)
    _add_roadside(scene)
    _add_vehicles(scene)
    _add_people(scene)
    _add_far_groups(scene)
    objects = scene.objects()
    _add_deleted(scene, objects)
    objects += _void_border(rng, height, width)
    step = 24.0  # pixels, at any size: small test frames stay light
    for obj in objects:
        obj["polygon"] = _densify(obj["polygon"], step, rng)
    return objects


def _densify(polygon: list[list[int]], step: float, rng: np.random.Generator) -> list[list[int]]:
    """A vertex every `step` pixels along each edge, jittered by a pixel, as annotators click.

    Real gtFine polygons are dense (thousands of points a frame); reading and drawing cost
    scales with that, so benchmarks on synthetic trees should see the same.
    """
    points = np.asarray(polygon, dtype=np.float64)
    if len(points) < 3:
        return polygon
    edges = np.roll(points, -1, axis=0) - points
    pieces = np.maximum(1, (np.hypot(edges[:, 0], edges[:, 1]) // step).astype(int))
    owner = np.repeat(np.arange(len(points)), pieces)
    fraction = (np.arange(owner.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)) / pieces[owner]
    dense = points[owner] + fraction[:, None] * edges[owner]
    inserted = fraction > 0  # the original corners stay exact
    dense[inserted] += rng.integers(-1, 2, size=(int(inserted.sum()), 2))
    return np.rint(dense).astype(int).tolist()


def _add_sky_and_buildings(scene: _SceneBuilder) -> None:
    rng, w, h = scene.rng, scene.w, scene.h
    scene.add("sky", [(-5, -5), (w + 5, -5), (w + 5, scene.horizon + 4), (-5, scene.horizon + 4)])
    x = -0.03 * w
    while x < 1.03 * w:
        block = w * rng.uniform(0.06, 0.2)
        if rng.random() > 0.15:  # leave some gaps where sky shows
            top = scene.horizon * (1 - rng.uniform(0.3, 1.1))  # above 0: leaves the image
            bottom = scene.horizon + 0.5 * (h - scene.horizon)
            roof = [(x, top), (x + block, top)]
            if rng.random() < 0.35:  # gable roof
                roof = [(x, top), (x + block / 2, top - 0.4 * block), (x + block, top)]
            scene.add("building", roof + [(x + block, bottom), (x, bottom)])
        x += block


def _add_ground(scene: _SceneBuilder) -> None:
    rng, h = scene.rng, scene.h
    far, below = scene.horizon, 1.1 * h  # the ground leaves the image at the bottom
    scene.add("road", [(scene.road_edge(far, 0), far), (scene.road_edge(far, 1), far),
                       (scene.road_edge(below, 1), below), (scene.road_edge(below, 0), below)])
    for side in (0, 1):
        scene.add("sidewalk", [(scene.road_edge(far, side), far), (scene.sidewalk_outer(far, side), far),
                               (scene.sidewalk_outer(below, side), below), (scene.road_edge(below, side), below)])
    side = int(rng.integers(2))
    _strip_along_sidewalk(scene, "terrain", side, rng.uniform(0.05, 0.2), rng.uniform(0.5, 0.9), 0.0, 1.4)
    if rng.random() < 0.7:
        _strip_along_sidewalk(scene, "wall", 1 - side, rng.uniform(0.02, 0.1), rng.uniform(0.3, 0.6), 0.0, 1.2)
    _strip_along_sidewalk(scene, "fence", side, rng.uniform(0.05, 0.15), rng.uniform(0.4, 0.8), 0.3, 1.6)
    if rng.random() < 0.5:
        a, b = sorted(rng.uniform(0.2, 0.8, size=2))
        scene.add("parking", [scene.road_point(a, 0.0), scene.road_point(a, 0.15),
                              scene.road_point(b, 0.15), scene.road_point(b, 0.0)])
    if rng.random() < 0.3:
        a, b = sorted(rng.uniform(0.1, 0.6, size=2))
        scene.add("ground", [scene.sidewalk_point(a, side, 0.3), scene.sidewalk_point(a, side, 0.7),
                             scene.sidewalk_point(b, side, 0.7), scene.sidewalk_point(b, side, 0.3)])


def _strip_along_sidewalk(scene: _SceneBuilder, label: str, side: int, near: float, far: float,
                          lift: float, tall: float) -> None:
    """A band standing on the sidewalk's outer edge between two depths, `tall` metres high."""
    points = []
    for depth in (near, far):
        y = scene.y_at(depth)
        points.append((scene.sidewalk_outer(y, side), y - lift * scene.metre(y)))
    top = [(x, y - tall * scene.metre(scene.y_at(d))) for (x, y), d in zip(points, (near, far))]
    scene.add(label, [points[0], points[1], top[1], top[0]])


def _add_roadside(scene: _SceneBuilder) -> None:
    rng = scene.rng
    for _ in range(int(rng.integers(2, 6))):  # trees: crown and trunk are both vegetation
        side, depth = int(rng.integers(2)), rng.uniform(0.05, 0.8)
        gx, gy = scene.sidewalk_point(depth, side, rng.uniform(0.6, 0.9))
        m = scene.metre(gy)
        trunk = [(gx - 0.15 * m, gy), (gx + 0.15 * m, gy), (gx + 0.15 * m, gy - 3 * m), (gx - 0.15 * m, gy - 3 * m)]
        angles = np.linspace(0, 2 * np.pi, 14, endpoint=False)
        radius = 1.8 * m * rng.uniform(0.75, 1.1, size=angles.size)
        crown = list(zip(gx + radius * np.cos(angles), gy - 4.2 * m + radius * np.sin(angles)))
        scene.add_thing([("vegetation", _rounded(trunk)), ("vegetation", _rounded(crown))], gy)
    for _ in range(int(rng.integers(2, 6))):
        _add_pole(scene, int(rng.integers(2)), rng.uniform(0.05, 0.85))
    for label, shape in (("static", STATIC_BIN), ("dynamic", DYNAMIC_CART)):
        if rng.random() < 0.6:
            ground = scene.sidewalk_point(rng.uniform(0.1, 0.7), int(rng.integers(2)), rng.uniform(0.2, 0.8))
            scene.add_thing([(label, scene.shape(shape, ground))], ground[1])


def _add_pole(scene: _SceneBuilder, side: int, depth: float) -> None:
    rng = scene.rng
    gx, gy = scene.sidewalk_point(depth, side, rng.uniform(0.05, 0.3))
    m = scene.metre(gy)
    half = max(0.12 * m, 0.8)  # at least a pixel and a half wide
    top = gy - rng.uniform(3.5, 6) * m
    parts = [("pole", _rounded([(gx - half, gy), (gx + half, gy), (gx + half, top), (gx - half, top)]))]
    kind = rng.random()
    if kind < 0.45:  # sign: round (octagon) or triangle
        corners = 8 if rng.random() < 0.5 else 3
        angles = np.linspace(0, 2 * np.pi, corners, endpoint=False) - np.pi / 2
        sign = list(zip(gx + 0.4 * m * np.cos(angles), top + 0.4 * m + 0.4 * m * np.sin(angles)))
        parts.append(("traffic sign", _rounded(sign)))
    elif kind < 0.85:  # traffic light hanging towards the road
        lx = gx + (-1 if side else 1) * 0.5 * m
        parts.append(("traffic light", _rounded([(lx - 0.2 * m, top), (lx + 0.2 * m, top),
                                                 (lx + 0.2 * m, top + 0.9 * m), (lx - 0.2 * m, top + 0.9 * m)])))
    scene.add_thing(parts, gy)


def _rounded(points) -> list[list[int]]:
    return [[round(float(x)), round(float(y))] for x, y in points]


def _add_vehicles(scene: _SceneBuilder) -> None:
    rng = scene.rng
    for _ in range(int(rng.integers(2, 7))):
        ground = scene.road_point(rng.uniform(0.05, 0.45), rng.uniform(0.1, 0.9))
        _add_car(scene, ground, side_view=rng.random() < 0.3)
    # a car parked at the road edge, close by: it leaves the image on the left
    _add_car(scene, scene.road_point(rng.uniform(0.5, 0.8), 0.0), side_view=True)
    if rng.random() < 0.5:
        shape = TRUCK_SIDE if rng.random() < 0.5 else TRUCK_BACK
        ground = scene.road_point(rng.uniform(0.08, 0.35), rng.uniform(0.2, 0.8))
        scene.add_thing([("truck", scene.shape(shape, ground, flip=rng.random() < 0.5))], ground[1])
    if rng.random() < 0.4:
        ground = scene.road_point(rng.uniform(0.08, 0.3), rng.uniform(0.3, 0.7))
        scene.add_thing([("bus", scene.shape(BUS, ground, flip=rng.random() < 0.5))], ground[1])
    if rng.random() < 0.3:
        near, far = rng.uniform(0.15, 0.3), 0.0
        track = [scene.road_point(far, 0.45), scene.road_point(far, 0.55),
                 scene.road_point(near, 0.6), scene.road_point(near, 0.4)]
        scene.add("rail track", track)
        ground = scene.road_point(rng.uniform(0.05, near), 0.5)
        scene.add_thing([("train", scene.shape(TRAIN, ground))], ground[1])
    for label, shape, chance in (("motorcycle", MOTORCYCLE, 0.5), ("bicycle", BICYCLE, 0.6)):
        if rng.random() < chance:  # the vehicle first, its rider over it
            ground = scene.road_point(rng.uniform(0.1, 0.6), rng.uniform(0.05, 0.3))
            flip = rng.random() < 0.5
            scene.add_thing([(label, scene.shape(shape, ground, flip)),
                             ("rider", scene.shape(RIDER, ground, flip))], ground[1])
    if rng.random() < 0.4:
        ground = scene.sidewalk_point(rng.uniform(0.2, 0.8), int(rng.integers(2)), rng.uniform(0.3, 0.8))
        scene.add_thing([("bicycle", scene.shape(BICYCLE, ground))], ground[1])


def _add_car(scene: _SceneBuilder, ground: tuple[float, float], side_view: bool) -> None:
    flip = scene.rng.random() < 0.5
    parts = [("car", scene.shape(CAR_SIDE if side_view else CAR_BACK, ground, flip))]
    if not side_view and scene.rng.random() < 0.85:
        # drawn after the car with id -1: not drawn, so the car shows through
        parts.append(("license plate", scene.shape(LICENSE_PLATE, ground)))
    scene.add_thing(parts, ground[1])


def _add_people(scene: _SceneBuilder) -> None:
    rng = scene.rng
    for _ in range(int(rng.integers(1, 7))):
        ground = scene.sidewalk_point(rng.uniform(0.05, 0.7), int(rng.integers(2)), rng.uniform(0.1, 0.9))
        scene.add_thing([("person", scene.shape(PERSON, ground, flip=rng.random() < 0.5))], ground[1])


def _add_far_groups(scene: _SceneBuilder) -> None:
    """Crowds too far to outline one by one, labelled as groups, as annotators did."""
    rng = scene.rng
    if rng.random() < 0.6:
        ground = scene.road_point(rng.uniform(0.02, 0.08), rng.uniform(0.3, 0.7))
        scene.add_thing([("cargroup", scene.shape(CAR_GROUP, ground))], ground[1])
    if rng.random() < 0.6:
        ground = scene.sidewalk_point(rng.uniform(0.03, 0.15), int(rng.integers(2)), 0.5)
        scene.add_thing([("persongroup", scene.shape(PERSON_GROUP, ground))], ground[1])
    if rng.random() < 0.3:
        ground = scene.sidewalk_point(rng.uniform(0.03, 0.1), int(rng.integers(2)), 0.2)
        comb = [(-1.0, 0), (1.0, 0), (1.0, 5), (0.8, 5), (0.8, 0.5), (0.1, 0.5), (0.1, 5), (-0.1, 5),
                (-0.1, 0.5), (-0.8, 0.5), (-0.8, 5), (-1.0, 5)]
        scene.add_thing([("polegroup", scene.shape(comb, ground))], ground[1])


def _add_deleted(scene: _SceneBuilder, objects: list[dict]) -> None:
    """Objects an annotator deleted stay in the file with deleted=1 and must not be drawn."""
    rng, w, h = scene.rng, scene.w, scene.h
    for _ in range(int(rng.integers(0, 3))):
        label = str(rng.choice(["bus", "car", "person", "building"]))
        x0, y0 = w * rng.uniform(0.1, 0.5), h * rng.uniform(0.2, 0.5)
        box = _rounded([(x0, y0), (x0 + 0.4 * w, y0), (x0 + 0.4 * w, y0 + 0.4 * h), (x0, y0 + 0.4 * h)])
        objects.insert(int(rng.integers(1, len(objects) + 1)), {"label": label, "polygon": box, "deleted": 1})


def _void_border(rng: np.random.Generator, h: int, w: int) -> list[dict]:
    """Ego vehicle, rectification border and out of roi, as at the edges of every real frame."""
    hood = h * rng.uniform(0.06, 0.1)
    ego = [(-1, h + 1), (-1, h - 0.55 * hood), (0.25 * w, h - 0.9 * hood), (0.5 * w, h - hood),
           (0.75 * w, h - 0.9 * hood), (w + 1, h - 0.55 * hood), (w + 1, h + 1)]
    edge = max(1.0, 0.004 * w)
    border_left = [(0, 0), (edge, 0), (edge / 2, h - 1), (0, h - 1)]
    border_right = [(w - 1, 0), (w - 1 - edge, 0), (w - 1 - edge / 2, h - 1), (w - 1, h - 1)]
    out_of_roi = [(0, h - 0.01 * h), (w - 1, h - 0.01 * h), (w - 1, h - 1), (0, h - 1)]
    return [{"label": "ego vehicle", "polygon": _rounded(ego)},
            {"label": "rectification border", "polygon": _rounded(border_left)},
            {"label": "rectification border", "polygon": _rounded(border_right)},
            {"label": "out of roi", "polygon": _rounded(out_of_roi)}]


# --- painting -----------------------------------------------------------------------------
# label name -> (base RGB, grain amplitude, texture, texture amplitude). Colours are far apart
# for the 19 training classes so that a model can tell them; textures add what real classes
# have: window grids on buildings, paving lines on sidewalks, bars on fences, leafy blotches.
_PAINT = {
    "unlabeled": ((15, 15, 15), 3, None, 0), "ego vehicle": ((25, 25, 32), 4, None, 0),
    "rectification border": ((0, 0, 0), 0, None, 0), "out of roi": ((10, 10, 10), 2, None, 0),
    "static": ((95, 85, 60), 8, None, 0), "dynamic": ((135, 95, 45), 8, None, 0),
    "ground": ((110, 100, 85), 10, None, 0), "road": ((85, 85, 92), 10, None, 0),
    "sidewalk": ((178, 160, 168), 6, "tiles", -45), "parking": ((140, 115, 115), 8, None, 0),
    "rail track": ((95, 80, 70), 8, "bars", 25), "building": ((165, 140, 120), 8, "windows", -70),
    "wall": ((200, 195, 160), 8, None, 0), "fence": ((120, 85, 35), 8, "bars", 35),
    "guard rail": ((170, 170, 180), 6, None, 0), "bridge": ((150, 100, 100), 6, None, 0),
    "tunnel": ((150, 120, 90), 6, None, 0), "pole": ((45, 45, 75), 4, None, 0),
    "polegroup": ((45, 45, 75), 4, None, 0), "traffic light": ((30, 45, 20), 4, None, 0),
    "traffic sign": ((235, 205, 35), 6, None, 0), "vegetation": ((55, 115, 35), 12, "leaves", 45),
    "terrain": ((160, 180, 85), 14, "leaves", 20), "sky": ((140, 185, 235), 3, "gradient", 30),
    "person": ((185, 55, 70), 10, None, 0), "rider": ((205, 40, 170), 10, None, 0),
    "car": ((35, 60, 160), 6, None, 0), "truck": ((60, 110, 115), 6, None, 0),
    "bus": ((225, 125, 30), 6, None, 0), "caravan": ((70, 70, 120), 6, None, 0),
    "trailer": ((90, 90, 130), 6, None, 0), "train": ((125, 35, 35), 6, None, 0),
    "motorcycle": ((35, 175, 175), 8, None, 0), "bicycle": ((150, 90, 210), 8, None, 0),
}
TEXTURES = ("tiles", "bars", "windows", "leaves", "gradient")


def _paint_tables():
    from cityscapesscripts.helpers.labels import labels
    base = np.zeros((256, 3), np.float32)
    grain = np.zeros(256, np.float32)
    texture = {name: np.zeros(256, np.float32) for name in TEXTURES}
    for label in labels:
        if label.id < 0:
            continue
        rgb, grain_amp, kind, amp = _PAINT[label.name]
        base[label.id], grain[label.id] = rgb, grain_amp
        if kind:
            texture[kind][label.id] = amp
    return base, grain, texture


_BASE, _GRAIN, _TEXTURE = _paint_tables()


def paint_image(ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 image for a labelIds image: class colour + class texture + grain, lit per frame."""
    h, w = ids.shape
    present = np.bincount(ids.ravel(), minlength=256) > 0
    image = _BASE[ids]
    shade = _GRAIN[ids] * (rng.random((h, w), dtype=np.float32) * 2 - 1)
    for kind, amp in _TEXTURE.items():
        if np.any(amp[present] != 0):
            shade += amp[ids] * _texture_field(kind, h, w, rng)
    image += shade[..., None]
    image *= np.asarray(rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, size=3), np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


PHOTO_BLUR = 1.0   # px: the optics' softening of every edge
PHOTO_NOISE = 0.6  # grey levels: sensor noise; with the blur, ~2.3 MB PNGs at 2048x1024


def photo_like(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A painted frame as a camera would give it: edges softened (Gaussian blur) and sensor
    noise. What matters for a benchmark: the PNG weighs and decodes like a real leftImg8bit
    frame (~2.3 MB at 2048x1024 against ~2.1 MB real); the painted frames' sharp edges and
    independent per-pixel grain are nothing like a camera's pixels to a PNG coder."""
    from PIL import ImageFilter

    soft = np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(PHOTO_BLUR)), dtype=np.float32)
    soft += rng.standard_normal(soft.shape, dtype=np.float32) * PHOTO_NOISE
    return np.clip(np.rint(soft), 0, 255).astype(np.uint8)


def _texture_field(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A pattern in [-1, 1] (or {0, 1}) over the whole frame; periods scale with the width."""
    unit = max(w / 2048, 0.125)
    y, x = np.arange(h), np.arange(w)
    if kind == "tiles":  # thin paving lines
        p = max(4, round(40 * unit))
        return (((y % p) < max(1, p // 10))[:, None] | ((x % p) < max(1, p // 10))[None, :]).astype(np.float32)
    if kind == "bars":  # vertical slats
        p = max(3, round(18 * unit))
        return np.broadcast_to(np.where((x % p) < p / 3, 1.0, -1.0).astype(np.float32), (h, w))
    if kind == "windows":  # a grid of dark windows
        py, px = max(4, round(48 * unit)), max(4, round(36 * unit))
        return (((y % py) > 0.35 * py)[:, None] & ((x % px) > 0.4 * px)[None, :]).astype(np.float32)
    if kind == "leaves":  # blotches: coarse noise, smoothly enlarged
        cell = max(2, round(24 * unit))
        coarse = rng.uniform(-1, 1, size=(h // cell + 2, w // cell + 2)).astype(np.float32)
        return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))
    if kind == "gradient":  # lighter towards the horizon
        return np.broadcast_to((y / h * 2 - 1).astype(np.float32)[:, None], (h, w))
    raise ValueError(kind)
