"""lance_ds.evaluate: the held-out scorer says yes to right outputs and no to wrong ones, splits prompts over ranks
without changing the counts, runs a tiny random model end to end, and reports (table, TensorBoard, CLI errors)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lance_ds import evaluate as ev
from lance_ds.config.data import GEN_TASKS, TASKS, UND_TASKS, GroupConfig
from lance_ds.data import example as ex
from lance_ds.data.batch import Sample
from lance_ds.data.sequence import resize_crop

OUT_SIDE = 32  # the size the fake generators answer with (generation judges read any size >= 24)


def held_out_prompts(per_task: int, seed: int = 3) -> list[ev.Prompt]:
    """Example-world samples of every task as the val split makes them (decoded media instead of bytes)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for task in TASKS:
        video = task in ("t2v", "v2v", "v2t")
        for i in range(per_task):
            scene = ex.draw_scene(rng, video, "val")

            def pixels(s):
                return torch.from_numpy(np.array(ex.render_video(s) if video else ex.render_image(s)))

            kind = "video" if video else "image"
            if task in ("t2i", "t2v"):
                sample = Sample(task, {"caption": scene.caption()}, {kind: pixels(scene)})
            elif task in ("i2i", "v2v"):
                target, instruction = ex._edited(scene, rng, allow_shape=task == "i2i")
                sample = Sample(task, {"caption": instruction},
                                {f"input_{kind}": pixels(scene), f"output_{kind}": pixels(target)})
            else:
                question, answer = ex._question(scene, rng)
                sample = Sample(task, {"caption_q": question, "caption_a": answer}, {kind: pixels(scene)})
            sample.key = f"{task}-{i}"
            prompts.append(ev.Prompt(sample, GroupConfig(name=task, task=task)))
    return prompts


class FakeGenerator:
    """Stands in for lance_ds.generate.Generator with crafted outputs.

    right      answers the reference; generates the held-out target
    recolour   names every attribute one value off; paints the shape in the next colour (shape and place right)
    unedited   answers nothing useful ("I see something"); generates the source unchanged (t2i / t2v: grey)
    noise      uniform random pixels; random words
    """

    device = torch.device("cpu")

    def __init__(self, mode: str):
        self.mode = mode
        self.calls: list[int] = []  # prompts per call
        self.noise: dict[str, tuple[int, int]] = {}  # sample key -> (seed, index) of its noise

    def answer(self, samples, max_new_tokens=16, group=None):
        self.calls.append(len(samples))
        out = []
        for s in samples:
            reference = s.texts["caption_a"]
            if self.mode == "right":
                out.append(reference)
            elif self.mode == "recolour":  # every attribute the reference names, one value further
                found = ex.parse_answer(reference)
                out.append(" ".join(next_value(v) for v in found.values() if v))
            elif self.mode == "unedited":
                out.append("I see something")
            else:
                out.append("the of and")
        return out

    def generate(self, samples, num_steps=20, cfg_scale=4.0, seed=0, group=None, first_index=0):
        self.calls.append(len(samples))
        out = []
        for k, s in enumerate(samples):
            self.noise[s.key] = (seed, first_index + k)  # what the real generator draws its noise from
            target = s.media.get(ev.TARGET_MEDIA[s.task])
            source = s.media.get(ev.SOURCE_MEDIA.get(s.task, ""))
            if self.mode == "right":
                pixels = target
            elif self.mode == "recolour":
                pixels = recoloured(target)
            elif self.mode == "unedited":
                pixels = source if source is not None else torch.full_like(target, 40)
            else:
                g = torch.Generator().manual_seed(seed)
                pixels = torch.randint(0, 256, target.shape, generator=g, dtype=torch.uint8)
            out.append(resize_crop(pixels, OUT_SIDE, OUT_SIDE))
        return out


