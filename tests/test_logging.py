"""Metrics hooks (JSONL, TensorBoard, progress), the composite, and the run report/plots."""
import glob
import json
import math
import struct
import time

import numpy as np
import pytest
from PIL import Image

from rlhf_jax.train import logging as mlog
from rlhf_jax.train import report


def _read_scalars(path):
    """Parse a TFRecord event file by hand (no tensorboard package): u64 length, u32 crc, payload, u32 crc."""
    from tensorboardX.proto import event_pb2  # noqa: PLC0415

    out, buf, i = {}, open(path, "rb").read(), 0
    while i < len(buf):
        (n,) = struct.unpack("<Q", buf[i:i + 8])
        event = event_pb2.Event.FromString(buf[i + 12:i + 12 + n])
        i += 12 + n + 4
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


class _StopAfter(mlog.StageHooks):
    def __init__(self, n):
        self.n, self.seen = n, []

    def on_step(self, step, metrics):
        self.seen.append(step)

    def should_stop(self):
        return len(self.seen) >= self.n

    def on_state(self, step, state):
        self.states = getattr(self, "states", []) + [(step, state)]

    def finalize(self, step, state):
        self.final = (step, state)


def test_jsonl_tensorboard_progress_and_composite(tmp_path):
    stop = _StopAfter(3)
    hooks = mlog.make_stage_hooks(tmp_path, "sft", total_steps=5, tokens_per_step=64, progress=False,
                                  extra=[stop])
    losses = [2.0, 1.5, float("nan"), 1.0]
    for i, loss in enumerate(losses, start=1):
        hooks.on_step(i, {"loss": loss, "accuracy": 0.25 * i, "label": "not a number"})
        assert hooks.should_stop() == (i >= 3)
        hooks.on_state(i, {"w": i})
    hooks.finalize(4, "final-state")
    hooks.close()
    assert stop.states == [(i, {"w": i}) for i in range(1, 5)] and stop.final == (4, "final-state")

    recs = mlog.read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(set(r) == {"step", "time", "loss", "accuracy"} for r in recs)
    assert [r["loss"] for r in recs] == [2.0, 1.5, None, 1.0]  # NaN written as null, the line stays valid JSON
    assert [r["accuracy"] for r in recs] == [0.25, 0.5, 0.75, 1.0]
    assert all(b["time"] >= a["time"] >= 0 for a, b in zip(recs, recs[1:]))
    assert stop.seen == [1, 2, 3, 4]

    events = glob.glob(str(tmp_path / "sft" / "tb" / "events.out.tfevents.*"))
    assert len(events) == 1
    scalars = _read_scalars(events[0])
    assert [v for _, v in scalars["accuracy"]] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert [s for s, _ in scalars["loss"]] == [1, 2, 4]  # the NaN step is not written


def test_jsonl_every_and_progress_rate():
    p = mlog.ProgressHook(10, tokens_per_step=100, disable=True)
    p.on_step(1, {"loss": 1.0})
    time.sleep(0.05)
    p.on_step(3, {"loss": 1.0})
    assert 0 < p.rate <= 2 * 100 / 0.05  # two steps of 100 tokens in at least 50 ms
    p.close()
    with pytest.raises(ValueError, match="every"):
        mlog.JsonlHook("/tmp/never.jsonl", every=0)


def test_a_resumed_log_continues_the_runs_clock(tmp_path):
    """"time" is seconds of the run: a hook appending to a log (after --resume) starts from its last time."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "time": 100.0, "loss": 1.0}\n')
    h = mlog.JsonlHook(path)
    h.on_step(2, {"loss": 0.5})
    h.close()
    assert 100.0 <= mlog.read_jsonl(path)[-1]["time"] < 110.0
    h = mlog.JsonlHook(path, append=False)
    h.on_step(1, {"loss": 0.5})
    h.close()
    assert mlog.read_jsonl(path)[-1]["time"] < 10.0


def test_report_files_and_plots(tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        h = mlog.JsonlHook(tmp_path / name / "metrics.jsonl")
        for s in range(1, 6):
            h.on_step(s, {"loss": scale / s, "kl": 0.1 * s})
        h.close()
    summary = {"final_loss": 0.2, "steps": 5, "stage": "sft", "bad": float("inf"), "np": np.float32(1.5)}
    tables = {"eval": [{"model": "sft", "win_rate": 0.5}, {"model": "dpo", "win_rate": 0.625, "note": "a|b"}]}
    png1 = report.plot_curves([tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl"],
                              ["loss", "kl"], tmp_path / "curves.png")
    kl = [0.0, 1.0, 2.0, 4.0]
    png2 = report.plot_xy(kl, {"gold": [0.0, 0.5, 0.6, 0.4], "proxy": [0.0, 0.7, 1.1, 1.6]}, "KL", "reward",
                          tmp_path / "plots" / "reward_vs_kl.png")
    jpath, mpath = report.write_report(tmp_path, summary, tables, images=[png1])

    data = json.loads(open(jpath).read())
    assert data["summary"] == {"final_loss": 0.2, "steps": 5, "stage": "sft", "bad": None, "np": 1.5}
    assert data["tables"]["eval"][1] == {"model": "dpo", "win_rate": 0.625, "note": "a|b"}
    md = open(mpath).read()
    assert "| model | win_rate | note |" in md
    assert "| dpo | 0.625 | a\\|b |" in md and "| sft | 0.5 |  |" in md
    assert "| final_loss | 0.2 |" in md and "![curves.png](curves.png)" in md
    for png in (png1, png2):
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    with pytest.raises(ValueError, match="proxy"):
        report.plot_xy([1, 2], {"proxy": [1]}, "KL", "r", tmp_path / "x.png")


def test_markdown_table_union_of_columns():
    md = report.markdown_table([{"a": 1}, {"b": 2.0, "a": math.nan}])
    assert md.splitlines() == ["| a | b |", "|---|---|", "| 1 |  |", "| nan | 2 |"]


def test_sampled_completions_go_to_jsonl_and_tensorboard_text(tmp_path):
    class Old:                                       # a hook written before on_samples existed
        on_step = on_state = finalize = lambda self, *a: None
        should_stop = lambda self: False              # noqa: E731
        close = lambda self: None                     # noqa: E731

    hooks = mlog.make_stage_hooks(tmp_path, "grpo", progress=False, extra=[Old()])
    rows = [{"prompt": "2+2?", "completion": "4 | four\nok", "reward": 1.0, "advantage": 0.5},
            {"prompt": "2+3?", "completion": "6", "reward": 0.0, "advantage": -0.5}]
    hooks.on_samples(10, rows)
    hooks.close()
    recs = mlog.read_jsonl(tmp_path / "grpo" / "completions.jsonl")
    assert recs == [{"step": 10, **r} for r in rows]
    from tensorboardX.proto import event_pb2  # noqa: PLC0415
    (path,) = glob.glob(str(tmp_path / "grpo" / "tb" / "events.out.tfevents.*"))
    buf, i, texts = open(path, "rb").read(), 0, []
    while i < len(buf):                               # TFRecord frames, as _read_scalars
        (n,) = struct.unpack("<Q", buf[i:i + 8])
        event = event_pb2.Event.FromString(buf[i + 12:i + 12 + n])
        i += 12 + n + 4
        texts += [(event.step, v.tag, v.tensor.string_val[0].decode()) for v in event.summary.value]
    ((step, tag, text),) = texts
    assert step == 10 and tag.startswith("completions") and "| prompt | completion | reward | advantage |" in text
    assert "4 \\| four<br>ok" in text
