"""MA-LMM's evaluation datasets: annotation readers, frame sampling, prompts, frames from disk.

The layouts are those of MA-LMM's repository (``data/<dataset>/annotation/*.json``):

- QA (MSRVTT-QA, MSVD-QA, ActivityNet-QA): ``qa_{train,val,test}.json``, an object keyed by question
  id whose entries hold ``question``, ``answer``, ``video`` (the frame folder's name),
  ``frame_length`` (frames at 10 fps) and ``question_id`` (``answer_type`` is kept as a group).
- Breakfast: ``train.json`` / ``val.json`` (val serves as test, as in MA-LMM), keyed by video id:
  ``frame_length``, ``class_name``, ``class_label``, ``duration`` (seconds).
- COIN: one ``COIN.json`` keyed by video id: ``subset`` ("train" or "val"; val serves as test),
  ``target`` (the class name), ``num_frames_actual`` (frames at 10 fps; entries without it are skipped,
  as MA-LMM does), ``duration``.
- Captioning (MSRVTT, MSVD, YouCook2): ``cap_{train,val,test}.json`` keyed by caption id (sorted as
  strings, as MA-LMM does), one entry per reference caption: ``caption``, ``video`` (the frame folder),
  ``frame_length``; YouCook2's entries are segments of a video (``segment``, ``start_time``,
  ``end_time``, ``duration`` in seconds). The ground truth MA-LMM scores against is
  ``coco_gt/cap_<split>.json`` beside them (COCO format: ``annotations`` of ``image_id``, ``caption``),
  whose ``image_id`` is the entry's ``video`` (MSRVTT, MSVD) or ``segment`` (YouCook2).
- LVU: ``{train,val,test}.json`` keyed by video id: ``duration`` (seconds), ``num_frames`` (at 10 fps)
  and, per task it is labelled for, ``<task>`` (the class name) and ``<task>_answer``. Each video is cut
  into windows of ``history`` seconds starting every ``stride`` seconds; each window is one item.

Frames come from MA-LMM's extracted folders (``<frames>/<video>/frame%06d.jpg``, 1-based, 10 fps) or
straight from ``<videos>/<video>.<ext>`` with PyAV, on the same 10 fps timeline: frame i is the decoded
frame whose time is nearest to i / 10 s (the last one past the end).
Evaluation samples ``num_frames`` indices evenly over the clip, rounded (``eval_indices``); training
takes one random index from each of ``num_frames`` equal segments (``train_indices``), as MA-LMM; frames
are resized as its evaluation does (``malmm_resize``).
Questions and labels go through LAVIS's text processors (`pre_question`, `pre_caption`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

FPS = 10  # MA-LMM's frame extraction rate (frames per second)
LVU_TASKS = ("director", "genre", "relationship", "scene", "way_speaking", "writer", "year")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v")
QA_PROMPT = "Question: {} Short answer:"
SPLITS = ("train", "val", "test")

_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")


def pre_question(text: str, max_words: int = 50) -> str:
    """LAVIS's ``blip_question`` processor: lower case, ``.!"()*#:;~`` removed, trailing spaces cut,
    at most `max_words` words."""
    text = _PUNCTUATION.sub("", text.lower()).rstrip(" ")
    return " ".join(text.split(" ")[:max_words])


def pre_caption(text: str, max_words: int = 50) -> str:
    """LAVIS's ``blip_caption`` processor: lower case, ``.!"()*#:;~`` become spaces, runs of spaces one,
    stripped, at most `max_words` words."""
    text = re.sub(r"\s{2,}", " ", _PUNCTUATION.sub(" ", text.lower())).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


@dataclass(frozen=True)
class DatasetSpec:
    """One of MA-LMM's datasets and how MA-LMM evaluates it (its run_scripts' test settings).

    files: annotation file per split; memory_bank_length, num_frames: MA-LMM's M and frames per clip;
    max_new_tokens, num_beams: its decoding (``max_len``, ``num_beams``); prompt_template: what the
    Q-Former and the LLM read; first_word: the prediction's first word is scored (MSVD/MSRVTT-QA);
    paper: the MA-LMM paper's top-1 accuracy, percent.
    """

    name: str
    family: Literal["qa", "classification", "captioning"]
    files: dict[str, str]
    memory_bank_length: int
    num_frames: int
    max_new_tokens: int
    paper: float | None
    prompt_template: str
    num_beams: int = 5
    first_word: bool = False
    question: str = ""  # the fixed question (prompt) of a classification or captioning dataset
    # MA-LMM's min_len and its generate's length_penalty where they differ from the model's decoding
    # (None: the model's; QA's predict_answers uses length_penalty 0, captioning and classification 1).
    min_new_tokens: int | None = None
    length_penalty: float | None = None
    # captioning: the paper's {metric: value x 100} (None where not found)
    paper_metrics: dict[str, float] | None = None


CAPTION_PROMPT = "what does the video describe?"  # MA-LMM's cap_*.yaml text_processor prompt


def _cap(name: str, max_new_tokens: int, min_new_tokens: int) -> DatasetSpec:
    # MA-LMM's test_cap.sh / youcook2 test.sh: M 40, 80 frames, 5 beams; max_len / min_len from cap_*.yaml.
    # The paper's Table 4 (METEOR, CIDEr) could not be read here: left empty rather than guessed.
    return DatasetSpec(name, "captioning", {s: f"cap_{s}.json" for s in SPLITS}, memory_bank_length=40,
                       num_frames=80, max_new_tokens=max_new_tokens, paper=None, prompt_template="{}",
                       question=CAPTION_PROMPT, min_new_tokens=min_new_tokens, length_penalty=1.0,
                       paper_metrics={"METEOR": None, "CIDEr": None})


def _qa(name: str, paper: float, first_word: bool) -> DatasetSpec:
    return DatasetSpec(name, "qa", {s: f"qa_{s}.json" for s in SPLITS}, memory_bank_length=10, num_frames=20,
                       max_new_tokens=10, paper=paper, prompt_template=QA_PROMPT, first_word=first_word)


DATASETS: dict[str, DatasetSpec] = {
    "msrvtt-qa": _qa("msrvtt-qa", 48.5, first_word=True),
    "msvd-qa": _qa("msvd-qa", 60.6, first_word=True),
    "activitynet-qa": _qa("activitynet-qa", 49.8, first_word=False),
    # classification: MA-LMM's classification task calls generate (length_penalty 1), not predict_answers
    "breakfast": DatasetSpec("breakfast", "classification", {"train": "train.json", "val": "val.json", "test": "val.json"},
                             memory_bank_length=20, num_frames=100, max_new_tokens=20, paper=93.0, prompt_template="{}",
                             question="what type of breakfast is shown in the video?", length_penalty=1.0),
    "coin": DatasetSpec("coin", "classification", dict.fromkeys(SPLITS, "COIN.json"), memory_bank_length=20,
                        num_frames=100, max_new_tokens=20, paper=93.2, prompt_template="{}",
                        question="what is the activity in the video?", length_penalty=1.0),
    "lvu": DatasetSpec("lvu", "classification", {s: f"{s}.json" for s in SPLITS}, memory_bank_length=20,
                       num_frames=100, max_new_tokens=5, paper=63.0, prompt_template="{}",
                       question="what is the {} of the movie?", length_penalty=1.0),
    "msrvtt-cap": _cap("msrvtt-cap", max_new_tokens=50, min_new_tokens=1),
    "msvd-cap": _cap("msvd-cap", max_new_tokens=50, min_new_tokens=1),
    "youcook2": _cap("youcook2", max_new_tokens=30, min_new_tokens=2),
}
LVU_HISTORY_S, LVU_STRIDE_S = 100, 20  # MA-LMM's LVU test settings (seconds)
# Videos MA-LMM leaves out (their frames are broken or missing in the released data).
_SKIPPED = {"breakfast": {"P28-cam01-P28_cereals", "P27-stereo-P27_milk_ch0", "P28-cam02-P28_cereals"},
            "coin": {"AfiVmAjfTNs", "cjwtcDKTQM8"}}


@dataclass(frozen=True)
class Item:
    """One question about one clip: id (question id, video id, or ``<video>_<start s>`` for LVU),
    video (frame folder / file name), question (processed, before the prompt template), answer (the
    ground truth as MA-LMM compares it), frames (indices on the 10 fps timeline, 0-based), group
    (LVU's task, a QA answer type, or "all"), image_id (captioning: the clip's id in the COCO ground
    truth, MSRVTT/MSVD's video, YouCook2's segment; one item per reference caption, so several items
    share it; "" elsewhere)."""

    id: str
    video: str
    question: str
    answer: str
    frames: tuple[int, ...]
    group: str = "all"
    image_id: str = ""


def eval_indices(frame_length: int, num_frames: int, start: int = 0) -> tuple[int, ...]:
    """MA-LMM's evaluation sampling: `num_frames` indices spread evenly from `start` to `frame_length` - 1,
    rounded to the nearest frame (repeats when the clip is shorter than `num_frames`)."""
    if frame_length < 1 or num_frames < 1:
        raise ValueError(f"need frame_length >= 1 and num_frames >= 1, got {frame_length} and {num_frames}")
    return tuple(int(i) for i in np.rint(np.linspace(start, frame_length - 1, num_frames)).astype(int))


def segment_indices(start_s: float, end_s: float, duration_s: float, frame_length: int,
                    num_frames: int) -> tuple[int, ...]:
    """MA-LMM's YouCook2 evaluation sampling: `num_frames` indices spread evenly from the segment's start
    to its end (seconds, cut to [0, duration]) on the 10 fps timeline, cut toward zero (numpy's
    ``linspace(..., dtype=int)``). An index past the clip's last frame (MA-LMM would open a frame file
    that is not there) is clamped to `frame_length` - 1."""
    if frame_length < 1 or num_frames < 1:
        raise ValueError(f"need frame_length >= 1 and num_frames >= 1, got {frame_length} and {num_frames}")
    start, end = max(0, start_s), min(duration_s, end_s)
    if end < start:
        raise ValueError(f"segment ends ({end_s} s) before it starts ({start_s} s)")
    picked = np.linspace(start * FPS, end * FPS, num_frames).astype(int)
    return tuple(min(int(i), frame_length - 1) for i in picked)


def train_indices(frame_length: int, num_frames: int, rng: np.random.Generator) -> tuple[int, ...]:
    """MA-LMM's training sampling: [0, frame_length) cut into `num_frames` equal segments (integer
    bounds), one uniformly random index from each (the segment's start when it is empty)."""
    if frame_length < 1 or num_frames < 1:
        raise ValueError(f"need frame_length >= 1 and num_frames >= 1, got {frame_length} and {num_frames}")
    bounds = np.linspace(0, frame_length, num_frames + 1, dtype=int)
    return tuple(int(a) if a == b else int(rng.integers(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True))


def annotation_file(spec: DatasetSpec, annotations: str | Path, split: str) -> Path:
    """The split's annotation file: `annotations` itself when it is a file, else the file MA-LMM names
    inside that folder. ValueError when it is not there."""
    if split not in spec.files:
        raise ValueError(f"unknown split {split!r} for {spec.name}: use one of {', '.join(spec.files)}")
    path = Path(annotations)
    if path.is_dir():
        path = path / spec.files[split]
    if not path.is_file():
        raise ValueError(f"{spec.name}: no annotation file '{path}' (MA-LMM's data/.../annotation/{spec.files[split]})")
    return path


def _field(entry: dict, key: str, where: str):
    if not isinstance(entry, dict) or key not in entry:
        raise ValueError(f"{where} lacks the field {key!r}")
    return entry[key]


def _length(entry: dict, key: str, where: str) -> int:
    value = _field(entry, key, where)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}: {key!r} must be a positive number of frames, got {value!r}")
    return value


def _load_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read '{path}': {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' must hold a JSON object keyed by id (MA-LMM's layout), got {type(data).__name__}")
    return data


def read_items(
    spec: DatasetSpec,
    annotations: str | Path,
    split: str = "test",
    *,
    num_frames: int | None = None,
    tasks: Sequence[str] = LVU_TASKS,
    history_s: int = LVU_HISTORY_S,
    stride_s: int = LVU_STRIDE_S,
) -> list[Item]:
    """The split's items in MA-LMM's order (sorted by id), with evaluation frame indices.

    num_frames: frames per clip (default: the dataset's). tasks, history_s, stride_s: LVU only.
    ValueError names the file and entry when the annotations do not have MA-LMM's layout.
    """
    path = annotation_file(spec, annotations, split)
    num_frames = num_frames or spec.num_frames
    data = _load_object(path)
    items = []
    for key in sorted(data):
        entry, where = data[key], f"'{path.name}' entry {key!r}"
        if spec.family == "captioning":
            items.append(_caption_item(spec, key, entry, where, num_frames))
        elif spec.family == "qa":
            frames = eval_indices(_length(entry, "frame_length", where), num_frames)
            items.append(Item(str(_field(entry, "question_id", where)), str(_field(entry, "video", where)),
                              pre_question(str(_field(entry, "question", where))), str(_field(entry, "answer", where)),
                              frames, str(entry.get("answer_type", "all"))))
        elif key in _SKIPPED.get(spec.name, ()):
            continue
        elif spec.name == "breakfast":
            frames = eval_indices(_length(entry, "frame_length", where), num_frames)
            items.append(Item(key, key, pre_caption(spec.question), pre_caption(str(_field(entry, "class_name", where))),
                              frames))
        elif spec.name == "coin":
            wanted = "train" if split == "train" else "val"
            if _field(entry, "subset", where) != wanted or "num_frames_actual" not in entry:
                continue
            frames = eval_indices(_length(entry, "num_frames_actual", where), num_frames)
            items.append(Item(key, key, pre_caption(spec.question), pre_caption(str(_field(entry, "target", where))),
                              frames))
        else:
            items.extend(_lvu_windows(spec, key, entry, where, num_frames, tasks, history_s, stride_s))
    if spec.name == "lvu":
        items.sort(key=lambda it: (it.group, it.id))
    return items


def _caption_item(spec: DatasetSpec, key: str, entry: dict, where: str, num_frames: int) -> Item:
    """One reference caption of a clip: the prompt as question, the caption (LAVIS's caption processor,
    MA-LMM's training target) as answer."""
    video = str(_field(entry, "video", where))
    length = _length(entry, "frame_length", where)
    if spec.name == "youcook2":
        times = []
        for k in ("start_time", "end_time", "duration"):
            value = _field(entry, k, where)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"{where}: {k!r} must be a number of seconds, got {value!r}")
            times.append(value)
        try:
            frames = segment_indices(*times, length, num_frames)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        image_id = str(_field(entry, "segment", where))
    else:
        frames, image_id = eval_indices(length, num_frames), video
    caption = _field(entry, "caption", where)
    if not isinstance(caption, str):
        raise ValueError(f"{where}: 'caption' must be text, got {caption!r}")
    return Item(str(key), video, spec.question, pre_caption(caption), frames, image_id=image_id)


