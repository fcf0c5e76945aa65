"""The analyses on hand-made tensors with known answers: no weights.

A fake cache holds chosen activations for one layout (BOS, a 2x2 image, instruction,
answer); a fake model holds an identity final norm and a chosen unembedding.
"""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from vlens import analysis as va
from vlens.analysis._common import stack_rows
from vlens.analysis.tokens import _counts, _order
from vlens.errors import AnalysisInputError
from vlens.layout import assemble_layout, grid_span

IMG = 4
# pos:      0  1  2    3    4    5    6   7   8   9   10
IDS = [1, 9, IMG, IMG, IMG, IMG, 10, 11, 12, 20, 21]
IMAGE_POS = [2, 3, 4, 5]
INSTRUCTION_POS = [1 + 5, 7, 8]  # text after the image, before the answer
ANSWER_START = 9
D = 8
N_LAYERS = 2
HEADS = 2


def layout(rows: int = 1):
    ids = torch.tensor([IDS] * rows)
    spans = [[grid_span(0, torch.tensor(IMAGE_POS), 2, 2)] for _ in range(rows)]
    return assemble_layout(ids, torch.ones_like(ids), IMG, spans, [ANSWER_START] * rows)


class FakeCache(dict):
    def __init__(self, acts: dict, rows: int = 1):
        super().__init__(acts)
        self.layout = layout(rows)
        self.model = SimpleNamespace(cfg=SimpleNamespace(n_layers=N_LAYERS))


def fake_model(W_E: torch.Tensor, W_U: torch.Tensor):
    head = torch.nn.Linear(W_U.shape[0], W_U.shape[1], bias=False)
    head.weight.data = W_U.T.clone()
    return SimpleNamespace(
        n_layers=N_LAYERS,
        W_E=W_E,
        W_U=W_U,
        tokenizer=_Tok(W_U.shape[1]),
        # No logit soft cap: the TransformerLens adapter's output transform is the identity.
        bridge=SimpleNamespace(
            ln_final=SimpleNamespace(original_component=torch.nn.Identity()),
            adapter=SimpleNamespace(apply_output_logits_transform=lambda logits: logits),
        ),
        hf_model=SimpleNamespace(get_output_embeddings=lambda: head),
    )


