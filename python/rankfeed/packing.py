"""Feed rankfeed's packed (padding-free) batches to Hugging Face models, and score them per pair.

A packed batch (``Dataset(path).loader(packed=True, ...)``) holds every pair of a batch back to
back in one row: ``input_ids [T]``, ``position_ids [T]`` (restarting at 0 in each pair),
``token_type_ids [T]`` (encoder tokenizers that have them), ``cu_seqlens [B*G+1]`` (pair
boundaries) and ``max_seqlen``. A model fed that row as a batch of one must (1) not attend across
pair boundaries, (2) see each pair's own positions, and (3) be scored once per pair, not once per
row. This module does all three for the model families it knows, and refuses the others::

    from rankfeed.packing import packed_scores, padded_scores
    scores = packed_scores(model, packed_batch)               # cross-encoder: [B*G] logits
    scores = packed_scores(model, packed_batch, yes_id=yes)   # LLM reranker: yes-logit per pair
    loss = rankfeed.hf.group_loss(scores, group_size)

Lower level, for callers that run the model themselves::

    kwargs = to_model_inputs(packed_batch, model)              # the forward's keyword arguments
    outputs = model.base_model(**kwargs)                       # or model(**kwargs) for *ForCausalLM
    scores = pair_scores(outputs, packed_batch, model, score=yes or "classifier")

Families (``model.config.model_type``):

- Encoders ``bert``, ``roberta``, ``xlm-roberta`` (``*ForSequenceClassification``): attention is
  a block-diagonal mask, passed as ``[1, T, T]`` (0/1) because BERT/RoBERTa's
  ``get_extended_attention_mask`` accepts 2-D or 3-D masks only and turns a 3-D one into the
  additive ``[1, 1, T, T]`` mask for eager and SDPA alike. RoBERTa/XLM-R positions start at
  ``padding_idx + 1`` (``config.pad_token_id + 1``), so ``position_ids + pad_token_id + 1`` is
  passed; ``token_type_ids`` are always passed explicitly (zeros when the batch has none), since
  the model's buffered zeros are only ``max_position_embeddings`` long and a packed row is longer.
  Scores: the classification head on each pair's first token (``cu_seqlens[:-1]``): BERT's
  pooler + dropout + classifier, RoBERTa's classification head on ``[N, 1, H]`` features, exactly
  as the padded model does per row. (``BertForSequenceClassification`` called on a ``1 x T`` row
  would classify only the row's first token: never score a packed batch with its ``.logits``.)
- Decoders ``qwen2``, ``qwen3``, ``llama``, ``mistral``, ``gemma`` (``*ForCausalLM`` scored by
  the logit of ``yes_id`` at each pair's last token ``cu_seqlens[1:] - 1``, or
  ``*ForSequenceClassification`` scored by the score head at that token): ``input_ids`` and
  ``position_ids`` of shape ``[1, T]``, ``use_cache=False`` (with a cache transformers does not
  look at ``position_ids`` for packing), and for eager/SDPA either no mask (transformers whose
  ``masking_utils`` has ``find_packed_sequence_indices``, e.g. 4.57, with torch >= 2.6, derive
  the block-diagonal causal mask from the restarting ``position_ids``, but only when
  ``attention_mask`` is None and there is no cache) or, when that is unavailable or ``attention="mask"``, an explicit additive
  ``[1, 1, T, T]`` block-diagonal causal mask (T x T floats: for small T).
- Flash attention (``config._attn_implementation`` containing ``"flash"``): no mask, and
  transformers' varlen keyword arguments ``cu_seq_lens_q``, ``cu_seq_lens_k`` (int32 ``[N+1]``),
  ``max_length_q``, ``max_length_k`` (ints), as ``DataCollatorWithFlattening(
  return_flash_attn_kwargs=True)`` emits them. An encoder whose forward takes no such keyword
  arguments (BERT/XLM-R up to transformers 4.57 do not support flash attention) is refused.

Anything else is a ``ValueError`` naming the supported families: use padded batches
(``packed=False``) for such models. Nothing here guesses: a wrong mask would give wrong scores
silently.
"""

from __future__ import annotations

import inspect

import numpy as np

__all__ = [
    "ENCODERS",
    "DECODERS",
    "to_model_inputs",
    "pair_scores",
    "packed_scores",
    "padded_scores",
]

