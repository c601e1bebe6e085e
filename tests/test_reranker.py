"""The re-ranker of composed queries' first candidates: its file, its training, evaluation and the app."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip4cir.commands.evaluate import main as evaluate_main
from clip4cir.commands.train_combiner import main as combiner_main
from clip4cir.commands.train_reranker import main as reranker_main
from clip4cir.core.errors import ModelError, SearchError
from clip4cir.evaluation.composed import reranked_ranks
from clip4cir.models.combiner import Combiner
from clip4cir.models.encoder_file import load_encoder, save_encoder
from clip4cir.models.factory import create_model
from clip4cir.models.feature_sum import combine_sum
from clip4cir.models.reranker import Reranker, load_reranker, save_reranker
from clip4cir.models.runtime import Towers
from clip4cir.retrieval.index import CatalogIndex
from clip4cir.retrieval.item_table import Item
from clip4cir.retrieval.search import SearchEngine
from combiner.reranking import candidates_with_target

TRAIN = ["--model", "cir-tiny", "--batch-size", "8", "--workers", "0", "--quiet", "--epochs", "1", "--save-best"]


def fit(reranker: Reranker, parts, candidates, first, label: int, steps: int = 150) -> Reranker:
    """Train a re-ranker to put candidate ``label`` first for one query (what training does over many)."""
    optimizer = torch.optim.Adam(reranker.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(100 * reranker(parts, candidates, first), torch.tensor([label]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return reranker.eval()


def test_an_untrained_reranker_keeps_the_first_stage_order_and_a_trained_one_moves_the_target_up():
    torch.manual_seed(0)
    gallery = F.normalize(torch.randn(6, 8), dim=-1)
    query = F.normalize(gallery[0] + 0.9 * gallery[1], dim=-1)[None]  # item 0 first, item 1 (the target) second
    reference, text = torch.randn(1, 8), torch.randn(1, 8)
    ranks = torch.tensor([1])
    reranker = Reranker(8, width=16, heads=2, depth=3)
    assert reranked_ranks(reranker, reference, text, query, gallery, torch.tensor([1]), None, ranks).tolist() == [1]
    first, top = (query @ gallery.T).topk(3)
    fit(reranker, torch.stack([reference, text, query], 1), gallery[top], first, label=int((top[0] == 1).nonzero()))
    assert reranked_ranks(reranker, reference, text, query, gallery, torch.tensor([1]), None, ranks).tolist() == [0]
    # a target beyond the re-ranked depth keeps its first-stage rank
    far = torch.tensor([int((query @ gallery.T)[0].argsort(descending=True)[4])])
    assert reranked_ranks(reranker, reference, text, query, gallery, far, None, torch.tensor([4])).tolist() == [4]


def test_the_target_joins_the_candidates_last_when_the_first_stage_missed_it():
    pool = torch.tensor([3, 5, 8, 9])  # image indices of a category, sorted
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.9, 0.8]])
    first, images, label = candidates_with_target(scores, pool, torch.tensor([8, 9]), depth=2)
    assert images.tolist() == [[3, 8], [8, 9]]  # query 0 missed image 8: it takes the last place
    torch.testing.assert_close(first, torch.tensor([[0.9, 0.1], [0.9, 0.8]]))  # with its own first-stage score
    assert label.tolist() == [1, 1]


def test_a_reranker_file_round_trips_and_refuses_another_encoder(tmp_path):
    encoder, other = create_model("cir-tiny", seed=0), create_model("cir-tiny", seed=1)
    reranker = Reranker(encoder.dim, width=16, heads=2, depth=7, first_stage="sum")
    save_reranker(reranker, tmp_path / "r.safetensors", encoder.record(), {"epoch": 3})
    again = load_reranker(tmp_path / "r.safetensors", encoder=encoder)
    assert (again.depth, again.first_stage, again.width) == (7, "sum", 16)
    for a, b in zip(reranker.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ModelError, match="trained on features of encoder"):
        load_reranker(tmp_path / "r.safetensors", encoder=other)
    save_encoder(encoder, tmp_path / "enc.safetensors")
    with pytest.raises(ModelError, match="not a clip4cir re-ranker file"):
        load_reranker(tmp_path / "enc.safetensors")


def test_train_reranker_trains_on_the_combiners_candidates_and_evaluate_reads_it(tiny_root, tmp_path):
    encoder_file = tmp_path / "enc.safetensors"
    save_encoder(create_model("cir-tiny"), encoder_file)
    assert combiner_main(["--data", str(tiny_root), "--output", str(tmp_path / "s2"), "--clip-checkpoint",
                          str(encoder_file)] + TRAIN) == 0
    combiner = tmp_path / "s2" / "best.safetensors"
    assert reranker_main(["--data", str(tiny_root), "--output", str(tmp_path / "rr"), "--clip-checkpoint",
                          str(encoder_file), "--combiner", str(combiner), "--depth", "10"] + TRAIN) == 0
    reranker = load_reranker(tmp_path / "rr" / "best.safetensors", encoder=load_encoder(encoder_file))
    assert (reranker.depth, reranker.first_stage) == (10, "combiner")
    assert reranker.score[-1].weight.abs().sum() > 0  # it learned a correction
    common = ["--data", str(tiny_root), "--clip-checkpoint", str(encoder_file), "--combiner", str(combiner), "--quiet"]
    assert evaluate_main(common + ["--reranker", str(tmp_path / "rr" / "best.safetensors")]) == 0
    with pytest.raises(ValueError, match="--reranker re-ranks composed queries of a split with targets"):
        evaluate_main(common + ["--reranker", str(tmp_path / "rr" / "best.safetensors"), "--split", "test",
                                "--predictions", str(tmp_path / "p")])
    with pytest.raises(ValueError, match="re-ranks combiner queries, not --mode sum"):
        evaluate_main(common + ["--reranker", str(tmp_path / "rr" / "best.safetensors"), "--mode", "sum"])
    with pytest.raises(ValueError, match="--width 10 must be a multiple of --heads 4"):
        reranker_main(["--data", str(tiny_root), "--output", str(tmp_path / "rr2"), "--clip-checkpoint",
                       str(encoder_file), "--width", "10"] + TRAIN)


class WordTowers(Towers):
    """A text tower that knows two words: each text's feature says which it holds."""

    def text(self, texts):
        out = torch.zeros(len(texts), self.encoder.dim)
        for row, text in enumerate(texts):
            out[row, 0], out[row, 1] = float("blue" in text), float("striped" in text)
        return out


