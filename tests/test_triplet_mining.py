"""Triplets mined from titles: which words replace which, edits within a category, the target nearest the
reference, no val image in training, and the command's file that the supervised pipeline opens."""
import json
import logging
import re

import numpy as np
from helpers import REPO

from clip4cir.commands.common import run
from clip4cir.commands.mine_triplets import main as mine_main
from clip4cir.data.sources import open_source
from clip4cir.data.sources.triplet_files import TripletFile
from clip4cir.training.triplet_mining import TEMPLATES, CategoryTitles, alternatives

BASE = ["--clip-checkpoint", str(REPO / "demo" / "base" / "encoder.safetensors"), "--quiet", "--workers", "0",
        "--device", "cpu"]


COLOURS, PATTERNS = ("red", "blue", "green", "black"), ("striped", "plain", "dotted")


def garment_titles(n: int = 120, seed: int = 0) -> dict[str, tuple[str, ...]]:
    """Titles naming a colour, a pattern or both (as shop titles name some attributes), never two of one kind."""
    rng = np.random.default_rng(seed)
    titles = {}
    for i in range(n):
        colour, pattern = COLOURS[rng.integers(4)], PATTERNS[rng.integers(3)]
        titles[f"d{i:03d}"] = ((f"{colour} {pattern} dress", f"{colour} dress", f"{pattern} dress")[i % 3],)
    return titles


def test_words_that_replace_each_other_are_alternatives_and_words_said_together_are_not():
    alts = alternatives(garment_titles())
    assert alts["red"] == {"blue", "green", "black"} and alts["striped"] == {"plain", "dotted"}
    assert "dress" not in alts  # never replaced
    # "red dress" / "striped dress" share a blank, but many titles say both: not one attribute's values
    assert not alts["red"] & set(PATTERNS)
    few = {"a": ("red striped dress",), "b": ("blue striped dress",), "c": ("red dress",), "d": ("striped dress",)}
    assert alternatives(few) == {}  # four titles are too few to tell that two words exclude each other


def test_an_edit_stays_in_its_category_and_its_targets_say_the_new_word_and_nothing_contradicting():
    texts = garment_titles()
    shirts = {i.replace("d", "s"): (t[0].replace("dress", "shirt"),) for i, t in texts.items()}
    categories = {**{i: ("dress",) for i in texts}, **{i: ("shirt",) for i in shirts}}
    source = {**texts, **shirts}
    by_category = {c: CategoryTitles({i: source[i] for i in source if categories[i] == (c,)})
                   for c in ("dress", "shirt")}
    for category, titles in by_category.items():
        edits = titles.edits(per_reference=3, seed=0)
        assert len(edits) > len(titles.images)  # most titles have several edits with a target
        for edit in edits:
            reference = set(source[edit.reference][0].split())
            assert edit.old in reference and edit.new not in reference
            for k in titles.candidates(edit.reference, edit.old, edit.new):
                words = set(source[titles.images[k]][0].split())
                assert categories[titles.images[k]] == (category,) and edit.new in words and edit.old not in words
                kind = set(COLOURS) if edit.new in COLOURS else set(PATTERNS)
                assert not (reference - {edit.old}) & (set(COLOURS) | set(PATTERNS)) - kind or \
                    (reference - {edit.old}) & words  # the reference's other attribute is kept or unsaid
                assert not (words - {edit.new}) & kind  # and no second value of the edited one
    again = CategoryTitles({i: source[i] for i in source if categories[i] == ("dress",)}).edits(3, seed=0)
    assert again == by_category["dress"].edits(3, seed=0)  # the same titles and seed: the same edits
    more = CategoryTitles({**texts, "d999": ("black dotted dress",)}).edits(3, seed=0)
    assert [e for e in more if e.reference != "d999"] == again  # another image changes no one else's draws


def test_each_reference_gets_an_edit_when_one_has_a_target_whatever_is_drawn_first():
    white = {f"w{i}": ("white plain dress",) for i in range(24)}  # white is never said without plain
    texts = {**garment_titles(), **white, "r": ("red striped dress",)}
    titles = CategoryTitles(texts)
    with_target = [o for o in titles.options("r") if len(titles.candidates("r", *o))]
    assert ("red", "white") in titles.options("r") and ("red", "white") not in with_target and with_target
    for seed in range(20):
        [edit] = [e for e in titles.edits(per_reference=1, seed=seed) if e.reference == "r"]
        assert (edit.old, edit.new) in with_target