ENCODERS = ("bert", "roberta", "xlm-roberta")
DECODERS = ("qwen2", "qwen3", "llama", "mistral", "gemma")
_ATTENTION = ("auto", "mask", "native", "flash")


def _torch():
    import torch

    return torch


def _family(model):
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in ENCODERS:
        return "encoder"
    if kind in DECODERS:
        return "decoder"
    raise ValueError(
        f"rankfeed.packing does not support model_type {kind!r} (model {type(model).__name__}): "
        f"packed batches are supported for the encoders {', '.join(ENCODERS)} and the decoders "
        f"{', '.join(DECODERS)}. For other models use padded batches (loader(packed=False)), "
        "which every model takes as they are.")


def _tensor(x, device, dtype=None):
    torch = _torch()
    if isinstance(x, torch.Tensor):
        t = x
    else:
        t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device, dtype=dtype if dtype is not None else t.dtype)


def _device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return _torch().device("cpu")


def _flat(batch, key, device, dtype=None):
    t = _tensor(batch[key], device, dtype)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"packed batch key {key!r} must be [T] (or [1, T]), got {tuple(t.shape)}: "
                         "is this a padded batch? Use padded_scores for those.")
    return t


def _bounds(batch, device):
    torch = _torch()
    if "cu_seqlens" not in batch:
        raise ValueError("not a packed batch: it has no cu_seqlens (use loader(packed=True), or "
                         "padded_scores for padded batches)")
    cu = _flat(batch, "cu_seqlens", device, torch.long)
    lengths = cu[1:] - cu[:-1]
    if cu.numel() < 2 or int(cu[0]) != 0 or bool((lengths <= 0).any()):
        raise ValueError(f"cu_seqlens must start at 0 and increase strictly, got {cu.tolist()}")
    return cu, lengths


def _segments(lengths):
    torch = _torch()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)