class HalfRight(FakeGenerator):
    """Right on the prompts of even index (the key's number), blank on the odd ones, however they are batched."""

    @staticmethod
    def wrong(sample) -> bool:
        return int(sample.key.split("-")[1]) % 2 == 1

    def answer(self, samples, **kwargs):
        return ["nothing" if self.wrong(s) else a for s, a in zip(samples, super().answer(samples, **kwargs))]

    def generate(self, samples, **kwargs):
        out = super().generate(samples, **kwargs)
        return [torch.zeros_like(o) if self.wrong(s) else o for s, o in zip(samples, out)]


def next_value(value: str) -> str:
    """The next colour, shape or direction of the world (wrapping around)."""
    names = next(n for n in (list(ex.COLOURS), ex.SHAPES, ex.DIRECTIONS) if value in n)
    return names[(names.index(value) + 1) % len(names)]


def recoloured(frames: torch.Tensor) -> torch.Tensor:
    """Shape pixels repainted in the next colour of the world; the grey background kept."""
    out = frames.clone()
    for name, rgb in ex.COLOURS.items():
        mask = (frames.int() - torch.tensor(rgb)).abs().sum(-1) < 30
        out[mask] = torch.tensor(ex.COLOURS[next_value(name)], dtype=torch.uint8)
    return out


# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts():
    return held_out_prompts(per_task=4)


def test_captions_outside_the_example_world_are_refused_not_scored(prompts):
    """A t2i caption naming no colour / shape ("a dog on a beach") scored 100% at 100% chance: "goals met". A user's
    i2t answer "grey" failed with "reference answer 'grey' names no colour" (grey is one, not the example world's)."""
    own = {"t2i": ({"caption": "a dog moving left"}, "colour or shape"),  # (a still image has no direction)
           "i2i": ({"caption": "move it left"}, "colour or shape"),  # (judge_edit needs a colour or shape)
           "i2t": ({"caption_q": "What colour?", "caption_a": "grey"}, "colour, shape or direction")}
    for task, (texts, named) in own.items():
        theirs = [dataclasses.replace(p, sample=dataclasses.replace(p.sample, texts=texts))
                  for p in prompts if p.sample.task == task]
        with pytest.raises(ValueError, match=f"{task} sample .* names no {named} of the example world "
                                             ".*validation.every"):
            ev.evaluate(FakeGenerator("right"), theirs)
    motion = [p for p in prompts if p.sample.task == "t2v"][0]  # a video's direction alone is judged
    ev.refuse_unjudgeable(dataclasses.replace(motion.sample, texts={"caption": "something moving left"}))


def test_right_outputs_score_everything_and_the_judge_passes_the_targets(prompts):
    result = ev.evaluate(FakeGenerator("right"), prompts, ev.EvalSettings(batch_size=3))
    assert list(result.scores) == list(TASKS)
    for task, score in result.scores.items():
        assert (score.correct, score.total) == (4, 4), task
        assert score.reference == (1.0 if task in GEN_TASKS else None)
    assert ev.goals_met(result) == {t: True for t in TASKS}


@pytest.mark.parametrize("mode", ["recolour", "unedited", "noise"])
def test_wrong_outputs_score_nothing(prompts, mode):
    result = ev.evaluate(FakeGenerator(mode), prompts, ev.EvalSettings())
    for task, score in result.scores.items():
        assert (score.correct, score.total) == (0, 4), (mode, task)
        if task in GEN_TASKS:
            assert score.reference == 1.0  # the targets were still right: the judge, not the data, said no
    assert not any(ev.goals_met(result).values())


