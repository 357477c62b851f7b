"""Prompt-to-Prompt's edits on joint (MM-DiT) attention as pure functions: hand-computed values, and the fused form
against the explicit reference, in SD3's layout (image tokens first) and Flux's (text first)."""

import pytest
import torch
import torch.nn.functional as F

from editors.edits import CrossEdit, refine, reweight, swap
from editors.joint_edits import input_projection_inputs, joint_edit_outputs, joint_edited_probs

SD3 = (slice(0, 6), slice(6, 10))  # (image, text): image first
FLUX = (slice(4, 10), slice(0, 4))  # text first


def probs(q, k, scale):
    return ((q @ k.transpose(-1, -2)) * scale).softmax(-1)


def source(q, k, image, scale):
    """The source's queries, keys and its image queries' log-sum-exp over all keys."""
    return q, k, ((q[..., image, :] @ k.transpose(-1, -2)) * scale).logsumexp(-1)


def test_reweighting_the_text_block_by_hand():
    """Every score 0: each of 2 image and 2 text keys has 1/4. Doubling text token 0's column gives an image query
    1/4 * (1 + 2) + 1/2 * 3 + 1/4 * 4 = 3.25 with values 1..4; the text queries keep their mean, 2.5."""
    q, k = torch.zeros(1, 1, 4, 1), torch.zeros(1, 1, 4, 1)
    v = torch.arange(1.0, 5.0).reshape(1, 1, 4, 1)
    edit = reweight(torch.tensor([2.0, 1.0]))
    image, text = slice(0, 2), slice(2, 4)
    explicit = joint_edited_probs(edit, probs(q, k, 1.0), probs(q, k, 1.0), image, text, inject_self=False) @ v
    fused = joint_edit_outputs(edit, source(q, k, image, 1.0), (q, k, v), image, text, 1.0, inject_self=False)
    expected = torch.tensor([3.25, 3.25, 2.5, 2.5]).reshape(1, 1, 4, 1)
    assert torch.allclose(explicit, expected) and torch.allclose(fused, expected)


EDITS = {
    "swap": lambda: swap(torch.eye(4)[[1, 0, 2, 3]]),
    "refine": lambda: refine(torch.tensor([0, 1, 1, 2]), torch.tensor([1.0, 1.0, 0.0, 1.0])),
    "reweight": lambda: reweight(torch.tensor([1.0, 3.0, 1.0, 0.5])),
}


@pytest.mark.parametrize("layout", [SD3, FLUX], ids=["image-first", "text-first"])
@pytest.mark.parametrize("inject_self", [False, True])
@pytest.mark.parametrize("name", EDITS)
def test_fused_joint_edit_is_the_explicit_reference(name, inject_self, layout):
    torch.manual_seed(0)
    image, text = layout
    q_src, k_src, q_tgt, k_tgt, v_tgt = (torch.randn(2, 3, 10, 8) for _ in range(5))
    edit = EDITS[name]()
    reference = joint_edited_probs(edit, probs(q_src, k_src, 0.35), probs(q_tgt, k_tgt, 0.35), image, text, inject_self) @ v_tgt
    fused = joint_edit_outputs(edit, source(q_src, k_src, image, 0.35), (q_tgt, k_tgt, v_tgt), image, text, 0.35, inject_self)
    assert (fused - reference).abs().max() <= 1e-5
    assert (fused - F.scaled_dot_product_attention(q_tgt, k_tgt, v_tgt, scale=0.35))[..., image, :].abs().max() > 1e-2
    assert torch.allclose(fused[..., text, :], F.scaled_dot_product_attention(q_tgt, k_tgt, v_tgt, scale=0.35)[..., text, :], atol=1e-6)


def test_an_identity_edit_of_a_target_alike_to_its_source_is_plain_attention():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    identity = CrossEdit(torch.eye(4), torch.zeros(4))
    for inject_self in (False, True):
        out = joint_edit_outputs(identity, source(q, k, SD3[0], 0.35), (q, k, v), *SD3, 0.35, inject_self)
        assert (out - F.scaled_dot_product_attention(q, k, v, scale=0.35)).abs().max() <= 1e-6


def test_with_self_attention_injected_a_swaps_rows_are_the_sources_and_sum_to_one():
    torch.manual_seed(2)
    q_src, k_src, q_tgt, k_tgt = (torch.randn(1, 2, 10, 8) for _ in range(4))
    edit = EDITS["swap"]()
    edited = joint_edited_probs(edit, probs(q_src, k_src, 0.35), probs(q_tgt, k_tgt, 0.35), *SD3, inject_self=True)
    assert torch.allclose(edited.sum(-1), torch.ones(1, 2, 10), atol=1e-6)
    assert torch.equal(edited[..., SD3[0], SD3[0]], probs(q_src, k_src, 0.35)[..., SD3[0], SD3[0]])


def test_input_projection_takes_the_sources_image_queries_and_keys_only():
    torch.manual_seed(3)
    q_src, k_src, q_tgt, k_tgt = (torch.randn(1, 2, 10, 8) for _ in range(4))
    q, k = input_projection_inputs((q_src, k_src), (q_tgt, k_tgt), FLUX[0])
    assert torch.equal(q[..., FLUX[0], :], q_src[..., FLUX[0], :]) and torch.equal(k[..., FLUX[0], :], k_src[..., FLUX[0], :])
    assert torch.equal(q[..., FLUX[1], :], q_tgt[..., FLUX[1], :]) and torch.equal(k[..., FLUX[1], :], k_tgt[..., FLUX[1], :])


def test_an_edit_is_cropped_or_padded_to_the_tokens_a_layer_attends_over():
    """PixArt encodes 120 of its tokenizer's 512 tokens: the edit is cropped. SD3 without T5 attends over 256 zero
    positions no tokenizer indexes: they take the source's attention, as padding does."""
    edit = CrossEdit(torch.eye(3)[[1, 0, 2]], torch.tensor([0.0, 0.0, 1.0]))
    cropped = edit.over(2)
    assert torch.equal(cropped.source, torch.tensor([[0.0, 1.0], [1.0, 0.0]])) and torch.equal(cropped.own, torch.zeros(2))
    padded = edit.over(5)
    assert torch.equal(padded.source[:3, :3], edit.source) and torch.equal(padded.source[3:], torch.eye(5)[3:])
    assert torch.equal(padded.own, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))
    assert edit.over(3) is edit
