"""Prompt-to-Prompt's pure pieces: token alignment, schedules and the edit algebra, on small tensors."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from editors.edits import CrossEdit, edited_probs, fused_outputs, injected_rows, lay_out, refine, reweight, swap
from editors.schedules import token_schedule, window, word_windows
from shapes import MODEL_PATH
from xattn.align import align, refine_mapper, segments, swap_mapper, swapped_words


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(MODEL_PATH / "tokenizer")


def test_swap_of_single_token_words_is_a_permutation_of_the_diagonal(tokenizer):
    m = swap_mapper(tokenizer, "a red circle", "a blue circle")
    assert torch.equal(m, torch.eye(77))  # same positions, same token counts
    assert swapped_words(tokenizer, "a red circle", "a blue circle") == [("red", "blue")]


def test_swap_into_a_two_token_word_splits_the_mass_and_shifts_what_follows(tokenizer):
    # "a cat" = [sot, a, cat, eot]; "a neoclassical" = [sot, a, neo, classical, eot]
    m = swap_mapper(tokenizer, "a cat", "a neoclassical")
    assert m[0, 0] == 1 and m[1, 1] == 1
    assert m[2, 2] == 0.5 and m[2, 3] == 0.5 and m[2].sum() == 1
    assert m[3, 4] == 1  # source end-of-text -> target end-of-text, not by position
    assert m[4, 5] == 1 and m[75, 76] == 1
    sums = m.sum(0)
    assert sums[2:4].sum() == 1 and sums[[0, 1, *range(4, 77)]].eq(1).all()  # the word's mass is kept, split in two
    back = swap_mapper(tokenizer, "a neoclassical", "a cat")
    assert back[2, 2] == 1 and back[3, 2] == 1 and back[4, 3] == 1


def test_swap_keeps_punctuation_between_words(tokenizer):
    seg = segments(tokenizer, "a red circle, and a blue square")
    assert seg.words == ("a", "red", "circle", "and", "a", "blue", "square")
    assert seg.gaps[3] == (4,) and seg.end == 9
    m = swap_mapper(tokenizer, "a red circle, and a blue square", "a red circle, and a green square")
    assert torch.equal(m, torch.eye(77))


def test_swap_with_different_word_counts_says_to_refine(tokenizer):
    with pytest.raises(ValueError, match="same number of words.*refine"):
        swap_mapper(tokenizer, "a red circle", "a big red circle")


def test_alignment_matches_the_paper_example(tokenizer):
    index, kept = refine_mapper(tokenizer, "a painting of a squirrel eating a burger", "a neoclassical painting of a squirrel eating a burger")
    assert index[:12].tolist() == [0, 1, 0, 0, 2, 3, 4, 5, 6, 7, 8, 9]
    assert kept[:12].tolist() == [1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert index[12].item() == 10 and index[76].item() == 74 and kept[12:].eq(1).all()


def test_alignment_never_pairs_different_tokens():
    assert align([1, 2, 3], [1, 9, 3]) == [0, -1, 2]
    assert align([5, 5], [5, 7, 5]) == [0, -1, 1]
    assert align([], [4]) == [-1]


def test_windows_take_ints_as_steps_and_floats_as_fractions():
    assert window(0.8, 50) == (0, 40)
    assert window(10, 50) == (0, 10)
    assert window((0.2, 1.0), 25) == (5, 25)
    assert window((3, 0.5), 20) == (3, 10)
    with pytest.raises(ValueError, match="outside"):
        window(1.5, 50)
    with pytest.raises(ValueError, match="outside 0..50"):
        window(60, 50)
    with pytest.raises(ValueError, match="starts after it ends"):
        window((0.6, 0.2), 50)
    with pytest.raises(TypeError):
        window(True, 50)


def test_per_word_schedule_overrides_the_default_for_its_tokens():
    default, words = word_windows({"default": 1.0, "lion": 0.4}, 50)
    assert default == (0, 50) and words == {"lion": (0, 20)}
    table = token_schedule(default, {(2, 3): words["lion"]}, 50, 5)
    assert table[:, 0].sum() == 50 and table[:, 2].sum() == 20 and table[19, 3] == 1 and table[20, 3] == 0
    assert word_windows(0.5, 10) == ((0, 5), {})


def _probs(q, k):
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)


def test_edits_follow_the_paper_formulas():
    p_src = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]])
    p_tgt = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.2]])
    mapper = torch.eye(5)[[0, 2, 1, 3, 4]]  # swap tokens 1 and 2
    assert torch.allclose(edited_probs(swap(mapper), p_src, p_tgt), torch.tensor([[0.1, 0.3, 0.2, 0.4, 0.0]]))
    index, kept = torch.tensor([0, 1, 0, 2, 3]), torch.tensor([1.0, 1, 0, 1, 1])  # target token 2 is new
    assert torch.allclose(edited_probs(refine(index, kept), p_src, p_tgt), torch.tensor([[0.1, 0.2, 0.1, 0.3, 0.4]]))
    w = torch.tensor([1.0, 1, 3, 1, 1])
    assert torch.allclose(edited_probs(reweight(w), p_src, p_tgt), torch.tensor([[0.1, 0.2, 0.9, 0.4, 0.0]]))
    chained = reweight(w, refine(index, kept))  # the new token's own attention is weighted too
    assert torch.allclose(edited_probs(chained, p_src, p_tgt), torch.tensor([[0.1, 0.2, 0.3, 0.3, 0.4]]))
    later = swap(mapper).at(torch.tensor([1.0, 0, 1, 1, 1]))  # token 1 outside its window keeps the target's
    assert torch.allclose(edited_probs(later, p_src, p_tgt), torch.tensor([[0.1, 0.1, 0.2, 0.4, 0.0]]))


EDITS = [
    swap(torch.eye(5)[[0, 2, 1, 3, 4]]),
    refine(torch.tensor([0, 1, 0, 2, 3]), torch.tensor([1.0, 1, 0, 1, 1])),
    reweight(torch.tensor([1.0, -1, 2, 1, 0.5])),
    reweight(torch.tensor([1.0, 2, 2, 1, 1]), swap(torch.eye(5)).at(torch.tensor([1.0, 1, 0, 0, 1]))),
    CrossEdit(torch.zeros(5, 5), torch.zeros(5)),
]


def _rows(count: int, uncond: int = 0):
    """(rows, heads, queries|tokens, dim) query, key and value: `uncond` unconditional rows, then a source and `count` targets."""
    g = torch.Generator().manual_seed(0)
    rows = uncond + count + 1
    return torch.randn(rows, 2, 6, 8, generator=g), torch.randn(rows, 2, 5, 8, generator=g), torch.randn(rows, 2, 5, 8, generator=g)


@pytest.mark.parametrize("edits", [[edit] for edit in EDITS] + [EDITS], ids=[*(f"edit{i}" for i in range(len(EDITS))), "all-at-once"])
@pytest.mark.parametrize("uncond", [0, 3])
def test_fused_outputs_equal_the_explicit_reference(edits, uncond):
    query, key, value = _rows(len(edits), uncond)
    probs = _probs(query, key)
    reference = [probs[i] @ value[i] for i in range(uncond + 1)]  # unconditional rows and the source: their own attention
    reference += [edited_probs(e, probs[uncond], probs[i]) @ value[i] for i, e in enumerate(edits, start=uncond + 1)]
    out = fused_outputs(lay_out(edits, query.shape[0], uncond), query, key, value)
    assert torch.allclose(out, torch.stack(reference), atol=1e-6)


def test_a_plan_mixes_values_and_makes_a_second_call_only_where_an_edit_needs_it():
    assert lay_out([EDITS[0], EDITS[2]], 6, 3).own_rows is None
    plan = lay_out(EDITS[:2], 6, 3)  # the refinement (row 5) keeps its new token's own attention
    assert plan.own_rows.tolist() == [5] and plan.rows.tolist() == [0, 1, 2, 3, 3, 3]
    assert plan.mix.shape[0] == 2 and torch.equal(plan.mix[0], EDITS[0].source) and torch.equal(plan.mix[1], EDITS[1].source)
    same_tokens = lay_out([swap(torch.eye(5)), swap(torch.eye(5))], 5, 2)  # "a red circle" -> "a blue circle"
    assert same_tokens.mix is None and same_tokens.own_rows is None
    with pytest.raises(ValueError, match="1 image\\(s\\) each, fill 4 rows, not the batch's 6"):
        lay_out(EDITS[:2], 6, 1)


def test_identity_swap_gives_the_target_the_source_attention():
    query, key, value = _rows(1)
    out = fused_outputs(lay_out([swap(torch.eye(5))], 2, 0), query, key, value)
    assert torch.allclose(out[0], F.scaled_dot_product_attention(query[0], key[0], value[0]), atol=1e-6)
    assert torch.allclose(out[1], F.scaled_dot_product_attention(query[0], key[0], value[1]), atol=1e-6)


def test_self_attention_injection_reads_the_source_map_with_each_rows_own_values():
    query, key, value = _rows(2, uncond=3)
    mask = torch.randn(6, 1, 6, 5)
    plan = injected_rows(6, 3, 2)
    assert plan.rows.tolist() == [0, 1, 2, 3, 3, 3]
    out = fused_outputs(plan, query, key, value, mask)
    for row, source in enumerate([0, 1, 2, 3, 3, 3]):
        expected = F.scaled_dot_product_attention(query[source], key[source], value[row], attn_mask=mask[source])
        assert torch.allclose(out[row], expected, atol=1e-6), row


def test_several_images_per_prompt_edit_image_j_from_source_image_j():
    """Rows [uncond x 2, source images 0 1, target A's 0 1, target B's 0 1]: each target image reads the source image of its index."""
    g = torch.Generator().manual_seed(1)
    query, key, value = torch.randn(8, 2, 6, 8, generator=g), torch.randn(8, 2, 5, 8, generator=g), torch.randn(8, 2, 5, 8, generator=g)
    plan = lay_out(EDITS[:2], 8, 2, images=2)
    assert plan.rows.tolist() == [0, 1, 2, 3, 2, 3, 2, 3] and plan.own_rows.tolist() == [6, 7]
    probs = _probs(query, key)
    reference = [probs[i] @ value[i] for i in range(4)]
    reference += [edited_probs(e, probs[2 + j], probs[4 + 2 * i + j]) @ value[4 + 2 * i + j] for i, e in enumerate(EDITS[:2]) for j in range(2)]
    assert torch.allclose(fused_outputs(plan, query, key, value), torch.stack(reference), atol=1e-6)
    assert injected_rows(8, 2, 2, images=2).rows.tolist() == [0, 1, 2, 3, 2, 3, 2, 3]