def test_the_app_re_ranks_a_composed_querys_first_candidates(tmp_path):
    encoder = create_model("cir-tiny")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(8, encoder.dim)).astype(np.float32)
    items = [Item(f"item{i}", f"{i}.jpg") for i in range(8)]
    index = CatalogIndex.create(tmp_path / "index", items, features, encoder=encoder.record())
    engine = SearchEngine(index, encoder, towers=WordTowers(encoder))
    before = [h.id for h in engine.composed_search("is blue", reference_id="item0", mode="sum", k=5).hits]
    reranker = Reranker(encoder.dim, width=16, heads=2, depth=5, first_stage="sum")
    engine.reranker = reranker  # untrained: the first stage's order
    assert [h.id for h in engine.composed_search("is blue", reference_id="item0", mode="sum", k=5).hits] == before
    reference = torch.from_numpy(index.feature("item0")).float()
    text = engine.towers.text(["is blue"])[0]
    query = F.normalize(combine_sum(reference[None], text[None]).float(), dim=-1)[0]
    candidates = torch.from_numpy(np.stack([index.feature(i) for i in before])).float()
    first = torch.from_numpy(np.stack([index.feature(i) for i in before])).float() @ query
    fit(reranker, torch.stack([reference, text, query])[None], candidates[None], first[None] / 1, label=3)
    after = engine.composed_search("is blue", reference_id="item0", mode="sum", k=5)
    assert after.hits[0].id == before[3]  # the candidate it was trained to prefer comes first
    assert sorted(h.id for h in after.hits) == sorted(before)
    # the first results do not depend on how many are asked for: the re-ranked depth is the re-ranker's
    assert [h.id for h in engine.composed_search("is blue", reference_id="item0", mode="sum", k=7).hits][:5] == \
        [h.id for h in after.hits]
    # a re-ranker of the Combiner's candidates does not touch the Sum's, and the answer says so
    reranker.first_stage = "combiner"
    untouched = engine.composed_search("is blue", reference_id="item0", mode="sum", k=5)
    assert [h.id for h in untouched.hits] == before
    assert "not re-ranked: the re-ranker re-ranks combiner queries" in untouched.notes
    with pytest.raises(SearchError, match="another Combiner's candidates"):
        SearchEngine(index, encoder, Combiner(encoder.dim), towers=WordTowers(encoder), reranker=reranker)