def test_half_right_scores_half_and_chance_follows_the_judged_attributes(prompts):
    result = ev.evaluate(HalfRight("right"), prompts, ev.EvalSettings(batch_size=3))
    assert {t: s.accuracy for t, s in result.scores.items()} == {t: 0.5 for t in TASKS}
    chance = {t: s.chance for t, s in result.scores.items()}
    assert chance["t2i"] == pytest.approx(1 / 12) and chance["t2v"] == pytest.approx(1 / 48)
    assert chance["i2i"] == pytest.approx(1 / 12) and chance["v2v"] == pytest.approx(1 / 48)
    expected_i2t = np.mean([ev.chance_of({k: v for k, v in ex.parse_answer(p.sample.texts["caption_a"]).items() if v})
                            for p in prompts if p.sample.task == "i2t"])
    assert chance["i2t"] == pytest.approx(expected_i2t)


def test_every_sample_judged_wrong_is_listed_with_why(prompts):
    """A score of 81% said nothing of what was wrong: each miss names its sample and what the judge found."""
    result = ev.evaluate(HalfRight("right"), prompts, ev.EvalSettings(batch_size=3))
    wrong = [(p.sample.task, p.sample.key) for p in prompts if HalfRight.wrong(p.sample)]
    assert [(m.task, m.key) for m in result.misses] == wrong
    blank = {"colour": 2, "shape": 2}  # a black output shows no colour and no shape
    assert result.miss_counts() == {"t2i": blank, "t2v": {**blank, "direction": 2}, "i2i": blank,
                                    "v2v": {**blank, "direction": 2}, "i2t": {"answer": 2}, "v2t": {"answer": 2}}
    i2t = next(m for m in result.misses if m.task == "i2t")
    reference = next(p.sample.texts["caption_a"] for p in prompts if p.sample.key == i2t.key)
    assert i2t.reason == f"answer: 'nothing', expected {reference!r}"
    assert "colour: expected" in next(m.reason for m in result.misses if m.task == "v2v")
    assert ev.format_misses(result).startswith("t2i: colour 2, shape 2; t2v: ")
    listed = ev.to_json(result)["misses"]
    assert [m["key"] for m in listed["v2t"]] == [k for t, k in wrong if t == "v2t"]


def test_an_edit_that_moves_the_shape_is_wrong():
    def pixels(scene):
        return torch.from_numpy(np.array(ex.render_image(scene)))

    source = ex.Scene("red", "circle", radius=12, cx=20, cy=32)
    target = dataclasses.replace(source, colour="blue")
    sample = Sample("i2i", {"caption": "make it blue"}, {"input_image": pixels(source), "output_image": pixels(target)})
    moved = pixels(dataclasses.replace(target, cx=44))  # the right edit, 24 of 64 cells to the right
    verdict, reference, _, _ = ev.judge_output(sample, resize_crop(moved, OUT_SIDE, OUT_SIDE))
    assert reference.ok and not verdict.ok and "position" in verdict.reason


def test_prompts_are_shared_evenly_over_ranks_and_the_counts_add_up(prompts):
    from conftest import on_two_gloo_ranks

    assert ev.share([1, 2, 3, 4, 5], 0, 2) == (0, [(1, True), (2, True), (3, True)])
    assert ev.share([1, 2, 3, 4, 5], 1, 2) == (3, [(4, True), (5, True), (1, False)])
    assert ev.share([1], 1, 2) == (1, [(1, False)])
    alone = HalfRight("right")
    single = ev.evaluate(alone, prompts[:-1], ev.EvalSettings())  # v2t: 3 prompts, uneven

    def on_rank(rank: int):  # two real ranks, their counts summed by the real all-reduce
        fake = HalfRight("right")
        result = ev.evaluate(fake, prompts[:-1], ev.EvalSettings(batch_size=1))
        return ({t: [s.correct, s.total] for t, s in result.scores.items()}, fake.calls, fake.noise,
                [dataclasses.astuple(m) for m in result.misses])

    ranks = on_two_gloo_ranks(on_rank)
    assert ranks[0][1] == ranks[1][1] == [1, 1] * len(TASKS)  # the same forwards on every rank, padding included
    for rank in (0, 1):  # every rank has the run's totals, and every miss once, in prompt order (padding uncounted)
        assert ranks[rank][0] == {t: [s.correct, s.total] for t, s in single.scores.items()}
        assert ranks[rank][3] == [dataclasses.astuple(m) for m in single.misses] and single.misses
    noise = {**ranks[1][2], **ranks[0][2]}  # (a rank's padding repeats the first prompt: the same noise)
    # each generation prompt starts from the same noise whatever the ranks and batches
    assert noise == alone.noise and len(noise) == sum(p.sample.task in GEN_TASKS for p in prompts[:-1])


