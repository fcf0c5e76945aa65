"""The toy model reproduces each finding of examples/ (docs/findings.md), as regression tests.

Each test runs the example's own ``measure`` function on a fixed set of held-out scenes (stream
``examples._common.STREAM_SEED``; no held-out caption occurs in training) and asserts the claim
with the criterion the example's header declares. The criteria were fixed from the claims
before the toy model's numbers were measured: one-sided tests at p < 0.01 (sign tests over
scenes, or a permutation test), never a threshold fitted to the measured value. A finding the
toy model does not show is marked ``xfail(strict=True)`` with the measured numbers, so the
test fails loudly if it starts to hold (then update docs/findings.md and drop the marker).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from examples import _common as common
from examples import attention_knockout as knockout_ex
from examples import attention_to_image as attention_ex
from examples import contextual_lens_visual_tokens as contextual_ex
from examples import logit_lens_visual_tokens as lens_ex
from examples import prompt_dependence as dependence_ex
from examples import token_contributions as contributions_ex
from examples import visual_text_similarity as similarity_ex
from examples import visual_token_count as count_ex
from examples import visual_token_pruning as pruning_ex
from vlens import HookedVLM

# VLENS_TOY_CHECKPOINT: run these tests on a candidate toy checkpoint (a folder written by
# `python -m vlens.zoo.train --out DIR`) before it replaces the shipped one in vlens/zoo/toy.
# The toy ships in the package: a missing one fails every test here (loudly), never skips them.
CANDIDATE = os.environ.get("VLENS_TOY_CHECKPOINT")
TOY = CANDIDATE or "toy"

N_SCENES = 24  # every finding; a one-sided sign test at p < 0.01 then needs >= 19/24 scenes
N_CONTRIBUTION_SCENES = 16  # one suffix per visual token (64 per scene): the slowest finding; >= 14/16
N_DEPENDENCE_SCENES = 6  # x 7 prompts each; the claim is exact (rounding), not statistical


@pytest.fixture(scope="module")
def toy() -> HookedVLM:
    return HookedVLM.from_pretrained(TOY, device="cpu")


@pytest.fixture(scope="module")
def scenes(toy: HookedVLM) -> list:
    return common.heldout_scenes(toy, N_SCENES)


@pytest.fixture(scope="module")
def lens(toy, scenes) -> lens_ex.LensFinding:
    return lens_ex.measure(toy, scenes)


@pytest.fixture(scope="module")
def similarity(toy, scenes) -> similarity_ex.SimilarityFinding:
    return similarity_ex.measure(toy, scenes)


@pytest.fixture(scope="module")
def attention(toy, scenes) -> attention_ex.AttentionFinding:
    return attention_ex.measure(toy, scenes)


@pytest.fixture(scope="module")
def count(toy, scenes) -> count_ex.CountFinding:
    return count_ex.measure(toy, scenes)


@pytest.fixture(scope="module")
def contributions(toy, scenes) -> contributions_ex.ContributionFinding:
    return contributions_ex.measure(toy, scenes[:N_CONTRIBUTION_SCENES])


# ---- logit lens -------------------------------------------------------------------------


def test_logit_lens_reads_object_patches_above_shuffled_control(toy, lens) -> None:
    assert lens.hit.shape == (toy.n_layers + 1,) and np.isfinite(lens.hit).all()
    assert lens.n_scenes == N_SCENES and lens.n_patches > 0
    assert lens.p_value < common.ALPHA and lens.excess[lens.best_layer] > 0, lens_ex.describe(lens)


# ---- visual vs text similarity --------------------------------------------------------


def test_similarity_curve_has_one_finite_entry_per_layer(toy, similarity) -> None:
    assert similarity.visual_text.shape == (N_SCENES, toy.n_layers + 1)
    assert np.isfinite(similarity.visual_text).all() and np.isfinite(similarity.text_text).all()
    assert (np.abs(similarity.visual_text) <= 1 + 1e-5).all()


def test_visual_text_similarity_rises_with_depth(similarity) -> None:
    assert similarity.rises, similarity_ex.describe(similarity)


@pytest.mark.xfail(strict=True, reason=(
    "toy (sha256 ecf5ad11...): cos(visual,text) - cos(text,text) is -0.147 at layer 0 and -0.302 over "
    "layers 5-8, higher in 6/24 scenes: text states converge at once (0.11 -> 0.38 at layer 1) and visual "
    "states approach them more slowly (-0.04 -> 0.08 over layers 5-8)"
))
def test_visual_text_similarity_rises_more_than_text_text(similarity) -> None:
    assert similarity.rises_relative, similarity_ex.describe(similarity)


# ---- attention to the image -----------------------------------------------------------


def test_attention_mass_is_a_share_per_block_and_head(toy, attention) -> None:
    mass = attention.mass_instruction
    assert mass.shape == (N_SCENES, toy.n_layers, toy.cfg.n_heads)
    assert np.isfinite(mass).all() and (mass >= 0).all() and (mass <= 1 + 1e-5).all()


def test_object_patches_receive_more_attention_than_background(attention) -> None:
    assert attention.reproduced, attention_ex.describe(attention)


# ---- number of visual tokens ----------------------------------------------------------


def test_answer_loss_with_all_visual_tokens_below_loss_with_none(count) -> None:
    assert count.counts[0] == 0 and count.counts[-1] == 64
    assert count.reproduced_needs_image, count_ex.describe(count)


@pytest.mark.xfail(strict=True, reason=(
    "toy (sha256 ecf5ad11...): mean loss over k = 4..48 kept tokens: raster 2.363, random 1.450, but "
    "random lower in only 14/24 scenes, sign test p = 0.27 (40 scenes: 24/40, p = 0.13)"
))
def test_random_token_subsets_beat_raster_prefixes(count) -> None:
    assert count.reproduced_random_beats_raster, count_ex.describe(count)


# ---- per-token contributions ----------------------------------------------------------


@pytest.mark.xfail(strict=True, reason=(
    "toy (sha256 ecf5ad11...): the answer loss is 0.003 and removing one patch moves it by about 1e-3: "
    "object patch -0.0020 vs background -0.0011 on average, object higher in 12/16 scenes, p = 0.038 "
    "(the recipe's 30 scenes: 23/30, p = 0.003)"
))
def test_dropping_an_object_patch_costs_more_than_a_background_patch(contributions) -> None:
    assert contributions.drop.shape == (N_CONTRIBUTION_SCENES, 64) and np.isfinite(contributions.drop).all()
    assert contributions.reproduced_for("drop"), contributions_ex.describe(contributions)


@pytest.mark.xfail(strict=True, reason=(
    "toy (sha256 ecf5ad11...): gradient estimate of an object patch -0.0016 vs background +0.0000, "
    "higher in 4/16 scenes, p = 0.99; its per-scene Spearman correlation with the measured drop is -0.04"
))
def test_gradient_estimate_ranks_object_patches_above_background(contributions) -> None:
    assert np.isfinite(contributions.gradient).all()
    assert contributions.reproduced_for("gradient"), contributions_ex.describe(contributions)


# ---- prompt dependence ----------------------------------------------------------------


def test_image_first_causal_visual_states_ignore_the_prompt(toy, scenes) -> None:
    curves = dependence_ex.measure(toy, scenes[:N_DEPENDENCE_SCENES])
    assert curves.cosine_distance.shape == (N_DEPENDENCE_SCENES, toy.n_layers + 1)
    assert curves.independent, curves.to_frame().to_string()


def test_qformer_visual_states_depend_on_the_prompt(tmp_path) -> None:
    """On a tiny *random* InstructBLIP (no trained one is available offline): the mechanism,
    the Q-Former reading the instruction, not a trained model's amount of dependence."""
    model = dependence_ex.tiny_random_instructblip(tmp_path)
    scenes = common.heldout_scenes(model, N_DEPENDENCE_SCENES)
    curves = dependence_ex.measure(model, scenes)
    assert curves.dependent, curves.to_frame().to_string()


