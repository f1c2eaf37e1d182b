"""sentence-transformers trainers fed by rankfeed (sentence-transformers >= 5 is optional:
imported only when this module is).

    from sentence_transformers.cross_encoder import CrossEncoder, losses
    from rankfeed.st import RankfeedCrossEncoderTrainer

    model = CrossEncoder("path/to/model")
    trainer = RankfeedCrossEncoderTrainer(model=model, args=args, train_dataset="data/train",
                                          group_size=8, loss=losses.BinaryCrossEntropyLoss(model))
    trainer.train()                                   # or train(resume_from_checkpoint=True)

`RankfeedCrossEncoderTrainer` and `RankfeedSentenceTransformerTrainer` are
sentence-transformers' `CrossEncoderTrainer` and `SentenceTransformerTrainer` whose training
data is a rankfeed dataset (a path, or a `rankfeed.torch.RankfeedIterable`) instead of a
`datasets.Dataset`: batches are read pre-tokenized from the mapped dataset (nothing is
tokenized while training), sampled by rankfeed (seeded, sharded by the Trainer's rank, every
rank the same number of steps), with the epoch advance, exact resume and elastic resume of
`rankfeed.hf.RankfeedTrainer` (`rankfeed_state.json` in every checkpoint).

What the losses see is what they would compute from text:
- cross-encoder: sentence-transformers' losses tokenize inside `forward` with
  `model.preprocess(pairs)`. The trainer hands a loss stand-ins for the texts (its usual input
  columns: queries, then one column per passage of the group, or pairs, or lists; see
  `LOSS_INPUTS`) and, while the loss runs, answers `model.preprocess` with the rows of the
  rankfeed batch that hold those pairs, cut to their longest as the tokenizer pads. So every
  sentence-transformers loss whose pairs are a query with its own group's passages works
  unchanged, with its own arithmetic; a pair of a query with another query's passage (in-batch
  negatives: `MultipleNegativesRankingLoss(num_negatives>0)`) is not in the batch and is a
  ValueError saying so.
- bi-encoder: the batch's queries and passages become the collator's columns `anchor`,
  `positive`, `negative_1`, ... (`{column}_input_ids`, `{column}_attention_mask`,
  `{column}_token_type_ids`, each column padded to its own longest), with `label` the teacher
  scores `[B, G]` when the batch carries them: any loss on (anchor, positive, negatives...)
  works (`MultipleNegativesRankingLoss`, `CachedMultipleNegativesRankingLoss`,
  `MarginMSELoss`, `DistillKLDivLoss`, ...).

Truncation (given a path, the trainer makes the loader the way sentence-transformers
tokenizes): the cross-encoder's pairs are cut to the model's `max_seq_length` by the tokenizer's
`longest_first` rule (`truncation="longest_first"`), the bi-encoder's queries and passages each
to `max_seq_length`. FlagEmbedding cuts pairs otherwise (the query first, then the passage);
a `RankfeedIterable` made with FlagEmbedding's truncation is trained on as it is, with a warning
that its features differ from sentence-transformers' own.
"""

import warnings

import torch
from sentence_transformers import SentenceTransformerTrainer
from sentence_transformers.base.model import BaseModel
from sentence_transformers.cross_encoder import CrossEncoderTrainer

from .hf import RankfeedTrainerMixin, group_loss
from .torch import RankfeedIterable, _META

# How each sentence-transformers cross-encoder loss takes its inputs (its documented dataset
# formats), and the labels it wants. "columns": (query, passage_1, ..., passage_G) with labels
# None or the teacher scores [B, G]; "pairs": (query, passage) for each of the B*G pairs with one
# label each; "lists": (query, [passages]) with a list of B label tensors [G].
LOSS_INPUTS = {
    "MultipleNegativesRankingLoss": "columns",  # one query per device only (in-batch pairs)
    "MarginMSELoss": "columns",
    "GroupCrossEntropyLoss": "columns",
    "BinaryCrossEntropyLoss": "pairs",
    "MSELoss": "pairs",
    "ListNetLoss": "lists",
    "ListMLELoss": "lists",
    "PListMLELoss": "lists",
    "LambdaLoss": "lists",
    "RankNetLoss": "lists",
}
# Cross-encoder losses refused, and why.
REFUSED = {
    "CachedMultipleNegativesRankingLoss": "its backward pass tokenizes the pairs again, outside "
    "the step (and its pairs are in-batch negatives): use GroupCrossEntropyLoss",
}
# Losses whose labels are teacher scores (their loaders gather them: knowledge_distillation),
# of the cross-encoder and of the bi-encoder (whose MSELoss distills embeddings, not scores).
TEACHER_LOSSES = ("MarginMSELoss", "MSELoss")
BI_TEACHER_LOSSES = ("MarginMSELoss", "DistillKLDivLoss")


