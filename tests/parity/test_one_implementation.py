"""Every analysis three ways on several examples: the cache-based function, the stream, and
the sweep row give the same numbers (within 1e-5); the count curve at every count.

The three share one implementation, so this checks the plumbing around it (positions, batch
rows, padding, column naming); the numbers themselves are checked against the Hugging Face
model in test_analysis_readouts.py and test_analysis_tokens.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlens import analysis as va
from vlens import sweep
from vlens.analysis.lens import label_id
from vlens.data import load_scenes
from vlens.sweep.analyses import Batch, box_labels

TOL = 1e-5
N_EXAMPLES = 4
ALL = ["modality_similarity", "attention_to_image", "logit_lens", "token_count_curve"]


# LLaVA, and families whose token count depends on the image (anyres_max tiles; Pixtral's own sizes).
FAMILIES = ("llava", "llava_onevision", "mistral3")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, llava_model, tmp_path_factory):
    if request.param == "llava":
        return llava_model
    from tests.tiny.families import FAMILY_BUILDERS
    from vlens import HookedVLM

    return HookedVLM.from_pretrained(FAMILY_BUILDERS[request.param](tmp_path_factory.mktemp(request.param)), device="cpu")


@pytest.fixture(scope="module")
def scenes():
    return load_scenes(N_EXAMPLES, seed=11)


@pytest.fixture(scope="module")
def n_image(model, scenes):
    counts = {int(model.prepare(ex.load_image(), ex.prompt).layout.image_mask.sum()) for ex in scenes}
    assert len(counts) == 1, f"the scenes give different token counts {counts}"
    return counts.pop()


@pytest.fixture(scope="module")
def rows(model, scenes, n_image, tmp_path_factory):
    """The sweep's rows, with a count-curve fraction for every count 0..n."""
    out = tmp_path_factory.mktemp("three-ways") / "run"
    fractions = [k / n_image for k in range(n_image + 1)]
    sweep.run(model, scenes, out, ALL, params={"token_count_curve": {"fractions": fractions}},
              batch_size=3, progress=False)
    return sweep.load_results(out)


def prepared(model, example):
    """The example as the sweep prepares it (chat template on)."""
    return model.prepare([example.load_image()], [example.prompt], answer=[example.answer])


def test_similarity_attention_and_lens_agree_three_ways(model, scenes, rows):
    names = sorted(set(va.lens.required_hooks(model)) | set(va.attention.required_hooks(model)))
    streams = {
        "similarity": va.SimilarityStream(model, against="text_states", text="instruction"),
        "attention": va.AttentionStream(model, query="instruction"),
        "lens": va.LensStream(model, positions="image", k=5),
    }
    batch = model.prepare([ex.load_image() for ex in scenes], [ex.prompt for ex in scenes],
                          answer=[ex.answer for ex in scenes])
    va.run_streams(model, batch, list(streams.values()))
    per_layer = []
    for i, example in enumerate(scenes):
        inputs = prepared(model, example)
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs, names_filter=names)
        sim = va.modality_similarity(model, cache, against="text_states", text="instruction").row(0)
        att = va.attention_to_image(cache, query="instruction").row(0)
        tok = model.tokenizer
        labels = box_labels(model, Batch(inputs, [example], [example.load_image()]), 0, lambda w: label_id(tok, w))
        lens = va.logit_lens(model, cache, positions="image", k=5, labels=labels)
        objects = torch.tensor(sorted({label_id(tok, w) for w in example.objects} - {-1}), dtype=torch.long)

        streamed = {key: s.last_batch.row(i) for key, s in streams.items()}
        assert np.abs(streamed["similarity"].per_layer.numpy() - sim.per_layer.numpy()).max() <= TOL
        assert np.abs(streamed["attention"].mass.numpy() - att.mass.numpy()).max() <= TOL
        assert np.abs(streamed["attention"].received.numpy() - att.received.numpy()).max() <= TOL
        assert torch.equal(streamed["lens"].positions, lens.row(0).positions)
        assert np.abs(streamed["lens"].top_logprobs.numpy() - lens.row(0).top_logprobs.numpy()).max() <= TOL

        row = rows.iloc[i]
        assert row["example_id"] == example.id
        np.testing.assert_allclose(row["modality_similarity.per_layer"], sim.per_layer.numpy(), atol=TOL)
        np.testing.assert_allclose(row["attention_to_image.mass"], att.mass.mean(-1).numpy(), atol=TOL)
        np.testing.assert_allclose(row["attention_to_image.max_head"], att.mass.amax(-1).numpy(), atol=TOL)
        np.testing.assert_allclose(row["logit_lens.match"], lens.match_rate[0].numpy(), atol=TOL)
        np.testing.assert_allclose(row["logit_lens.object_hit"], lens.hit_rate([objects])[0].numpy(), atol=TOL)
        np.testing.assert_allclose(row["logit_lens.final_agreement"], lens.final_agreement()[0].numpy(), atol=TOL)
        per_layer.append(sim.per_layer)
    # The streams' aggregates are the mean over the same examples.
    curve = streams["similarity"].result()
    assert curve.n_examples == N_EXAMPLES
    assert (curve.per_layer - torch.stack(per_layer).mean(0)).abs().max() <= TOL


def test_count_curve_agrees_at_every_count(model, scenes, rows, n_image):
    counts = list(range(n_image + 1))
    for i, example in enumerate(scenes):
        inputs = prepared(model, example)
        kv = va.token_count_curve(model, inputs, counts=counts, engine="kv")
        naive = va.token_count_curve(model, inputs, counts=counts, engine="naive")
        row = rows.iloc[i]
        assert list(row["token_count_curve.counts"]) == counts
        assert row["token_count_curve.engine"] == kv.engine == "kv"
        np.testing.assert_allclose(row["token_count_curve.loss"], kv.loss[0].numpy(), atol=TOL)
        np.testing.assert_allclose(row["token_count_curve.loss"], naive.loss[0].numpy(), atol=TOL)
        # The full count is the sweep's answer loss of the same example, from one forward.
        assert abs(row["token_count_curve.loss"][-1] - row["answer_loss"]) <= 1e-4