def _attn_impl(model):
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def _native_packing():
    """Whether the installed transformers derives a packed mask from position_ids (eager/SDPA)."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return (hasattr(masking_utils, "find_packed_sequence_indices")
            and bool(getattr(masking_utils, "_is_torch_greater_or_equal_than_2_6", False)))


def _sliding_window(config):
    if getattr(config, "model_type", None) in ("qwen2", "qwen3") and not getattr(
            config, "use_sliding_window", False):
        return None
    return getattr(config, "sliding_window", None)


def _takes_kwargs(module):
    return any(p.kind is inspect.Parameter.VAR_KEYWORD
               for p in inspect.signature(module.forward).parameters.values())


def to_model_inputs(batch, model, *, attention="auto"):
    """The keyword arguments that run ``model`` (or ``model.base_model``) on a packed batch.

    ``batch``: a packed rankfeed batch (numpy arrays or torch tensors; ``[T]`` or ``[1, T]``).
    ``model``: a Hugging Face model of a supported family (module docstring). ``attention``:
    ``"auto"`` (flash varlen kwargs for a flash ``_attn_implementation``; otherwise for encoders
    a block-diagonal mask, for decoders transformers' own packed-``position_ids`` masking when
    the installed version has it, else an explicit mask), ``"mask"`` (always an explicit
    block-diagonal mask, causal for decoders), ``"native"`` (decoders: no mask, rely on
    transformers detecting packing from ``position_ids``; refused if it cannot) or ``"flash"``.

    Returns a dict of tensors on the model's device, every id tensor shaped ``[1, T]``:
    ``input_ids``, ``position_ids`` (offset by ``pad_token_id + 1`` for RoBERTa/XLM-R), and as
    the family needs ``token_type_ids``, ``attention_mask``, ``use_cache=False``,
    ``cu_seq_lens_q``/``cu_seq_lens_k``/``max_length_q``/``max_length_k``. Feature keys of the
    batch (``rows``, ``pos``, ``neg``, ``teacher_scores``, ...) are left out.

    Raises ``ValueError`` for an unsupported model, a non-packed batch, positions beyond the
    model's position table, or an attention choice the model cannot honour.
    """
    torch = _torch()
    if attention not in _ATTENTION:
        raise ValueError(f"attention must be one of {_ATTENTION}, got {attention!r}")
    family = _family(model)
    config = model.config
    device = _device(model)
    cu, lengths = _bounds(batch, device)
    ids = _flat(batch, "input_ids", device, torch.long)
    pos = _flat(batch, "position_ids", device, torch.long)
    total = ids.numel()
    if int(cu[-1]) != total or pos.numel() != total:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but input_ids has {total} tokens and "
                         f"position_ids {pos.numel()}")
    max_len = int(lengths.max())
    impl = _attn_impl(model)
    flash = attention == "flash" or (attention == "auto" and "flash" in impl)
    if attention == "flash" and "flash" not in impl:
        raise ValueError(f"attention='flash' but the model's _attn_implementation is {impl!r}")
    out = {"input_ids": ids[None]}

    if family == "encoder":
        if attention == "native":
            raise ValueError("attention='native' is for decoders: encoders in transformers do not "
                             "detect packing from position_ids; use 'auto' or 'mask'")
        if config.model_type in ("roberta", "xlm-roberta"):
            pos = pos + int(config.pad_token_id) + 1  # RoBERTa positions start at padding_idx + 1
        limit = int(config.max_position_embeddings)
        if int(pos.max()) >= limit:
            raise ValueError(f"a pair needs position {int(pos.max())} but the model has "
                             f"max_position_embeddings = {limit}: shorten query/passage_max_len")
        out["position_ids"] = pos[None]
        if "token_type_ids" in batch:
            out["token_type_ids"] = _flat(batch, "token_type_ids", device, torch.long)[None]
        else:  # explicit zeros: the model's buffered ones stop at max_position_embeddings
            out["token_type_ids"] = torch.zeros_like(ids)[None]
        if flash:
            if not _takes_kwargs(model.base_model):
                raise ValueError(
                    f"{type(model.base_model).__name__}.forward takes no flash-attention varlen "
                    "arguments in this transformers version: packed batches would attend across "
                    "pairs. Use attn_implementation='sdpa' or 'eager' (block-diagonal mask) or "
                    "padded batches.")
            out.update(_flash_kwargs(cu, max_len))
        else:
            seg = _segments(lengths)
            out["attention_mask"] = (seg[:, None] == seg[None, :]).to(torch.long)[None]  # [1,T,T]
        return out

    # Decoders.
    out["position_ids"] = pos[None]
    out["use_cache"] = False
    if flash:
        out.update(_flash_kwargs(cu, max_len))
        return out
    if attention == "native" or (attention == "auto" and _native_packing()):
        if not _native_packing():
            raise ValueError("attention='native' needs a transformers with "
                             "masking_utils.find_packed_sequence_indices and torch >= 2.6; "
                             "use attention='mask'")
        return out  # attention_mask None + no cache: transformers masks by position_ids
    window = _sliding_window(config)
    if window is not None and max_len > int(window):
        raise ValueError(f"a pair of {max_len} tokens exceeds the sliding window {window}: the "
                         "explicit mask does not model sliding-window layers; use "
                         "attention='native' or padded batches")
    dtype = next(model.parameters()).dtype
    seg = _segments(lengths)
    idx = torch.arange(total, device=device)
    allowed = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    mask = torch.zeros(total, total, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    out["attention_mask"] = mask[None, None]  # [1, 1, T, T], additive
    return out


def _flash_kwargs(cu, max_len):
    torch = _torch()
    cu32 = cu.to(torch.int32)
    return {"cu_seq_lens_q": cu32, "cu_seq_lens_k": cu32,
            "max_length_q": max_len, "max_length_k": max_len}


def _hidden(outputs):
    h = getattr(outputs, "last_hidden_state", None)
    if h is None and isinstance(outputs, (tuple, list)):
        h = outputs[0]
    return h


def _head(model, hidden, family):
    """Apply the model's scoring head to per-pair hidden states ``[N, H]``: ``[N, num_labels]``."""
    kind = model.config.model_type
    if family == "encoder":
        if kind == "bert":
            if not hasattr(model, "classifier") or getattr(model.bert, "pooler", None) is None:
                raise ValueError(f"{type(model).__name__}: scoring a BERT needs "
                                 "BertForSequenceClassification (pooler + classifier)")
            pooled = model.bert.pooler(hidden[:, None, :])
            return model.classifier(model.dropout(pooled))
        if not hasattr(model, "classifier"):
            raise ValueError(f"{type(model).__name__}: scoring needs a *ForSequenceClassification")
        return model.classifier(hidden[:, None, :])  # RobertaClassificationHead takes [:, 0]
    if hasattr(model, "score"):  # *ForSequenceClassification
        return model.score(hidden)
    raise ValueError(f"{type(model).__name__}: a decoder is scored with yes_id (a *ForCausalLM) "
                     "or by a *ForSequenceClassification's score head")