class GroupCrossEntropyLoss(torch.nn.Module):
    """FlagEmbedding's reranker loss as a sentence-transformers cross-encoder loss: for each
    query, cross-entropy over the scores of its group (the positive first, then its G-1 hard
    negatives), plus, with teacher scores as labels `[B, G]`, `-mean(sum(log_softmax(student) *
    softmax(teacher)))` (FlagEmbedding's knowledge distillation). Inputs: (query, passage_1,
    ..., passage_G) columns, as `MultipleNegativesRankingLoss` with hard negatives only. Scores
    all B*G pairs in one forward pass (and takes the same text columns in
    `CrossEncoderTrainer`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs, labels=None, prompt=None, task=None):
        queries, columns = inputs[0], inputs[1:]
        group = len(columns)
        pairs = [(q, column[b]) for b, q in enumerate(queries) for column in columns]
        features = self.model.preprocess(pairs, prompt=prompt, task=task)
        features = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v
                    for k, v in features.items()}
        scores = self.model(features)["scores"].reshape(-1)
        teacher = None
        if labels is not None:
            teacher = torch.as_tensor(labels, device=scores.device).reshape(-1)
        return group_loss(scores, group, teacher)

    def get_config_dict(self):
        return {}


class _Text(str):
    """A stand-in for a text in a cross-encoder loss's inputs: which query, or which row of the
    batch (pair b*G+g), it is."""

    def __new__(cls, kind, index):
        s = super().__new__(cls, f"<rankfeed {kind} {index}>")
        s.rankfeed = (kind, index)
        return s


def _trim(features):
    """The rows of a padded batch cut to their longest (right or left padding), as a
    tokenizer pads a batch of just these rows."""
    mask = features.get("attention_mask")
    if mask is None:
        return features
    width = mask.shape[1]
    longest = int(mask.sum(dim=1).max()) if mask.shape[0] else 0
    if longest == width:
        return features
    left = bool(mask[:, longest:].any())  # right-padded rows have no token past `longest`
    cut = slice(width - longest, width) if left else slice(0, longest)
    return {k: v[:, cut] if isinstance(v, torch.Tensor) and v.dim() == 2 else v
            for k, v in features.items()}


_MISSING = object()


class _Pretokenized:
    """While a cross-encoder loss runs: `model.preprocess(pairs)` (on every model the loss
    holds, wrapped ones included) returns the batch rows of those pairs."""

    def __init__(self, loss, features, group_size, extra):
        self.loss, self.features, self.group, self.extra = loss, features, group_size, extra
        self.patched = []

    def preprocess(self, inputs, prompt=None, task=None, **kwargs):
        if prompt:
            raise ValueError(
                "rankfeed.st: a prompt cannot be added to pre-tokenized pairs; convert the dataset "
                "with query_instruction / query_instruction_format instead")
        rows = []
        for pair in inputs:
            q, p = (pair if isinstance(pair, (tuple, list)) and len(pair) == 2 else (None, None))
            qk, pk = getattr(q, "rankfeed", None), getattr(p, "rankfeed", None)
            if not (qk and pk and qk[0] == "query" and pk[0] == "pair"):
                raise ValueError(
                    f"rankfeed.st: the loss asked to preprocess {pair!r}, which is not a (query, "
                    "passage) pair of the rankfeed batch it was given")
            if pk[1] // self.group != qk[1]:
                raise ValueError(
                    f"rankfeed.st: the loss pairs query {qk[1]} with a passage of query "
                    f"{pk[1] // self.group} (in-batch negatives), a pair the rankfeed batch does not "
                    "hold: train on the groups' own hard negatives with "
                    "rankfeed.st.GroupCrossEntropyLoss")
            rows.append(pk[1])
        ids = self.features["input_ids"]
        if rows == list(range(ids.shape[0])):
            out = dict(self.features)
        else:
            index = torch.as_tensor(rows, dtype=torch.long, device=ids.device)
            out = {k: v.index_select(0, index) for k, v in self.features.items()}
        return {**_trim(out), **self.extra}

    def _targets(self, loss):
        for name, child in loss.named_children():
            if name == "model":
                yield child
                inner = getattr(child, "module", None)  # DDP: the wrapped BaseModel
                if isinstance(inner, BaseModel):
                    yield inner
            elif isinstance(child, torch.nn.Module) and not isinstance(child, BaseModel):
                yield from self._targets(child)

    def __enter__(self):
        for model in self._targets(self.loss):
            self.patched.append((model, model.__dict__.get("preprocess", _MISSING)))
            model.__dict__["preprocess"] = self.preprocess
        return self

    def __exit__(self, *exc):
        for model, before in reversed(self.patched):
            if before is _MISSING:
                model.__dict__.pop("preprocess", None)
            else:
                model.__dict__["preprocess"] = before
        self.patched = []
        return False


def _loss_name(loss):
    return type(loss).__name__


class _RankfeedST(RankfeedTrainerMixin):
    """What both sentence-transformers trainers share: the dataset, the checks of the
    sentence-transformers arguments rankfeed replaces, the batch's bookkeeping keys."""

    _mode = None
    _teacher_losses = ()

    def __init__(self, model=None, args=None, train_dataset=None, *, group_size=None,
                 max_length=None, loader_options=None, **kwargs):
        if train_dataset is None:
            raise TypeError(f"{type(self).__name__} needs train_dataset (a rankfeed dataset path "
                            "or a rankfeed.torch.RankfeedIterable)")
        super().__init__(model=model, args=args, train_dataset=None, **kwargs)
        self._check_st_args()
        self.train_dataset = self._rankfeed_dataset(train_dataset, group_size, max_length,
                                                    dict(loader_options or {}))
        self._rankfeed_init()
        self._warned = set()

    def _check_st_args(self):
        a = self.args
        if a.prompts:
            raise ValueError(
                "rankfeed.st: args.prompts cannot be applied to pre-tokenized batches; convert the "
                "dataset with query_instruction / query_instruction_format (the same text before "
                "each query gives the same tokens)")
        if a.router_mapping:
            raise ValueError("rankfeed.st: args.router_mapping is not supported with rankfeed batches")
        sampler = getattr(a.batch_sampler, "value", a.batch_sampler)
        if sampler != "batch_sampler":
            raise ValueError(
                f"rankfeed.st: args.batch_sampler={sampler!r}: rankfeed samples the batches itself "
                "(seeded groups, sharded by rank); leave batch_sampler at its default")
        if isinstance(self.loss, dict):
            raise ValueError("rankfeed.st: a dict of losses (one per dataset) is not supported "
                             "yet: pass one loss")

    def _max_length(self, max_length):
        if max_length is not None:
            return int(max_length)
        n = getattr(self.model, "max_seq_length", None)
        if not n or n > 1_000_000:
            raise ValueError("rankfeed.st: the model has no max_seq_length: pass max_length=")
        return int(n)

    def _wants_teacher(self, loss=None):
        """Whether `loss` (default the trainer's) trains on teacher scores."""
        return _loss_name(self.loss if loss is None else loss) in self._teacher_losses

    def _rankfeed_dataset(self, data, group_size, max_length, options):
        if isinstance(data, RankfeedIterable):
            if group_size is not None or max_length is not None or options:
                raise TypeError("rankfeed.st: group_size, max_length and loader_options are for a "
                                "dataset path; a RankfeedIterable has its own")
            settings = data.settings()
            if settings["mode"] != self._mode:
                raise ValueError(f"rankfeed.st: {type(self).__name__} trains on mode="
                                 f"{self._mode!r} batches, the RankfeedIterable has mode="
                                 f"{settings['mode']!r}")
            self._check_iterable(settings)
            return data
        for k in ("batch_size", "seed", "mode"):
            if k in options:
                raise TypeError(f"rankfeed.st: loader_options[{k!r}] comes from the trainer "
                                "(args.per_device_train_batch_size, args.seed, the model)")
        options.setdefault("knowledge_distillation", self._wants_teacher())
        options.update(self._loader_defaults(self._max_length(max_length)))
        for k in ("packed", "sub_batch_size"):
            if options.get(k):
                raise ValueError(f"rankfeed.st: {k} batches are not supported by "
                                 "sentence-transformers' models")
        return RankfeedIterable(str(data), batch_size=self.args.per_device_train_batch_size,
                                seed=self.args.seed, mode=self._mode,
                                group_size=8 if group_size is None else group_size, **options)

    def _check_iterable(self, settings):
        pass

    _probe = None

    def _extra_features(self):
        """The non-tensor keys `model.preprocess` adds to its features (e.g. the modality)."""
        if not hasattr(self, "_extra"):
            out = self.model.preprocess(self._probe)
            self._extra = {k: v for k, v in out.items() if not isinstance(v, torch.Tensor)}
        return self._extra

    def _batch(self, inputs):
        """The rankfeed batch without its bookkeeping: (features, teacher scores or None)."""
        for k in _META:
            inputs.pop(k, None)
        if bool(inputs.pop("no_in_batch_neg", False)) and "no_in_batch_neg" not in self._warned:
            self._warned.add("no_in_batch_neg")
            warnings.warn("rankfeed.st: a batch of a source marked no_in_batch_neg: "
                          "sentence-transformers' losses use in-batch negatives regardless",
                          stacklevel=3)
        if isinstance(inputs.get("packed"), torch.Tensor) or "cu_seqlens" in inputs:
            raise ValueError("rankfeed.st: packed batches are not supported")
        return inputs, inputs.pop("teacher_scores", None)