def read_references(spec: DatasetSpec, annotations: str | Path, split: str = "test") -> tuple[dict[str, list[str]], Path]:
    """A captioning split's reference captions {image_id: [captions]} and the file they come from:
    MA-LMM's COCO ground truth ``coco_gt/<split file>`` beside the split's file (its ``annotations``'
    ``image_id`` and ``caption``, as written), or, where that file is absent (MA-LMM publishes none for
    MSRVTT's and MSVD's train split), the split file's own captions grouped by clip, which equal it on
    every split where both are published. ValueError names the file that does not fit."""
    path = annotation_file(spec, annotations, split)
    gt = path.parent / "coco_gt" / path.name
    if not gt.is_file():
        refs: dict[str, list[str]] = {}
        data = _load_object(path)
        for key in sorted(data):
            item = _caption_item(spec, key, data[key], f"'{path.name}' entry {key!r}", 1)
            refs.setdefault(item.image_id, []).append(str(data[key]["caption"]))
        return refs, path
    try:
        data = json.loads(gt.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read '{gt}': {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"'{gt}' must be COCO ground truth: an object with a list 'annotations'")
    refs = {}
    for n, ann in enumerate(data["annotations"]):
        where = f"'{gt.name}' annotation {n}"
        refs.setdefault(str(_field(ann, "image_id", where)), []).append(str(_field(ann, "caption", where)))
    return refs, gt


def _lvu_windows(spec: DatasetSpec, video: str, entry: dict, where: str, num_frames: int, tasks: Sequence[str],
                 history_s: int, stride_s: int) -> list[Item]:
    """LVU: one item per task the video is labelled for and per window of `history_s` seconds, the
    first at 0 s, then every `stride_s` seconds while a whole window fits in the video."""
    unknown = sorted(set(tasks) - set(LVU_TASKS))
    if unknown:
        raise ValueError(f"unknown LVU task(s) {', '.join(unknown)}: use {', '.join(LVU_TASKS)}")
    if history_s < 1 or stride_s < 1:
        raise ValueError(f"LVU history and stride must be >= 1 s, got {history_s} and {stride_s}")
    duration = _length(entry, "duration", where)
    length = _length(entry, "num_frames", where)
    out = []
    for task in tasks:
        if task not in entry:
            continue
        label = pre_caption(str(entry[task]))
        for start in [0, *range(stride_s, duration - history_s + 1, stride_s)]:
            end_s = min(start + history_s - 1, duration)
            first, last = start * FPS, min(end_s * FPS, length - 1)
            frames = tuple(int(i) for i in np.rint(np.linspace(first, last, num_frames)).astype(int))
            out.append(Item(f"{video}_{start}", video, pre_caption(spec.question.format(task)), label, frames, task))
    return out


# ---------------------------------------------------------------- frames


def malmm_resize(frames: np.ndarray, image_size: int) -> np.ndarray:
    """MA-LMM's evaluation resize (``blip2_video_eval``): RGB uint8 [T, H, W, 3] -> [T, S, S, 3] uint8,
    bicubic without antialiasing (``align_corners=False``), then cut to integers toward zero as its
    ``ToUint8`` does. Values the bicubic kernel pushes outside 0..255 (an undefined cast there) are
    clamped first."""
    import torch
    import torch.nn.functional as F

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be RGB uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
    return x.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def folder_frames(folder: str | Path, indices: Sequence[int]) -> np.ndarray:
    """Frames `indices` (0-based) of an extracted folder (``frame%06d.jpg``, 1-based): [T, H, W, 3] uint8 RGB.
    ValueError names the first missing or unreadable file."""
    import cv2

    cache: dict[int, np.ndarray] = {}
    out = []
    for i in indices:
        if i not in cache:
            path = Path(folder) / f"frame{i + 1:06d}.jpg"
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
            if bgr is None:
                raise ValueError(f"frame file '{path}' is missing or not an image")
            cache[i] = bgr[..., ::-1]
        out.append(cache[i])
    return np.ascontiguousarray(np.stack(out))


def video_frames(path: str | Path, indices: Sequence[int], fps: int = FPS) -> np.ndarray:
    """Frames `indices` of a video on a timeline of `fps` frames per second: index i is the decoded
    frame nearest in time to i / fps seconds (the earlier of two equally near; the last frame for times
    past the end). Decodes once, up to the last frame needed. Returns [T, H, W, 3] uint8 RGB.
    ValueError when the file cannot be decoded or has no video stream."""
    import av

    wanted = sorted(set(int(i) for i in indices))
    picked: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"no video stream in '{path}'")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or fps)
            prev, prev_t, k = None, None, 0  # prev: the last decoded frame (a VideoFrame, converted when picked)
            for n, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else n / rate
                while k < len(wanted) and t >= wanted[k] / fps:  # target k lies between prev and this frame
                    target = wanted[k] / fps
                    chosen = prev if prev is not None and target - prev_t <= t - target else frame
                    picked[wanted[k]] = chosen.to_ndarray(format="rgb24")
                    k += 1
                if k == len(wanted):
                    break
                prev, prev_t = frame, t
            if prev is None and not picked:
                raise ValueError(f"no frame could be decoded from '{path}'")
            if k < len(wanted):  # times past the end: the last frame
                last = prev.to_ndarray(format="rgb24")
                for i in wanted[k:]:
                    picked[i] = last
    except av.error.FFmpegError as exc:
        raise ValueError(f"cannot decode '{path}': {exc}") from exc
    return np.ascontiguousarray(np.stack([picked[int(i)] for i in indices]))


def find_video(videos: str | Path, name: str) -> Path:
    """The file ``<videos>/<name>.<ext>`` (any of `VIDEO_EXTENSIONS`), else ``<videos>/v_<name>.<ext>``
    (ActivityNet's own file names; MA-LMM's annotations drop the ``v_``). ValueError when there is none."""
    for stem in (name, f"v_{name}"):
        for ext in VIDEO_EXTENSIONS:
            path = Path(videos) / f"{stem}{ext}"
            if path.is_file():
                return path
    raise ValueError(f"no video '{name}' in '{videos}' (looked for {name}{{{','.join(VIDEO_EXTENSIONS)}}} "
                     f"and v_{name}.*)")


def clip_frames(item: Item, *, frames: str | Path | None = None, videos: str | Path | None = None) -> np.ndarray:
    """The item's frames [T, H, W, 3] uint8 RGB: from its extracted folder under `frames` when given,
    else decoded from its file under `videos`."""
    if frames is not None:
        return folder_frames(Path(frames) / item.video, item.frames)
    if videos is None:
        raise ValueError("give a folder of extracted frames or of videos")
    return video_frames(find_video(videos, item.video), item.frames)
