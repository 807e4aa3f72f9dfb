"""The rasteriser against cityscapesscripts' json2labelImg, the tool that made the official masks."""
from __future__ import annotations

import json

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as cs_labels
from cityscapesscripts.helpers.labels import trainId2label
from cityscapesscripts.preparation.json2labelImg import json2labelImg
from PIL import Image

from cache.format import CLASS_NAMES
from cache.errors import UserError
from dataprep.rasterize import BadFrame, Polygons, load_polygons, render_label_image, render_trainids

H, W = 256, 512
KNOWN = [label.name for label in cs_labels]
GROUPS = ["cargroup", "persongroup", "ridergroup", "bicyclegroup", "motorcyclegroup", "truckgroup",
          "polegroup"]


def reference(path, tmp_path, encoding):
    out = tmp_path / f"reference_{encoding}.png"
    json2labelImg(str(path), str(out), encoding)
    return np.array(Image.open(out))


def write_json(path, doc):
    path.write_text(json.dumps(doc))
    return path


def random_polygon(rng, kind):
    if kind == "far":  # wholly outside the image, or a wedge from inside to far beyond an edge
        if rng.random() < 0.3:
            return rng.integers(W + 10, 9000, size=(int(rng.integers(3, 7)), 2)).tolist()
        x, y, side = int(rng.integers(0, W)), int(rng.integers(0, H)), int(rng.integers(4))
        far = [[-5000, y - 40], [-5000, y + 40]], [[W + 5000, y - 40], [W + 5000, y + 40]], \
              [[x - 40, -5000], [x + 40, -5000]], [[x - 40, H + 5000], [x + 40, H + 5000]]
        return [[x, y]] + far[side]
    if kind == "tiny":  # a pixel or two, lines, collinear points, a bow tie
        x, y = int(rng.integers(0, W)), int(rng.integers(0, H))
        shapes = [[[x, y], [x + 1, y]], [[x, y], [x + 1, y], [x + 2, y]], [[x, y], [x, y], [x, y]],
                  [[x, y], [x + 1, y + 1], [x, y + 1]], [[x, y], [x + 6, y + 6], [x + 6, y], [x, y + 6]]]
        return shapes[int(rng.integers(len(shapes)))]
    if kind == "float":
        return (rng.uniform(-20, [W + 20, H + 20], size=(int(rng.integers(3, 9)), 2))).round(2).tolist()
    if kind == "edge":  # on the image border lines exactly
        return [[0, 0], [W - 1, 0], [W, H], [0, H - 1]] if rng.random() < 0.5 else [[0, 0], [W, 0], [W, H], [0, H]]
    cx, cy = rng.uniform(0, W), rng.uniform(0, H)
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(3, 12))))
    radius = rng.uniform(3, 150, size=angles.size)
    return np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1).round().astype(int).tolist()