def _yes_logits(model, hidden, yes_id):
    torch = _torch()
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head: yes_id needs a *ForCausalLM")
    bias = head.bias[yes_id:yes_id + 1] if getattr(head, "bias", None) is not None else None
    logits = torch.nn.functional.linear(hidden, head.weight[yes_id:yes_id + 1], bias)[:, 0]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _squeeze(logits):
    return logits[:, 0] if logits.dim() == 2 and logits.shape[1] == 1 else logits


def pair_scores(outputs, batch, model, *, score="classifier"):
    """Per-pair scores ``[B*G]`` (``[B*G, num_labels]`` for several labels) of a packed batch.

    ``outputs``: what ``model.base_model(**to_model_inputs(batch, model))`` returned (hidden
    states ``[1, T, H]``), or for ``*ForCausalLM`` with ``score=yes_id`` also what the full
    ``model(**...)`` returned (logits ``[1, T, V]``). ``score``: ``"classifier"`` (the
    classification head: on each pair's first token for encoders, its last token for decoders)
    or an int token id (the LM logit of that token at each pair's last token).
    """
    torch = _torch()
    family = _family(model)
    device = _device(model)
    cu, _ = _bounds(batch, device)
    at = cu[:-1] if family == "encoder" else cu[1:] - 1
    if family == "encoder" and score != "classifier":
        raise ValueError("encoders are scored with score='classifier'")
    logits = getattr(outputs, "logits", None)
    hidden = _hidden(outputs) if logits is None else None
    if not isinstance(score, str):
        yes_id = int(score)
        if logits is not None:
            if logits.dim() != 3 or logits.shape[0] != 1:
                raise ValueError(f"expected token logits [1, T, V], got {tuple(logits.shape)}")
            return logits[0, at, yes_id]
        return _yes_logits(model, hidden[0, at], yes_id)
    if score != "classifier":
        raise ValueError(f"score must be 'classifier' or a token id, got {score!r}")
    if hidden is None or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError("score='classifier' needs the backbone's output (call model.base_model"
                         "(**to_model_inputs(...))): a sequence-classification model run on a "
                         "packed row pools only one token per row")
    return _squeeze(_head(model, hidden[0, at], family))


def packed_scores(model, batch, *, yes_id=None, attention="auto"):
    """Run ``model`` on a packed batch and return its per-pair scores ``[B*G]``.

    ``yes_id``: for decoder LLM rerankers (``*ForCausalLM``), the token whose logit at each
    pair's last token is the score; None: the model's classification head. Gradients flow, so
    ``group_loss(packed_scores(...), G).backward()`` trains on the packed batch.
    """
    kwargs = to_model_inputs(batch, model, attention=attention)
    outputs = model.base_model(**kwargs)
    return pair_scores(outputs, batch, model, score="classifier" if yes_id is None else yes_id)


def padded_scores(model, batch, *, yes_id=None):
    """The reference: per-row scores ``[B*G]`` of a padded batch (the same loader, unpacked).

    Encoders: the model's own ``logits`` given ``input_ids``, ``attention_mask`` and
    ``token_type_ids`` (RoBERTa/XLM-R derive positions from the pad id, as they do). A packed
    batch equals this for right-padded encoder batches (the tokenizers' default): BERT counts
    positions over the pads of a left-padded row, so its scores shift. Decoders:
    positions counted over real tokens (``cumsum(attention_mask) - 1``, so left padding does not
    shift them), ``use_cache=False``, and the score (``yes_id`` logit, else the score head) at
    each row's last real token, for left or right padding.
    """
    torch = _torch()
    family = _family(model)
    device = _device(model)
    ids = _tensor(batch["input_ids"], device, torch.long)
    mask = _tensor(batch["attention_mask"], device, torch.long)
    if family == "encoder":
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = _tensor(batch["token_type_ids"], device, torch.long)
        return _squeeze(model(**kwargs).logits)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    length = mask.shape[1]
    last = length - 1 - mask.flip(-1).argmax(-1)  # the last position holding a real token
    rows = torch.arange(ids.shape[0], device=device)
    if yes_id is not None:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                       use_cache=False).logits
        return logits[rows, last, int(yes_id)]
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
    return _squeeze(_head(model, hidden[rows, last], family))