def test_a_tiny_random_model_runs_every_task_and_is_judged_wrong():
    from lance_ds.config.model import ModelConfig
    from lance_ds.data.sequence import SequencePlanner
    from lance_ds.data.tokenizer import load_tokenizer
    from lance_ds.generate import Generator
    from lance_ds.model import build_model

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(size="debug", dtype="fp32", vit_dtype="fp32"), len(tokenizer), None,
                         device="cpu")
    planner = SequencePlanner(tokenizer, bundle.geometry)
    gen = Generator(bundle.model.eval(), bundle.vit, bundle.vae, planner, tokenizer)
    prompts = [dataclasses.replace(p, group=GroupConfig(name=p.group.name, task=p.group.task,
                                                        image=ev_resolution(p.sample.task)))
               for p in held_out_prompts(per_task=2)]
    result = ev.evaluate(gen, prompts, ev.EvalSettings(num_steps=2, max_new_tokens=4, num_logged=1))
    assert {t: (s.correct, s.total) for t, s in result.scores.items()} == {t: (0, 2) for t in TASKS}
    strips = {e.task: e.frames for e in result.examples if e.frames is not None}
    assert set(strips) == set(GEN_TASKS)
    assert {e.task for e in result.examples if e.frames is None} == set(UND_TASKS)
    assert strips["t2v"].shape[0] == 9 and strips["t2i"].shape[0] == 1  # frames of the generated clip


def test_a_model_without_the_vit_refuses_edits_by_name():
    """model.visual_und=false builds no ViT, which an edit's source passes through: refused, not a crash mid-way."""
    from lance_ds.config.model import ModelConfig
    from lance_ds.data.sequence import SequencePlanner
    from lance_ds.data.tokenizer import load_tokenizer
    from lance_ds.generate import GenerateError, Generator
    from lance_ds.model import build_model

    tokenizer = load_tokenizer()
    bundle = build_model(ModelConfig(size="debug", dtype="fp32", vit_dtype="fp32", visual_und=False), len(tokenizer),
                         None, device="cpu")
    gen = Generator(bundle.model.eval(), bundle.vit, bundle.vae, SequencePlanner(tokenizer, bundle.geometry),
                    tokenizer)
    edit = next(p.sample for p in held_out_prompts(per_task=1) if p.sample.task == "i2i")
    with pytest.raises(GenerateError, match=r"model.visual_und=false \(no ViT\), so it cannot serve \['i2i'\]"):
        gen.generate([edit], num_steps=1)


def ev_resolution(task: str):
    from lance_ds.config.data import ImageOptions

    return ImageOptions(resolution=32 if task in GEN_TASKS else 64)