def random_doc(seed):
    """A frame that exercises every rule: order, deleted, groups, plates, voids, clipping, degenerates."""
    rng = np.random.default_rng(seed)
    # odd seeds start with a polygon on the image border; even ones leave background showing
    objects = [{"label": "out of roi", "polygon": random_polygon(rng, "edge")}] if seed % 2 else []
    for _ in range(40):
        label = str(rng.choice(KNOWN + GROUPS))
        kind = str(rng.choice(["blob", "blob", "blob", "far", "tiny", "float"]))
        obj = {"label": label, "polygon": random_polygon(rng, kind)}
        deleted = rng.random()
        if deleted < 0.15:
            obj["deleted"] = int(rng.choice([1, True]))  # skipped
        elif deleted < 0.25:
            obj["deleted"] = 0
        objects.append(obj)
    # a deleted object with an unknown label: skipped before the label is looked up
    objects.insert(5, {"label": "no such thing", "polygon": [[1, 1], [50, 1], [50, 50]], "deleted": 1})
    # a car with its plate on top: the plate (id -1) is not drawn, the car shows through
    objects += [{"label": "car", "polygon": [[100, 100], [200, 100], [200, 180], [100, 180]]},
                {"label": "license plate", "polygon": [[130, 150], [170, 150], [170, 165], [130, 165]]},
                {"label": "ego vehicle", "polygon": [[0, H], [0, H - 20], [W // 2, H - 30], [W, H - 20], [W, H]]},
                {"label": "rectification border", "polygon": [[0, 0], [3, 0], [3, H], [0, H]]},
                {"label": "static", "polygon": [[300, 40], [330, 40], [330, 90], [300, 90]]},
                # points with an extra coordinate: the reference keeps p[0], p[1]
                {"label": "bus", "polygon": [[400, 10, 7], [450, 10, 7], [450, 60, 7], [400, 60, 7]]}]
    return {"imgHeight": H, "imgWidth": W, "objects": objects}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("encoding", ["trainIds", "ids"])
def test_identical_to_json2labelImg(tmp_path, seed, encoding):
    path = write_json(tmp_path / "frame_gtFine_polygons.json", random_doc(seed))
    ours = render_label_image(load_polygons(path), encoding)
    expected = reference(path, tmp_path, encoding)
    assert ours.dtype == np.uint8 and ours.shape == (H, W)
    assert np.array_equal(ours, expected), f"{(ours != expected).sum()} pixels differ"
    assert len(np.unique(ours)) > 5  # the frame really has content


def test_rules_visible_in_output(tmp_path):
    """The edge cases matter: each rule changes pixels, so the identity test above has teeth."""
    box = [[10, 10], [100, 10], [100, 100], [10, 100]]
    doc = {"imgHeight": H, "imgWidth": W, "objects": [
        {"label": "road", "polygon": box},
        {"label": "cargroup", "polygon": [[20, 20], [60, 20], [60, 60], [20, 60]]},
        {"label": "license plate", "polygon": [[30, 30], [40, 30], [40, 40], [30, 40]]},
        {"label": "sky", "polygon": [[70, 70], [90, 70], [90, 90], [70, 90]], "deleted": 1},
        {"label": "polegroup", "polygon": [[200, 10], [210, 10], [210, 50], [200, 50]]},
        {"label": "person", "polygon": [[-1000, -1000], [2000, -1000], [2000, 5], [-1000, 5]]},
    ]}
    path = write_json(tmp_path / "rules.json", doc)
    train = render_trainids(path)
    ids = render_label_image(load_polygons(path), "ids")
    assert train[35, 35] == 13 and ids[35, 35] == 26  # car under the undrawn plate
    assert train[80, 80] == 0 and ids[80, 80] == 7  # deleted sky leaves the road
    assert train[30, 205] == 255 and ids[30, 205] == 18  # polegroup is known: not a pole
    assert (train[:5] == 11).all()  # clipped huge person covers the top rows
    assert train[200, 300] == 255 and ids[200, 300] == 0  # unlabeled background
    assert np.array_equal(train, reference(path, tmp_path, "trainIds"))


def test_unknown_label(tmp_path):
    doc = {"imgHeight": H, "imgWidth": W, "objects": [{"label": "spaceship", "polygon": [[1, 1], [9, 1], [9, 9]]}]}
    path = write_json(tmp_path / "alien_gtFine_polygons.json", doc)
    with pytest.raises(SystemExit):
        json2labelImg(str(path), str(tmp_path / "out.png"), "trainIds")
    with pytest.raises(BadFrame, match=r"alien_gtFine_polygons\.json.*'spaceship'") as info:
        render_trainids(path)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    # "...group" of an unknown base is unknown too
    doc["objects"][0]["label"] = "spaceshipgroup"
    with pytest.raises(BadFrame, match="'spaceship'"):
        render_trainids(write_json(path, doc))


@pytest.mark.parametrize("content, problem", [
    ('{"imgHeight": 256, "imgWidth": 512, "objects": [{"label": "road", "pol', "not valid JSON"),
    ("this is not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "cannot read|not valid JSON"),
    ('[1, 2, 3]', "expected a JSON object"),
    ('{"imgWidth": 512, "objects": []}', "missing imgHeight"),
    ('{"imgHeight": 256, "imgWidth": 512}', "missing objects"),
    ('{"imgHeight": "tall", "imgWidth": 512, "objects": []}', "not integers"),
    ('{"imgHeight": 0, "imgWidth": 512, "objects": []}', "not positive"),
    ('{"imgHeight": 256, "imgWidth": 512, "objects": {}}', "not a list"),
    ('{"imgHeight": 256, "imgWidth": 512, "objects": [{"label": "road"}]}', "object 0 has no label or polygon"),
    ('{"imgHeight": 256, "imgWidth": 512, "objects": [], "ignore": [{"2d": [1, 2, 3, 4]}]}', "'ignore'"),
])
def test_bad_files(tmp_path, content, problem):
    path = tmp_path / "bad_gtFine_polygons.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(BadFrame, match=problem) as info:
        render_trainids(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message


@pytest.mark.parametrize("polygon", [[[5, 5]], [], [1, 2, 3, 4, 5, 6], [[1, 2], ["a", "b"], [3, 4]], [[1], [2], [3]]])
def test_undrawable_polygons(tmp_path, polygon):
    """Where PIL cannot draw, the reference crashes with a traceback; we name file, object and label."""
    doc = {"imgHeight": H, "imgWidth": W, "objects": [
        {"label": "road", "polygon": [[0, 0], [9, 0], [9, 9]]}, {"label": "car", "polygon": polygon}]}
    path = write_json(tmp_path / "odd.json", doc)
    with pytest.raises(Exception) as ref_info:
        json2labelImg(str(path), str(tmp_path / "out.png"), "trainIds")
    assert not isinstance(ref_info.value, SystemExit)
    with pytest.raises(BadFrame, match=r"odd\.json: object 1 \(car\)"):
        render_trainids(path)


def test_missing_file(tmp_path):
    with pytest.raises(BadFrame, match="not found"):
        render_trainids(tmp_path / "nope.json")


def test_sizes_as_strings_like_reference(tmp_path):
    doc = random_doc(99)
    doc["imgHeight"], doc["imgWidth"] = str(H), float(W)
    path = write_json(tmp_path / "f.json", doc)
    assert np.array_equal(render_trainids(path), reference(path, tmp_path, "trainIds"))


def test_output_is_writable_and_encoding_checked():
    mask = render_label_image(Polygons(4, 6, []), "trainIds")
    mask[0, 0] = 1  # callers may edit it in place
    assert mask.shape == (4, 6) and (mask[1:] == 255).all()
    with pytest.raises(ValueError, match="encoding"):
        render_label_image(Polygons(4, 6, []), "color")


def test_class_names_match_cityscapesscripts():
    assert CLASS_NAMES == tuple(trainId2label[t].name for t in range(19))