# ---- visual-token pruning (FastV) --------------------------------------------------------


def test_fastv_pruning_at_layer_2_keeps_the_answer(toy, scenes) -> None:
    finding = pruning_ex.measure(toy, scenes, layers=(pruning_ex.LAYER,), keep=(pruning_ex.KEEP,))  # the tested cell
    assert finding.exact.shape == (N_SCENES, 2, 1, 1)
    assert np.isfinite(finding.loss).all() and (finding.flops_ratio <= 1).all()
    assert finding.reproduced, pruning_ex.describe(finding)


# ---- contextual lens vs logit lens ----------------------------------------------------------


def test_contextual_lens_reads_object_patches_more_often_than_the_logit_lens(toy, scenes) -> None:
    finding = contextual_ex.measure(toy, scenes)
    assert finding.per_scene_contextual.shape == (N_SCENES, toy.n_layers + 1)
    assert finding.reproduced, contextual_ex.describe(finding)


# ---- attention knockout -----------------------------------------------------------------


@pytest.fixture(scope="module")
def knockout_flows(toy, scenes) -> knockout_ex.FlowKnockoutFinding:
    return knockout_ex.measure_flows(toy, scenes)


def test_knocking_out_the_asked_object_hurts_more_than_background(toy, scenes) -> None:
    finding = knockout_ex.measure_objects(toy, scenes)
    assert finding.delta_object.shape == (N_SCENES,) and np.isfinite(finding.delta_object).all()
    assert finding.reproduced, knockout_ex.describe_objects(finding)


