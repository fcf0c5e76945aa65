"""token_count_curve and token_contributions equal a hand-built loop of full Hugging Face
forwards over ``inputs_embeds`` with the removed tokens taken out of the sequence."""

from __future__ import annotations

import pytest
import torch

from tests.parity import analysis_refs as ref
from vlens import analysis as va
from vlens.errors import AnalysisInputError

TOL = 1e-4
PROMPT = "what is in the image ?"
ANSWER = "a red circle ."


@pytest.fixture(scope="module", params=list(ref.FAMILIES))
def tiny(request, tmp_path_factory):
    return ref.load_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def case(tiny, photo):
    inputs = tiny.model.prepare(photo, PROMPT, answer=ANSWER)
    embeds = ref.merged_embeddings(tiny.reference, inputs)
    ids = inputs.input_ids[0]
    answer = inputs.layout.answer_mask[0].nonzero().flatten()
    img = ref.image_positions(tiny.reference, inputs.input_ids)
    return inputs, embeds, ids, answer, img, ref.per_token_inputs(tiny, inputs)


def spread(n: int) -> list[int]:
    return sorted({0, 1, n // 3, n // 2, n - 1, n})


@pytest.mark.parametrize("order", ["raster", "random", "reversed"])
def test_token_count_curve_equals_hf_loop(tiny, case, order):
    inputs, embeds, ids, answer, img, per_token = case
    n = img.numel()
    counts = spread(n)
    perm = torch.arange(n).flip(0) if order == "reversed" else order
    kv = va.token_count_curve(tiny.model, inputs, counts=counts, order=perm, engine="kv", batch_size=3)
    naive = va.token_count_curve(tiny.model, inputs, counts=counts, order=perm, engine="naive")
    # The kv engine runs wherever the family's contract allows it, and a fallback says why.
    assert kv.engine == ("naive" if tiny.family.per_token else "kv")
    assert (kv.engine_reason == "") == (kv.engine == "kv"), kv.engine_reason
    assert naive.engine == "naive" and naive.engine_reason == ""
    assert torch.equal(kv.counts, torch.tensor(counts))
    assert torch.equal(kv.order, naive.order)
    ranked = kv.row(0).order
    assert sorted(ranked.tolist()) == img.tolist()
    if order == "raster":
        assert torch.equal(ranked, img)
    expected = torch.tensor(
        [ref.reduced_loss(tiny, embeds, ids, answer, set(ranked[k:].tolist()), per_token, inputs) for k in counts]
    )
    assert kv.loss.shape == (1, len(counts))  # a batch of one keeps its batch axis
    assert (kv.row(0).loss - expected).abs().max() <= TOL, (kv.loss, expected)
    assert (naive.row(0).loss - expected).abs().max() <= TOL
    assert abs(float(kv.row(0).full_loss) - float(expected[-1])) <= TOL


def test_token_drop_contributions_equal_hf_loop(tiny, case):
    inputs, embeds, ids, answer, img, per_token = case
    drop = va.token_contributions(tiny.model, inputs, estimator="drop", batch_size=5).row(0)
    naive = va.token_contributions(tiny.model, inputs, estimator="drop", engine="naive").row(0)
    assert drop.engine == ("naive" if tiny.family.per_token else "kv") and naive.engine == "naive"
    assert torch.equal(drop.image_positions, img)
    assert (drop.delta_loss - naive.delta_loss).abs().max() <= TOL
    full = ref.reduced_loss(tiny, embeds, ids, answer, set(), per_token, inputs)
    assert abs(float(drop.full_loss) - full) <= TOL
    for i in spread(img.numel() - 1):
        expected = ref.reduced_loss(tiny, embeds, ids, answer, {int(img[i])}, per_token, inputs) - full
        assert abs(float(drop.delta_loss[i]) - expected) <= TOL, f"token {i}"


def test_gradient_contributions_equal_hf_autograd(tiny, case):
    inputs, embeds, ids, answer, img, per_token = case
    grad_result = va.token_contributions(tiny.model, inputs, estimator="gradient").row(0)
    leaf = embeds.clone().requires_grad_(True)
    logits = ref.lm_logits(tiny, leaf, per_token, inputs=inputs)
    loss = torch.nn.functional.cross_entropy(logits[0, answer - 1].float(), ids[answer])
    (grad,) = torch.autograd.grad(loss, leaf)
    expected = (grad[0, img] * (0 - embeds[0, img])).sum(-1)
    scale = float(expected.abs().max())
    assert (grad_result.delta_loss - expected).abs().max() <= 1e-4 * max(1.0, scale)
    assert abs(float(grad_result.full_loss) - float(loss.detach())) <= TOL
    # How well the first-order estimate ranks tokens like removal does (reported, not asserted).
    drop = va.token_contributions(tiny.model, inputs, estimator="drop").row(0)
    assert torch.isfinite(drop.delta_loss).all() and torch.isfinite(grad_result.delta_loss).all()
    constant = [name for name, v in (("drop", drop.delta_loss), ("gradient", grad_result.delta_loss)) if v.std() == 0]
    if constant:  # e.g. a tiny checkpoint whose projector outputs zeros: no ranking to compare
        print(f"\n{tiny.name}: Spearman(drop, gradient) undefined, {constant} constant over {img.numel()} tokens")
    else:
        rho = spearman(drop.delta_loss, grad_result.delta_loss)
        print(f"\n{tiny.name}: Spearman(drop, gradient) over {img.numel()} tokens = {rho:+.3f}")
        assert -1.0 <= rho <= 1.0


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 1, ties sharing their average rank."""
    v = values.double()
    less = (v[None, :] < v[:, None]).sum(1).double()
    equal = (v[None, :] == v[:, None]).sum(1).double()
    return less + (equal + 1) / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


def test_batched_count_curve_and_drop_equal_single_rows(tiny, photo, photo2):
    model = tiny.model
    images, prompts, answers = [photo, photo2], [PROMPT, "describe the image ."], [ANSWER, "a big blue square ."]
    batch = model.prepare(images, prompts, answer=answers)
    curve = va.token_count_curve(model, batch, counts=[0, 2, 5])
    drop = va.token_contributions(model, batch)
    assert curve.loss.shape == (2, 3) and drop.delta_loss.ndim == 2
    for row in range(2):
        single = model.prepare(images[row], prompts[row], answer=answers[row])
        one = va.token_count_curve(model, single, counts=[0, 2, 5]).row(0)
        assert (curve.loss[row] - one.loss).abs().max() <= TOL
        assert (curve.row(row).loss - one.loss).abs().max() <= TOL
        d = va.token_contributions(model, single).row(0)
        n = d.delta_loss.numel()
        assert (drop.delta_loss[row, :n] - d.delta_loss).abs().max() <= TOL
        assert drop.delta_loss[row, n:].isnan().all()
        assert drop.row(row).delta_loss.shape == (n,)  # row() trims the padding
    frame = curve.to_frame()
    assert list(frame.columns) == ["batch", "count", "loss"] and len(frame) == 6


def test_bad_arguments_name_the_value(tiny, case, photo):
    inputs, _, _, _, img, _ = case
    model, n = tiny.model, img.numel()
    with pytest.raises(AnalysisInputError, match="answer"):
        va.token_count_curve(model, model.prepare(photo, PROMPT))
    with pytest.raises(AnalysisInputError, match=rf"\[{n + 1}\].*0\.\.{n}"):
        va.token_count_curve(model, inputs, counts=[0, n + 1])
    with pytest.raises(AnalysisInputError, match="not a permutation"):
        va.token_count_curve(model, inputs, order=[0] * n)
    with pytest.raises(AnalysisInputError, match="'zigzag'"):
        va.token_count_curve(model, inputs, order="zigzag")
    with pytest.raises(AnalysisInputError, match="'fast'"):
        va.token_count_curve(model, inputs, engine="fast")
    with pytest.raises(AnalysisInputError, match="'shapley'"):
        va.token_contributions(model, inputs, estimator="shapley")


def test_half_precision_model_gives_float32_results(tmp_path, photo):
    """A bfloat16 model: every result is float32 and close to the float32 model's."""
    from tests.tiny.llava import build_llava
    from vlens import HookedVLM

    path = build_llava(tmp_path / "llava")
    full = HookedVLM.from_pretrained(path, device="cpu")
    half = HookedVLM.from_pretrained(path, device="cpu", dtype=torch.bfloat16)
    results = {}
    for name, model in (("full", full), ("half", half)):
        inputs = model.prepare(photo, PROMPT, answer=ANSWER)
        names = va.lens.required_hooks(model) + va.attention.required_hooks(model)
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs, names_filter=names)
        results[name] = {
            "lens": va.logit_lens(model, cache, k=3).top_logprobs,
            "similarity": va.modality_similarity(model, cache).per_layer,
            "attention": va.attention_to_image(cache).mass,
            "count": va.token_count_curve(model, inputs, counts=[0, 8, 16]).loss,
            "drop": va.token_contributions(model, inputs).delta_loss,
            "gradient": va.token_contributions(model, inputs, estimator="gradient").delta_loss,
        }
    for key, value in results["half"].items():
        assert value.dtype == torch.float32, key
        assert torch.isfinite(value).all(), key
    # bfloat16 keeps ~3 significant digits: the curves agree to that, not to 1e-4.
    for key in ("lens", "similarity", "attention", "count"):
        assert (results["half"][key] - results["full"][key]).abs().max() <= 0.1, key