class RankfeedCrossEncoderTrainer(_RankfeedST, CrossEncoderTrainer):
    """sentence-transformers' `CrossEncoderTrainer` on rankfeed reranker batches (mode
    "encoder"): `train_dataset` a rankfeed dataset path (the loader is made from
    `args.per_device_train_batch_size` queries of `group_size` pairs each, `args.seed`, pairs
    cut to `max_length` (default the model's `max_seq_length`) by the tokenizer's longest_first
    rule, and `loader_options`, e.g. `length_grouped=50`) or a `RankfeedIterable`.

    The loss is any sentence-transformers cross-encoder loss whose pairs come from each
    query's own group (see the module docs and `LOSS_INPUTS`; `loss_inputs=` names the format
    of a loss not listed). Labels: teacher scores for the losses that distill
    (`TEACHER_LOSSES`: the loader then gathers them), else for pairs and lists the relevance
    (1 for the positive, 0 for the negatives); `labels="relevance"` or `"teacher"` chooses."""

    _mode = "encoder"
    _teacher_losses = TEACHER_LOSSES
    _probe = [("a", "b")]

    def __init__(self, *args, loss_inputs=None, labels=None, **kwargs):
        if labels not in (None, "relevance", "teacher"):
            raise ValueError(f"labels must be None, 'relevance' or 'teacher', got {labels!r}")
        if loss_inputs not in (None, "columns", "pairs", "lists"):
            raise ValueError(f"loss_inputs must be None, 'columns', 'pairs' or 'lists', got "
                             f"{loss_inputs!r}")
        self._loss_inputs, self._labels = loss_inputs, labels
        super().__init__(*args, **kwargs)
        self._loss_format()  # a loss without a known format fails here, not at the first step

    def _wants_teacher(self, loss=None):
        return self._labels == "teacher" or (self._labels is None
                                             and super()._wants_teacher(loss))

    def _loss_format(self, loss=None):
        """The input format of `loss` (default the trainer's): a ValueError for a refused loss
        or one of no known format."""
        name = _loss_name(self.loss if loss is None else loss)
        if name in REFUSED:
            raise ValueError(f"rankfeed.st: {name} is not supported: {REFUSED[name]}")
        fmt = self._loss_inputs or LOSS_INPUTS.get(name)
        if fmt is None:
            raise ValueError(
                f"rankfeed.st: which inputs {name} takes is not known: pass "
                "loss_inputs='columns' (query, passage_1..passage_G), 'pairs' ((query, passage) "
                "with one label each) or 'lists' ((query, [passages]) with a label list)")
        return fmt

    def _check_iterable(self, settings):
        max_length = getattr(self.model, "max_seq_length", None)
        budget = settings["query_max_len"] + settings["passage_max_len"]
        if settings["truncation"] != "longest_first" or budget != max_length:
            warnings.warn(
                f"rankfeed.st: the RankfeedIterable cuts pairs to {budget} tokens by "
                f"{settings['truncation']!r} truncation; sentence-"
                f"transformers cuts them to the model's max_seq_length ({max_length}) by "
                "longest_first: pairs that are cut differ from its own", stacklevel=3)

    def _loader_defaults(self, max_length):
        # The pair budget is query_max_len + passage_max_len under longest_first.
        return {"truncation": "longest_first", "query_max_len": max_length // 2,
                "passage_max_len": max_length - max_length // 2}

    def rankfeed_loss_inputs(self, loss, batch_size, group_size, teacher):
        """(inputs, labels) for `loss` on a batch of `batch_size` groups of `group_size`: the
        text stand-ins in the loss's format and its labels."""
        fmt = self._loss_format(loss)
        b_, g_ = range(batch_size), range(group_size)
        queries = [_Text("query", b) for b in b_]
        pair = [[_Text("pair", b * group_size + g) for g in g_] for b in b_]
        # Lists and columns also train on teacher scores when the batches carry them.
        use_teacher = self._wants_teacher(loss) or (
            self._labels is None and fmt != "pairs" and teacher is not None)
        if use_teacher and teacher is None:
            raise ValueError(
                f"rankfeed.st: {_loss_name(loss)} needs teacher scores: the batches carry none "
                "(make the loader with knowledge_distillation=True; every row needs pos_scores "
                "and neg_scores)")
        if use_teacher:
            grid = teacher.reshape(batch_size, group_size).float()
        else:
            grid = torch.zeros(batch_size, group_size)
            grid[:, 0] = 1.0
        if fmt == "columns":
            inputs = [queries] + [[pair[b][g] for b in b_] for g in g_]
            labels = grid if use_teacher else None
        elif fmt == "pairs":
            inputs = [[queries[b] for b in b_ for _ in g_], [p for row in pair for p in row]]
            labels = grid.reshape(-1)
        else:
            inputs, labels = [queries, pair], list(grid)
        return inputs, labels

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "input_ids" not in inputs:  # not a rankfeed batch: an eval_dataset's texts
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        features, teacher = self._batch(inputs)
        loss_fn = self.loss
        if model == self.model_wrapped and hasattr(loss_fn, "model") and loss_fn.model != model:
            loss_fn = self.override_model_in_loss(loss_fn, model)
        group = self.train_dataset.group_size
        rows = features["input_ids"].shape[0]
        columns, labels = self.rankfeed_loss_inputs(loss_fn, rows // group, group, teacher)
        if isinstance(labels, torch.Tensor):
            labels = labels.to(features["input_ids"].device)
        elif isinstance(labels, list):
            labels = [x.to(features["input_ids"].device) for x in labels]
        with _Pretokenized(loss_fn, features, group, self._extra_features()):
            loss = loss_fn(columns, labels)
        if isinstance(loss, dict):
            self.track_loss_components(loss)
            loss = torch.stack(list(loss.values())).sum()
        return (loss, {}) if return_outputs else loss


class RankfeedSentenceTransformerTrainer(_RankfeedST, SentenceTransformerTrainer):
    """sentence-transformers' `SentenceTransformerTrainer` on rankfeed embedder batches (mode
    "embedder"): `train_dataset` a rankfeed dataset path (the loader is made from
    `args.per_device_train_batch_size` queries with `group_size` passages each, the positive
    first, `args.seed`, queries and passages cut to `max_length` (default the model's
    `max_seq_length`), and `loader_options`, e.g. `same_source=True` with `weights`) or a
    `RankfeedIterable`. The loss sees the columns anchor, positive, negative_1, ...,
    negative_{G-1} (and `label`: the teacher scores [B, G], with knowledge_distillation)."""

    _mode = "embedder"
    _teacher_losses = BI_TEACHER_LOSSES
    _probe = ["a"]

    def _loader_defaults(self, max_length):
        return {"query_max_len": max_length, "passage_max_len": max_length}

    def rankfeed_features(self, features, teacher):
        """The collator's `{column}_*` keys of an embedder batch (see the class docs)."""
        group = self.train_dataset.group_size
        out, extra = {}, self._extra_features()
        for k, v in features.items():
            if k.startswith("query_"):
                out["anchor_" + k[len("query_"):]] = v
        for k, v in extra.items():
            out["anchor_" + k] = v
        queries = out["anchor_input_ids"].shape[0]
        names = ["positive"] + [f"negative_{g}" for g in range(1, group)]
        passages = {k[len("passage_"):]: v for k, v in features.items()
                    if k.startswith("passage_")}
        for g, name in enumerate(names):
            column = _trim({k: v[g::group] for k, v in passages.items()})
            for k, v in {**column, **extra}.items():
                out[f"{name}_{k}"] = v
        if teacher is not None:
            out["label"] = teacher.reshape(queries, group)
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not any(k.startswith("query_") for k in inputs):  # an eval_dataset's features
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        features, teacher = self._batch(inputs)
        if any(isinstance(v, list) for v in features.values()):
            raise ValueError("rankfeed.st: sub_batch_size batches are not supported")
        return super().compute_loss(model, self.rankfeed_features(features, teacher),
                                    return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