@pytest.mark.xfail(strict=True, reason=(
    "toy (sha256 ecf5ad11...): with 2-layer windows, question->last damages the answer at layers 0-1 "
    "(-7.64, -0.14) and image->question hardly at all (|delta| <= 0.001 everywhere): damage centre of "
    "question->last 0.52 vs image->question 2.35, later in 0/22 scenes; the toy reads the image from the "
    "last position directly (image->last -0.34, -0.37 at windows 4-5)"
))
def test_question_to_last_matters_later_than_image_to_question(knockout_flows) -> None:
    assert knockout_flows.delta.shape == (N_SCENES, 3, 7)
    assert knockout_flows.reproduced_order, knockout_ex.describe_flows(knockout_flows)


@pytest.mark.xfail(strict=True, reason=(
    "toy (sha256 ecf5ad11...): image->question damage, lower half minus upper half of the layers, "
    "+0.0007 nats, positive in 16/21 scenes, p = 0.013: the question tokens barely need the image"
))
def test_image_to_question_matters_in_the_lower_layers(knockout_flows) -> None:
    assert knockout_flows.reproduced_lower, knockout_ex.describe_flows(knockout_flows)


# ---- plumbing, with or without the toy checkpoint ----------------------------------------


def test_every_example_runs_on_a_tiny_random_llava(llava_model) -> None:
    """Shapes only: a random model shows no finding, but every recipe must run on any grid
    (here 4x4 tokens, a word tokenizer without most scene words)."""
    model = llava_model
    scenes = common.heldout_scenes(model, 2)
    n = model.n_layers
    assert scenes[0].patch_labels.shape == common.image_grid(model)
    assert lens_ex.measure(model, scenes, n_permutations=20).hit.shape == (n + 1,)
    assert similarity_ex.measure(model, scenes).visual_text.shape == (2, n + 1)
    assert attention_ex.measure(model, scenes).recv_object.shape == (2, n)
    assert count_ex.measure(model, scenes).raster.shape == (2, 7)
    assert contributions_ex.measure(model, scenes).gradient.shape == (2, 16)
    assert dependence_ex.measure(model, scenes).independent
    assert pruning_ex.measure(model, scenes, layers=(1, 2)).exact.shape == (2, 2, 2, len(pruning_ex.KEEPS))
    assert contextual_ex.measure(model, scenes, n_permutations=20, bank_size=20).hit_logit.shape == (n + 1,)
    assert knockout_ex.measure_objects(model, scenes).delta_object.shape == (2,)
    assert knockout_ex.measure_flows(model, scenes).delta.shape[:2] == (2, 3)


def test_every_recipe_prints_its_verdict_and_writes_its_files(llava_dir, tmp_path, capsys) -> None:
    """Each script's main() end to end (tables, verdicts, CSV and PNG files), on the tiny LLaVA."""
    recipes = {
        lens_ex: ["lens_rates.csv", "lens_rates.png", "lens_panel.png"],
        similarity_ex: ["similarity_curves.csv", "similarity_curves.png", "similarity_map.png"],
        attention_ex: ["attention_to_image.csv", "attention_mass.png", "attention_received.png",
                       "attention_map.png", "attention_sinks.png"],
        count_ex: ["token_count.csv", "token_count.png"],
        contributions_ex: ["token_contributions.csv", "contributions_map_drop.png",
                           "contributions_map_gradient.png", "contributions_scatter.png"],
        dependence_ex: ["prompt_dependence.csv", "prompt_dependence.png"],
        pruning_ex: ["pruning.csv", "pruning.png"],
        contextual_ex: ["contextual_lens.csv", "contextual_lens.png", "contextual_panel.png"],
        knockout_ex: ["knockout_objects.csv", "knockout_windows.csv", "knockout_windows.png"],
    }
    for module, files in recipes.items():
        out = tmp_path / module.__name__.rsplit(".", 1)[-1]
        module.main(["--model", str(llava_dir), "--device", "cpu", "--n-scenes", "2", "--out", str(out)])
        printed = capsys.readouterr().out
        assert "REPRODUCED" in printed, module.__name__
        assert sorted(p.name for p in out.iterdir()) == sorted(files), module.__name__