def test_table_tensorboard_and_json(prompts, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lance_ds.metrics import TensorBoard

    before = ev.evaluate(FakeGenerator("noise"), prompts, ev.EvalSettings())
    after = ev.evaluate(FakeGenerator("right"), prompts, ev.EvalSettings())
    table = ev.format_table({"step 0": before, "step 40": after}).splitlines()
    assert "step 0" in table[0] and "step 40" in table[0] and len(table) == 2 + len(TASKS)
    t2i = next(line for line in table if line.startswith("| t2i"))
    assert [c.strip() for c in t2i.split("|")[3:8]] == ["4", "8%", "0%", "100%", ">= 80%"]
    tb = TensorBoard(tmp_path, enabled=True)
    ev.log_to_tensorboard(tb, 0, before)
    ev.log_to_tensorboard(tb, 40, after)
    tb.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/t2v")] == [(0, 0.0), (40, 1.0)]
    assert "eval/samples/v2v/0" in acc.Tags()["images"]
    assert "eval/answers/text_summary" in acc.Tags()["tensors"]
    assert ev.to_json(after)["scores"]["i2t"]["accuracy"] == 1.0


def test_a_task_whose_targets_the_judges_cannot_read_is_not_judged(tmp_path, capsys):
    """Held-out data of another world (a user's own photos, whose captions happen to name a colour): the judges score
    its targets themselves far below 100%, so a score and a missed goal there would be a verdict about nothing."""
    from types import SimpleNamespace

    scores = {"t2i": ev.TaskScore("t2i", 3, 30, 0.08, reference=0.23), "i2i": ev.TaskScore("i2i", 12, 30, 0.08, 1.0),
              "i2t": ev.TaskScore("i2t", 30, 30, 0.18)}
    args = SimpleNamespace(steps=2, cfg=4.0, tensorboard="none", ema=False, json=str(tmp_path / "s.json"),
                           num_per_task=30, dataset_config="mine.yaml")
    misses = [ev.Miss("t2i", "a", "colour: expected red, found None"), ev.Miss("i2i", "b", "size: resized 30.0% (...)")]
    missed = ev.report(args, ev.EvalSettings(), {"trained": ev.Evaluation(scores, misses=misses)}, -1, None)
    out = capsys.readouterr().out
    assert missed == ["i2i"] and "goals: missed by i2i (not judged: t2i)" in out
    assert "wrong, by what the judges found (each sample in the JSON's misses): i2i: size 1\n" in out  # (t2i: blind)
    assert "warning: t2i: the judges recognise 23% of its held-out targets" in out


def test_cli_refuses_bad_arguments_before_loading_anything(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert ev.main(["--checkpoint", str(tmp_path), "--dataset_config", str(missing), "--num-per-task", "0"]) == 2
    err = capsys.readouterr().err
    assert "--num-per-task" in err and "nope.yaml" in err


def test_cli_refuses_outputs_it_could_not_write_and_bad_steps_before_loading(tmp_path, capsys):
    (tmp_path / "somedir").mkdir()
    (tmp_path / "afile").write_text("mine")
    common = ["--checkpoint", str(tmp_path / "no_run"), "--dataset_config", str(tmp_path / "nope.yaml")]
    assert ev.main([*common, "--json", str(tmp_path / "somedir"), "--tensorboard", str(tmp_path / "afile" / "tb"),
                    "--steps", "0", "--cfg", "inf"]) == 2
    err = capsys.readouterr().err
    assert f"--json: {tmp_path / 'somedir'} is a directory" in err
    assert f"--tensorboard: {tmp_path / 'afile'} is a file" in err
    assert "--steps must be >= 1, got 0" in err
    assert "--cfg must be a finite number >= 0 (1: no guidance), got inf" in err
    assert ev.main([*common, "--tensorboard", str(tmp_path / "afile")]) == 2
    assert f"--tensorboard: {tmp_path / 'afile'} is a file, not a directory" in capsys.readouterr().err


def test_cli_writes_the_json_where_asked_creating_its_directory(prompts, tmp_path, monkeypatch, capsys):
    import json

    import lance_ds.config.run
    from lance_ds.generate import Generator

    trained = FakeGenerator("right")
    trained.source, trained.planner = "fake", None
    monkeypatch.setattr(lance_ds.config.run, "load_dataset", lambda *args: None)  # the parts that need a checkpoint
    monkeypatch.setattr(Generator, "from_checkpoint", lambda *args, **kwargs: trained)
    monkeypatch.setattr(ev, "checkpoint_step", lambda checkpoint: (-1, None))
    monkeypatch.setattr(ev, "load_prompts", lambda dataset, num_per_task, planner, max_tokens: prompts)
    monkeypatch.setattr(ev, "prompt_token_limit", lambda checkpoint: 1024)
    out = tmp_path / "nodir" / "x.json"
    assert ev.main(["--checkpoint", "fake", "--dataset_config", "fake.yaml", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["trained"]["scores"]["t2i"]["accuracy"] == 1.0
    printed = capsys.readouterr().out
    assert "| t2i" in printed and f"scores: {out}" in printed and "wrong, by what" not in printed  # (none wrong)
    trained.mode = "recolour"
    assert ev.main(["--checkpoint", "fake", "--dataset_config", "fake.yaml", "--json", str(out)]) == 0
    assert "wrong, by what the judges found (each sample in the JSON's misses): t2i: colour 4; " in capsys.readouterr().out
    assert len(json.loads(out.read_text())["results"]["trained"]["misses"]["v2v"]) == 4
    trained.mode = "right"
    # an export has no run directory: without --json the scores are not kept, and the user is told
    assert ev.main(["--checkpoint", "fake", "--dataset_config", "fake.yaml", "--tensorboard", "none"]) == 0
    assert "scores: not saved (an export has no run directory" in capsys.readouterr().out


def test_evaluating_a_step_again_replaces_its_tensorboard_points(prompts, tmp_path, monkeypatch):
    """Evaluate is re-run on a checkpoint (other settings, a fixed judge): TensorBoard showed both runs' points. Each
    evaluated step keeps its own scores file in the run dir (one eval.json was replaced by the next step's)."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import lance_ds.config.run
    from lance_ds.generate import Generator

    trained = FakeGenerator("right")
    trained.source, trained.planner = "fake", None
    monkeypatch.setattr(lance_ds.config.run, "load_dataset", lambda *args: None)
    monkeypatch.setattr(Generator, "from_checkpoint", lambda *args, **kwargs: trained)
    monkeypatch.setattr(ev, "load_prompts", lambda dataset, num_per_task, planner, max_tokens: prompts)
    monkeypatch.setattr(ev, "prompt_token_limit", lambda checkpoint: 1024)
    tb = tmp_path / "tb"
    for step, mode in ((40, "noise"), (80, "right"), (40, "right")):  # step 40 once more, now judged right
        trained.mode = mode
        monkeypatch.setattr(ev, "checkpoint_step", lambda checkpoint, step=step: (step, tmp_path / "run"))
        assert ev.main(["--checkpoint", "fake", "--dataset_config", "fake.yaml", "--tensorboard", str(tb)]) == 0
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    assert sorted((e.step, e.value) for e in acc.Scalars("eval/t2v")) == [(40, 1.0), (80, 1.0)]
    trained.mode = "noise"  # the EMA weights of step 40 (--ema): a file of their own, the trained ones' kept
    assert ev.main(["--checkpoint", "fake", "--dataset_config", "fake.yaml", "--tensorboard", str(tb), "--ema"]) == 0
    scores = {f.name: json.loads(f.read_text()) for f in (tmp_path / "run" / "eval").iterdir()}
    assert sorted(scores) == ["step_00000040.ema.json", "step_00000040.json", "step_00000080.json"]
    assert scores["step_00000040.json"]["results"]["step 40"]["scores"]["t2v"]["accuracy"] == 1.0  # the 2nd run's
    assert scores["step_00000040.json"]["weights"] == "trained" and scores["step_00000040.ema.json"]["weights"] == "ema"
    assert scores["step_00000040.ema.json"]["results"]["step 40"]["scores"]["t2v"]["accuracy"] < 1.0
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()  # the EMA's points are a curve of their own: the trained weights' curve is unchanged
    assert sorted((e.step, e.value) for e in acc.Scalars("eval/t2v")) == [(40, 1.0), (80, 1.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval_ema/t2v")] == [(40, 0.0)]
