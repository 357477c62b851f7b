"""Prompt-to-Prompt's cross-attention edits on MM-DiT joint attention, and the input-projection edit, as pure functions
of one layer's queries, keys and values.

In a joint layer an image query attends over the image keys and the text keys in one softmax, and the text queries
attend over both as well. The P2P-style edit (the naive transfer Shin et al. 2025 measure against) rewrites a target's
image x text block as Prompt-to-Prompt rewrites a UNet's cross-attention map (`editors.edits.CrossEdit`):

    P'[img, txt] = P_src[img, txt] @ A + P_tgt[img, txt] * b
    P'[img, img] = P_tgt[img, img]   (or P_src[img, img] when self-attention is injected)
    P'[txt, :]   = P_tgt[txt, :]     (the text stream attends as the target's own)

without renormalising, as the paper's re-weighting does not (a swap of a target alike to its source keeps rows near
1; with self-attention injected a swap's rows are the source's and sum to 1 exactly). The input-projection edit
(Shin et al.'s): the target's image queries and keys are the source's, its values and its text stream its own.

`joint_edited_probs` gives P' explicitly, the reference; `joint_edit_outputs` computes P' V fused, never building the
joint matrix: each block of keys is one fused call returning its log-sum-exp, and a block's share of a row's softmax
is exp(lse_block - lse_row). A swap costs the target one image x image and two image x text kernel calls besides the
text queries' own, about one plain attention.
"""

from __future__ import annotations

import torch

from editors.edits import CrossEdit
from xattn.controller import attention_and_logsumexp, logsumexp_scores


def joint_edited_probs(edit: CrossEdit, p_src: torch.Tensor, p_tgt: torch.Tensor, image: slice, text: slice,
                       inject_self: bool) -> torch.Tensor:
    """P' from explicit joint probabilities (..., tokens, tokens) of the source and the target."""
    edited = p_tgt.clone()
    own_text = p_tgt[..., image, text]
    edited[..., image, text] = p_src[..., image, text] @ edit.source.to(p_src) + own_text * edit.own.to(p_tgt)
    if inject_self:
        edited[..., image, image] = p_src[..., image, image]
    return edited


def _block(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over these keys only: its output and, per query, the log-sum-exp of its scores."""
    out, lse = attention_and_logsumexp(query.contiguous(), key.contiguous(), value.contiguous(), None, scale)
    return out.float(), lse.float()


def _share(lse_block: torch.Tensor, lse_row: torch.Tensor) -> torch.Tensor:
    """The block's share of each query's softmax, shaped to weigh (..., queries, dim) outputs."""
    return (lse_block - lse_row).exp()[..., None]


def joint_edit_outputs(edit: CrossEdit, source: tuple[torch.Tensor, torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, ...],
                       image: slice, text: slice, scale: float, inject_self: bool) -> torch.Tensor:
    """P' V_tgt for every query of the target, (rows, heads, tokens, dim): the edited image queries and the target's
    own text queries. source: the source's queries, keys, and its image queries' log-sum-exp over all its keys (what
    the fused kernel returns beside the source's own output); target: its queries, keys and values."""
    q_src, k_src, lse_src = source
    q_tgt, k_tgt, v_tgt = target
    q_src, q_tgt, v_img, v_txt = q_src[..., image, :], q_tgt[..., image, :], v_tgt[..., image, :], v_tgt[..., text, :]
    lse_src = lse_src.float()
    mapped, lse_src_txt = _block(q_src, k_src[..., text, :], edit.source.to(v_txt) @ v_txt, scale)
    edited = _share(lse_src_txt, lse_src) * mapped
    if inject_self:
        src_img, lse_src_img = _block(q_src, k_src[..., image, :], v_img, scale)
        edited = edited + _share(lse_src_img, lse_src) * src_img
    keeps_text = bool(edit.own.any())
    if inject_self and not keeps_text:
        return _with_text_queries(edited, target, image, text, scale)
    if inject_self:
        lse_tgt_img = logsumexp_scores(q_tgt, k_tgt[..., image, :], None, scale)
    else:
        own_img, lse_tgt_img = _block(q_tgt, k_tgt[..., image, :], v_img, scale)
    if keeps_text:
        own_txt, lse_tgt_txt = _block(q_tgt, k_tgt[..., text, :], edit.own.to(v_txt)[:, None] * v_txt, scale)
    else:
        lse_tgt_txt = logsumexp_scores(q_tgt, k_tgt[..., text, :], None, scale)
    lse_tgt = torch.logaddexp(lse_tgt_img, lse_tgt_txt)
    if not inject_self:
        edited = edited + _share(lse_tgt_img, lse_tgt) * own_img
    if keeps_text:
        edited = edited + _share(lse_tgt_txt, lse_tgt) * own_txt
    return _with_text_queries(edited, target, image, text, scale)


def _with_text_queries(edited: torch.Tensor, target: tuple[torch.Tensor, ...], image: slice, text: slice, scale: float) -> torch.Tensor:
    """The whole target output: the edited image queries', and its text queries' own attention."""
    q_tgt, k_tgt, v_tgt = target
    texts = torch.nn.functional.scaled_dot_product_attention(q_tgt[..., text, :], k_tgt, v_tgt, scale=scale)
    out = torch.empty(*q_tgt.shape[:-1], v_tgt.shape[-1], dtype=torch.float32, device=v_tgt.device)
    out[..., image, :] = edited
    out[..., text, :] = texts.float()
    return out.to(v_tgt.dtype)


def input_projection_inputs(source: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor],
                            image: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's queries and keys with their image tokens' taken from the source (Shin et al.'s edit): attention
    then runs on them with the target's own values, fused as plain generation runs."""
    (q_src, k_src), (q_tgt, k_tgt) = source, target
    q, k = q_tgt.clone(), k_tgt.clone()
    q[..., image, :] = q_src[..., image, :]
    k[..., image, :] = k_src[..., image, :]
    return q, k
