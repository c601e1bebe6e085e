"""Triplets mined from titles: which words replace which, edits within a category, the target nearest the
reference, no val image in training, and the command's file that the supervised pipeline opens."""
import json
import logging
import re

import torch

from clip4cir.commands.common import run
from clip4cir.commands.mine_triplets import main as mine_main
from clip4cir.data.sources import open_source
from clip4cir.data.sources.triplet_files import TripletFile
from clip4cir.training.triplet_mining import TEMPLATES, alternatives, choose_triplets, title_edits

from conftest import REPO

BASE = ["--clip-checkpoint", str(REPO / "demo" / "base" / "encoder.safetensors"), "--quiet", "--workers", "0",
        "--device", "cpu"]


def test_words_that_replace_each_other_are_alternatives_and_words_said_together_are_not():
    texts = {"a": ("red striped dress",), "b": ("blue striped dress",), "c": ("red dress",),
             "d": ("striped dress",), "e": ("green dress",)}
    alts = alternatives(texts)
    assert alts["red"] == {"blue", "green"} and alts["blue"] == {"red"}  # "blue _ dress" has no green
    assert "striped" not in alts["red"]  # "red _ dress" / "striped dress" share a blank, but one title says both
    assert "dress" not in alts  # never replaced


def test_edits_stay_within_a_category_and_exclude_contradicting_targets():
    texts = {"d1": ("red striped dress",), "d2": ("blue striped dress",), "d3": ("blue plain dress",),
             "d4": ("red plain dress",), "s1": ("blue striped shirt",), "s2": ("red striped shirt",)}
    categories = {i: ("dress" if i.startswith("d") else "shirt",) for i in texts}
    edits = title_edits(texts, categories, per_reference=5, seed=0)
    assert edits and all(categories[c] == categories[e.reference] for e in edits for c in e.candidates)
    d1_to_blue = next(e for e in edits if e.reference == "d1" and e.new == "blue")
    assert d1_to_blue.candidates == ("d2",)  # d3 is blue too, but plain: it contradicts "striped"
    assert title_edits(texts, categories, 5, seed=0) == edits  # the same data and seed, the same edits


def test_the_target_is_the_candidate_nearest_the_reference():
    texts = {"r": ("red dress",), "x": ("blue dress",), "y": ("blue dress",), "z": ("blue dress",)}
    edit = next(e for e in title_edits(texts, {}, 1, seed=0) if e.reference == "r")
    features = {i: torch.nn.functional.normalize(v, dim=0) for i, v in
                {"r": torch.tensor([1.0, 0.0]), "x": torch.tensor([0.0, 1.0]), "y": torch.tensor([0.9, 0.3]),
                 "z": torch.tensor([-1.0, 0.1])}.items()}
    [row] = choose_triplets([edit], features, seed=0, category_of={})
    assert row["target"] == "y" and row["reference"] == "r" and len(row["caption"]) == 2
    assert all("blue" in c and "red" in c or c == "make it blue" for c in row["caption"])


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