class _Tok:
    """Words are written ``t<id>``."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def encode(self, word: str, add_special_tokens: bool = False) -> list[int]:
        return [int(word[1:])]


def resid_acts(states: list[torch.Tensor]) -> dict:
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(N_LAYERS)]
    return {n: s.unsqueeze(0) for n, s in zip(names, states)}


U = torch.eye(D, 16)  # unembedding: residual direction i -> token i, 16 tokens


def basis(i: int, d: int = D) -> torch.Tensor:
    e = torch.zeros(d)
    e[i] = 1.0
    return e


# ---- attention ----------------------------------------------------------------------


def one_hot_patterns(key: int) -> dict:
    """Every query attends only to ``key``."""
    p = torch.zeros(1, HEADS, len(IDS), len(IDS))
    p[..., key] = 1.0
    return {f"blocks.{l}.attn.hook_pattern": p.clone() for l in range(N_LAYERS)}


def test_one_hot_attention_on_an_image_token_gives_mass_one():
    result = va.attention_to_image(FakeCache(one_hot_patterns(key=3)), query="instruction").row(0)
    assert torch.equal(result.mass, torch.ones(N_LAYERS, HEADS))
    assert torch.equal(result.received, torch.tensor([[0.0, 1.0, 0.0, 0.0]] * N_LAYERS))
    assert torch.equal(result.image_positions, torch.tensor(IMAGE_POS))
    assert torch.equal(result.query_positions, torch.tensor(INSTRUCTION_POS))


def test_one_hot_attention_on_text_gives_mass_zero():
    result = va.attention_to_image(FakeCache(one_hot_patterns(key=0)), query="last").row(0)
    assert torch.equal(result.mass, torch.zeros(N_LAYERS, HEADS))
    assert torch.equal(result.query_positions, torch.tensor([len(IDS) - 1]))


def test_sink_tokens_flag_the_token_that_takes_the_attention():
    acts = one_hot_patterns(key=0)
    for name in acts:  # spread a little everywhere, a lot on image token 1 (position 3)
        p = torch.full_like(acts[name], 0.01)
        p[..., 3] = 0.5
        acts[name] = p
    sinks = va.find_sink_tokens(va.attention_to_image(FakeCache(acts)), factor=5.0)
    assert torch.equal(sinks.row(0).is_sink, torch.tensor([[False, True, False, False]] * N_LAYERS))
    assert torch.equal(sinks.positions(layer=0), torch.tensor([3]))
    assert set(sinks.to_frame().columns) == {"batch", "layer", "pos", "ratio", "is_sink"}


def test_attention_mass_is_the_share_on_image_keys():
    p = torch.zeros(1, HEADS, len(IDS), len(IDS))
    p[:, 0, :, 2] = 0.25  # head 0: a quarter on the image, the rest on BOS
    p[:, 0, :, 0] = 0.75
    p[:, 1, :, 2:6] = 0.25  # head 1: all on the image, evenly
    acts = {f"blocks.{l}.attn.hook_pattern": p for l in range(N_LAYERS)}
    batched = va.attention_to_image(FakeCache(acts))
    result = batched.row(0)
    assert torch.allclose(result.mass, torch.tensor([[0.25, 1.0]] * N_LAYERS))
    assert torch.allclose(result.received[0], torch.tensor([0.25, 0.125, 0.125, 0.125]))
    frame = batched.to_frame()
    assert list(frame.columns) == ["batch", "layer", "head", "mass"] and len(frame) == N_LAYERS * HEADS


# ---- similarity ---------------------------------------------------------------------


def states_with(image_vec: torch.Tensor, text_vec: torch.Tensor) -> list[torch.Tensor]:
    s = torch.zeros(len(IDS), D)
    s[IMAGE_POS] = image_vec
    s[INSTRUCTION_POS] = text_vec
    s[[0, 9, 10]] = basis(7)
    return [s.clone() for _ in range(N_LAYERS + 1)]


def test_orthogonal_states_have_cosine_zero_and_parallel_ones_one():
    model = fake_model(torch.eye(D), U)
    orth = va.modality_similarity(model, FakeCache(resid_acts(states_with(basis(0), basis(1))))).row(0)
    assert torch.equal(orth.per_layer, torch.zeros(N_LAYERS + 1))
    same = va.modality_similarity(model, FakeCache(resid_acts(states_with(3 * basis(2), 0.5 * basis(2))))).row(0)
    assert torch.allclose(same.per_layer, torch.ones(N_LAYERS + 1))
    assert same.per_token.shape == (N_LAYERS + 1, len(IMAGE_POS))


def test_vocab_similarity_finds_the_embedding_row():
    W_E = torch.eye(D)
    states = states_with(basis(5) * 2.0, basis(1))
    batched = va.modality_similarity(fake_model(W_E, W_E), FakeCache(resid_acts(states)), against="vocab")
    result = batched.row(0)
    assert torch.allclose(result.per_layer, torch.ones(N_LAYERS + 1))
    assert torch.equal(result.nearest_ids, torch.full((N_LAYERS + 1, len(IMAGE_POS)), 5))
    assert "nearest_id" in batched.to_frame().columns


def test_text_embedding_similarity_reads_the_token_ids():
    W_E = torch.zeros(32, D)
    W_E[10], W_E[11], W_E[12] = basis(0), basis(0), basis(1)  # the instruction's tokens
    acts = resid_acts(states_with(basis(0), basis(3)))
    acts["embed.hook_in"] = torch.tensor([IDS])
    result = va.modality_similarity(fake_model(W_E, W_E.T), FakeCache(acts), against="text_embeddings").row(0)
    assert torch.allclose(result.per_layer, torch.full((N_LAYERS + 1,), 2 / 3))


# ---- logit lens ---------------------------------------------------------------------


def test_logit_lens_reads_a_one_hot_residual():
    s = torch.zeros(len(IDS), D)
    for i, p in enumerate(IMAGE_POS):
        s[p] = 10 * basis(i)  # image token i points at vocabulary entry i
    model = fake_model(torch.eye(D), U)
    states = [s, s, -s]  # the last layer points away from it
    batched = va.logit_lens(model, FakeCache(resid_acts(states)), k=2, words=["t0", 1], labels=["t0", "t1", None, 6])
    result = batched.row(0)
    assert torch.equal(result.top_ids[0, :, 0], torch.arange(4))
    assert torch.equal(result.word_ranks[0, 0], torch.tensor([0, 1]))  # t0 first, t1 tied with the rest: 1 above
    assert torch.allclose(result.top_logprobs[0, :, 0], torch.log_softmax(10 * basis(0, 16), 0)[0].expand(4))
    # Layers 0 and 1: tokens 0 and 1 match their labels, 3 does not (label 6), 2 is unlabelled.
    assert torch.allclose(result.match_rate, torch.tensor([2 / 3, 2 / 3, 0.0]))
    frame = batched.to_frame()
    assert list(frame.columns) == ["batch", "layer", "pos", "rank", "token_id", "logprob"]
    assert len(frame) == (N_LAYERS + 1) * 4 * 2 and set(frame["pos"]) == set(IMAGE_POS)
    assert set(batched.words_frame().columns) == {"batch", "layer", "pos", "word", "logprob", "rank"}


def test_logit_lens_positions_and_layers_select():
    s = torch.randn(len(IDS), D)
    model = fake_model(torch.eye(D), U)
    cache = FakeCache(resid_acts([s, s, s]))
    result = va.logit_lens(model, cache, positions=[7, 2], layers=[2], k=1).row(0)
    assert result.top_ids.shape == (1, 2, 1)
    assert torch.equal(result.layers, torch.tensor([2]))
    assert torch.equal(result.top_ids[0, :, 0], s[[7, 2]].argmax(-1))
    last = va.logit_lens(model, cache, positions="last", k=1)
    assert torch.equal(last.positions, torch.tensor([[10]]))


# ---- errors -------------------------------------------------------------------------


def test_missing_hooks_say_which_to_cache():
    model = fake_model(torch.eye(D), U)
    with pytest.raises(AnalysisInputError, match=r"blocks\.0\.hook_resid_pre.*required_hooks"):
        va.logit_lens(model, FakeCache({}))
    with pytest.raises(AnalysisInputError, match=r"attn\.hook_pattern.*attention\.required_hooks"):
        va.attention_to_image(FakeCache({}))
    with pytest.raises(AnalysisInputError, match=r"embed\.hook_in"):
        va.modality_similarity(model, FakeCache(resid_acts([torch.randn(len(IDS), D)] * 3)), against="text_embeddings")


def test_bad_arguments_name_the_value_and_the_choices():
    model = fake_model(torch.eye(D), U)
    cache = FakeCache({**resid_acts([torch.randn(len(IDS), D)] * 3), **one_hot_patterns(0)})
    with pytest.raises(AnalysisInputError, match=r"'imgs'.*'image'"):
        va.logit_lens(model, cache, positions="imgs")
    with pytest.raises(AnalysisInputError, match=r"k must be.*got 0"):
        va.logit_lens(model, cache, k=0)
    with pytest.raises(AnalysisInputError, match=r"\[3\].*0\.\.2"):
        va.logit_lens(model, cache, layers=[0, 3])
    with pytest.raises(AnalysisInputError, match=r"\[11\].*out of range"):
        va.logit_lens(model, cache, positions=[1, 11])
    with pytest.raises(AnalysisInputError, match=r"'words'.*'text_states'"):
        va.modality_similarity(model, cache, against="words")
    with pytest.raises(AnalysisInputError, match=r"'questions'"):
        va.attention_to_image(cache, query="questions")
    with pytest.raises(AnalysisInputError, match=r"query='marker' selects no position"):
        va.attention_to_image(cache, query="marker")
    with pytest.raises(AnalysisInputError, match="factor"):
        va.find_sink_tokens(va.attention_to_image(cache), factor=0)


def test_order_and_counts_are_validated():
    assert torch.equal(_order("raster", 4, 0, 0), torch.arange(4))
    assert sorted(_order("random", 5, 0, 0).tolist()) == list(range(5))
    assert torch.equal(_order("random", 5, 7, 0), _order("random", 5, 7, 0))
    assert torch.equal(_order([2, 0, 1], 3, 0, 0), torch.tensor([2, 0, 1]))
    with pytest.raises(AnalysisInputError, match=r"\[0, 0, 1\] is not a permutation of 0\.\.2"):
        _order([0, 0, 1], 3, 0, 0)
    with pytest.raises(AnalysisInputError, match="not a permutation"):
        _order([0, 1], 3, 0, 0)
    assert torch.equal(_counts(None, 3), torch.arange(4))
    with pytest.raises(AnalysisInputError, match=r"\[-1, 5\].*0\.\.4"):
        _counts([-1, 2, 5], 4)
    with pytest.raises(AnalysisInputError, match="ints"):
        _counts([0.5], 4)


# ---- batching helpers ---------------------------------------------------------------


def test_ragged_rows_pad_at_the_end():
    out = stack_rows([torch.tensor([1.0, 2.0]), torch.tensor([3.0])])
    assert out[0].tolist() == [1.0, 2.0] and out[1, 0] == 3.0 and out[1, 1].isnan()
    ids = stack_rows([torch.tensor([1, 2]), torch.tensor([3])])
    assert ids.tolist() == [[1, 2], [3, -1]]
    single = torch.tensor([5.0])
    assert torch.equal(stack_rows([single]), single[None])  # one row keeps its batch axis


def test_batched_cache_adds_a_batch_axis_and_frames_drop_padding():
    acts = one_hot_patterns(key=3)
    acts = {k: v.expand(2, -1, -1, -1) for k, v in acts.items()}
    result = va.attention_to_image(FakeCache(acts, rows=2))
    assert result.mass.shape == (2, N_LAYERS, HEADS)
    frame = result.received_frame()
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == ["batch", "layer", "pos", "received"]
    assert len(frame) == 2 * N_LAYERS * len(IMAGE_POS)


def test_results_are_frozen_and_shape_checked():
    result = va.attention_to_image(FakeCache(one_hot_patterns(key=3)))
    with pytest.raises(Exception):
        result.mass = torch.zeros(1)  # type: ignore[misc]
    with pytest.raises(Exception):  # jaxtyping: received's layer axis disagrees with mass's
        va.AttentionResult(
            mass=torch.zeros(1, 2, 2),
            received=torch.zeros(1, 3, 4),
            image_positions=torch.arange(4)[None],
            query_positions=torch.arange(2)[None],
        )
    with pytest.raises(Exception):  # a result without its batch axis is refused
        va.AttentionResult(
            mass=torch.zeros(2, 2),
            received=torch.zeros(2, 4),
            image_positions=torch.arange(4),
            query_positions=torch.arange(2),
        )


def test_results_keep_the_batch_axis_and_row_trims_the_padding():
    one = va.attention_to_image(FakeCache(one_hot_patterns(key=3)))
    assert one.batch_size == 1 and one.mass.shape == (1, N_LAYERS, HEADS)  # a batch of one keeps its axis
    acts = {k: v.expand(2, -1, -1, -1).clone() for k, v in one_hot_patterns(key=3).items()}
    two = va.attention_to_image(FakeCache(acts, rows=2))
    ragged = va.AttentionResult(  # row 1 has 2 image tokens and 1 query, padded at the end
        mass=two.mass,
        received=torch.cat([two.received[:1], torch.cat([two.received[1:, :, :2], torch.full((1, N_LAYERS, 2), float("nan"))], -1)]),
        image_positions=torch.tensor([IMAGE_POS, IMAGE_POS[:2] + [-1, -1]]),
        query_positions=torch.tensor([INSTRUCTION_POS, INSTRUCTION_POS[:1] + [-1] * (len(INSTRUCTION_POS) - 1)]),
    )
    row = ragged.row(1)
    assert row.received.shape == (N_LAYERS, 2) and not row.received.isnan().any()
    assert row.image_positions.tolist() == IMAGE_POS[:2] and row.query_positions.tolist() == INSTRUCTION_POS[:1]
    assert row.mass.shape == (N_LAYERS, HEADS) and torch.equal(ragged.row(0).image_positions, torch.tensor(IMAGE_POS))
    with pytest.raises(AnalysisInputError, match="row 2 is out of range for a batch of 2"):
        ragged.row(2)
    with pytest.raises(AttributeError, match="no field 'masses'"):
        row.masses
    assert f"mass=(2, {N_LAYERS}, {HEADS}) float32" in repr(ragged)
    assert "tensor(" not in repr(ragged)  # a short repr: shapes, not values


def test_one_word_rule():
    from tests.tiny import word_tokenizer
    from vlens.analysis.lens import label_id, word_forms, word_id

    tok = word_tokenizer(specials=[])
    red = tok.convert_tokens_to_ids("red")
    assert word_id(tok, "red") == red and label_id(tok, "red") == red
    assert word_forms(tok, "red")[0] == red  # the first form is the word's own id
    with pytest.raises(AnalysisInputError, match="'zebra' is not in the vocabulary"):
        word_id(tok, "zebra")
    assert label_id(tok, "zebra") == -1 and word_forms(tok, "zebra") == []
