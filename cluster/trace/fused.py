"""Fused speculation: a small draft saved inside its target's folder, held whole on every target rank.

NxD Inference traces the draft and the target into one model on the same cores ("fused
speculation"), so a speculation round is one call with no hop to another model. Here the draft
stays its own saved model (traced at tp_degree=1) and is copied into the target's folder:

    cluster.trace.fuse_draft("pair-target-tp2", "pair-draft-tp1")   # -> pair-target-tp2/draft/

`parallel_model_load` (and `tpcluster serve`) then load the draft's graphs onto every rank of the
target beside its shard. Each rank runs the draft's k steps on its own copy and then the
target's verify forward, in one call (a `FusedRound`, cluster.generation.steps.fused_round); a
request asks for it by naming the draft (`draft_model="pair-draft"`, its traced name), with no draft replica to
borrow. A draft too large to copy to every rank stays a separate model (`draft_model=` a loaded
model, or another served model's name), as before.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


from cluster.errors import ArtifactError, InputError

DRAFT_FOLDER = "draft"


def fused_draft_info(target: Any, draft: Any) -> dict[str, Any]:
    """What the target needs to know of a draft it holds (its name, layout and vocabulary), after
    checking the pair fits: both decoders traced for generation, the draft at tp_degree 1 on the
    same backend, one vocabulary and tokenizer, and verification graphs on the target. Takes the
    two models' ModelStates."""
    target_decoder, draft_decoder = target.extra.get("decoder"), draft.extra.get("decoder")
    if not target_decoder or not draft_decoder:
        which = "target" if not target_decoder else "draft"
        raise InputError(f"the {which} is not a decoder traced for generation (cluster.models.llama.trace_llama)")
    if int(target_decoder["layout"].get("verify_tokens", 0)) < 2:
        raise InputError("the target was traced without verification graphs (DecoderLayout.verify_tokens): "
                         "retrace it with verify_tokens = the largest k + 1 to speculate")
    if draft.tp_degree != 1:
        raise InputError(f"a fused draft runs whole on every rank: trace it with tp_degree=1 (it has {draft.tp_degree})")
    if draft.backend != target.backend:
        raise InputError(f"the draft was traced for backend {draft.backend!r}, the target for {target.backend!r}: "
                         "trace both for the same backend")
    if int(draft_decoder["vocab_size"]) != int(target_decoder["vocab_size"]):
        raise InputError(f"the draft has a vocabulary of {draft_decoder['vocab_size']}, the target "
                         f"{target_decoder['vocab_size']}: they must share a tokenizer and vocabulary")
    if draft_decoder.get("tokenizer_sha", "") != target_decoder.get("tokenizer_sha", ""):
        raise InputError("draft and target were traced with different tokenizers: they must share one")
    return {"name": draft_decoder.get("name", "draft"), "layout": draft_decoder["layout"],
            "vocab_size": int(draft_decoder["vocab_size"])}


def fuse_draft(target: str | os.PathLike, draft: str | os.PathLike) -> Path:
    """Copy the saved draft model `draft` (tp_degree 1) into the saved target `target` as its fused
    draft, replacing any there; checked first, so a pair that cannot fuse leaves the target as it
    was. Returns the draft's new folder."""
    from cluster.trace import artifact

    target, draft = Path(target), Path(draft)
    target_state = artifact.read(target, mapped=True)[0]  # the states only: no weights read
    draft_state = artifact.read(draft, mapped=True)[0]
    fused_draft_info(target_state, draft_state)
    folder = target / DRAFT_FOLDER
    partial = target / f"{DRAFT_FOLDER}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(draft, partial, ignore=shutil.ignore_patterns(DRAFT_FOLDER, f"{DRAFT_FOLDER}.partial"))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def read_fused_draft(target: str | os.PathLike, *, mapped: bool = False) -> tuple[Any, list[bytes], Any] | None:
    """The fused draft saved in the target's folder (its state, graphs and weights, every file
    verified; with `mapped`, its weight files rather than tensors: artifact.read), or None when it
    has none."""
    from cluster.trace import artifact

    folder = Path(target) / DRAFT_FOLDER
    if not folder.exists():
        return None
    try:
        state, graphs, weights = artifact.read(folder, mapped=mapped)
    except ArtifactError as exc:
        raise ArtifactError(f"{target}: its fused draft does not load ({exc}); fuse the draft again "
                            f"(cluster.trace.fuse_draft) or remove the folder {folder}") from exc
    if state.tp_degree != 1:
        raise ArtifactError(f"{folder}: a fused draft must be traced with tp_degree=1 (it has {state.tp_degree})")
    return state, graphs[0], weights[0]


__all__ = ["DRAFT_FOLDER", "fuse_draft", "fused_draft_info", "read_fused_draft"]