def test_the_target_is_the_candidate_nearest_the_reference():
    texts = {**garment_titles(), "r": ("red dress",)}
    titles = CategoryTitles(texts)
    features = np.random.default_rng(0).normal(size=(len(titles.images), 8))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    edit = next(e for e in titles.edits(10, seed=0) if e.reference == "r" and e.new == "blue")
    [target] = titles.targets([edit], features)
    blue = [i for i in titles.images if "blue" in texts[i][0].split()]
    assert target == max(blue, key=lambda i: features[titles.images.index(i)] @ features[titles.images.index("r")])
    assert len(set(edit.captions)) == 2 and all("blue" in c for c in edit.captions)


def test_the_command_mines_train_and_val_apart_into_a_triplet_file_training_opens(tiny_root, tmp_path, capsys,
                                                                                   caplog):
    output = tmp_path / "mined.jsonl"
    with caplog.at_level(logging.INFO):
        assert run(mine_main, ["--data", str(tiny_root / "pairs.jsonl"), "--output", str(output)] + BASE) == 0
    assert f"--data {output} --images {tiny_root}" in caplog.text  # the command to train next
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    pairs = open_source(tiny_root / "pairs.jsonl")
    val_images = set(pairs.texts("val"))
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows and len(train_rows) < len(rows)
    assert not {i for r in train_rows for i in (r["reference"], r["target"])} & val_images
    assert {i for r in rows if r["split"] == "val" for i in (r["reference"], r["target"])} <= val_images
    for row in rows:  # the target's title says the new word, the reference's says the old one and not the new
        said = [m.groupdict() for c in row["caption"] for t in TEMPLATES
                if (m := re.fullmatch(t.replace("{old}", "(?P<old>.+)").replace("{new}", "(?P<new>.+)"), c))]
        old, new = said[0].get("old"), said[0]["new"]
        target, reference = (" ".join(pairs.texts(row["split"])[row[k]]).lower().split()
                             for k in ("target", "reference"))
        assert new in target and new not in reference and (old is None or old in reference)
    triplets = TripletFile(output, tiny_root)
    assert triplets.splits() == ("train", "val") and len(triplets.triplets("train")) == len(train_rows)
    assert triplets.categories()  # each triplet keeps its FashionIQ category (for hard negatives)

    before = output.read_bytes()
    assert run(mine_main, ["--data", str(tiny_root / "pairs.jsonl"), "--output", str(output)] + BASE) == 2
    assert "exists" in capsys.readouterr().err and output.read_bytes() == before  # never overwritten
    assert run(mine_main, ["--data", str(tiny_root), "--output", str(tmp_path / "x.jsonl")] + BASE) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "image-text pairs" in err and not (tmp_path / "x.jsonl").exists()


def test_the_command_refuses_bad_inputs_in_one_line_before_reading_an_image(tmp_path, capsys):
    from PIL import Image
    shop = tmp_path / "shop"
    shop.mkdir()
    texts = garment_titles(240)
    for n, image in enumerate(texts):
        Image.new("RGB", (16, 16), (n, 0, 0)).save(shop / f"{image}.jpg")
    (shop / "pairs.csv").write_text("image,text,split\n" + "".join(
        f"{i}.jpg,{t},{('train', 'val')[n % 2]}\n" for n, (i, (t,)) in enumerate(texts.items())))
    (shop / "same.csv").write_text("image,text\n" + "".join(f"{i}.jpg,a dress\n" for i in texts))
    (tmp_path / "afile").write_text("mine")
    (shop / "d000.jpg").write_bytes(b"broken")  # read only after the titles and the output are checked
    cases = {"not .jsonl": ("pairs.csv", tmp_path / "out.csv", "name it .jsonl"),
             "a file as folder": ("pairs.csv", tmp_path / "afile" / "out.jsonl", "does not exist"),
             "a folder": ("pairs.csv", tmp_path, "is a folder"),
             "titles with no edit": ("same.csv", tmp_path / "same.jsonl", "no one-word edit"),
             "an unreadable image": ("pairs.csv", tmp_path / "out.jsonl", "d000")}
    for name, (data, output, message) in cases.items():
        assert run(mine_main, ["--data", str(shop / data), "--output", str(output)] + BASE) == 2, name
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, (name, err)
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "out.jsonl").exists()

