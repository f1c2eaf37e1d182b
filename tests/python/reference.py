"""The reference pipeline: FlagEmbedding 1.4.2's reranker datasets and collator, written with
transformers<5 exactly as the README's Semantics section states them. It re-tokenizes text
on every access, as the original does; rankfeed must produce identical arrays from its ids."""

import logging
import warnings

import numpy as np

warnings.filterwarnings("ignore")
logging.getLogger("transformers").setLevel(logging.ERROR)

DEFAULT_LLM_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the "
    "query by providing a prediction of either 'Yes' or 'No'."
)
DEFAULT_MATRYOSHKA_PROMPT = "Predict whether passage B contains an answer to query A."


def format_text(instruction, fmt, row_prompt, text):
    """`fmt.format(row_prompt or instruction, text)` when an instruction is configured."""
    if instruction is None:
        return text
    fmt = fmt.replace("\\n", "\n")
    return fmt.format(row_prompt if row_prompt is not None else instruction, text)


def load_tokenizer(kind, path, add_eos_token=False):
    """A transformers fast tokenizer for a tokenizer.json (and its config, when beside it).
    `add_eos_token`: as FlagEmbedding's decoder-only embedder runner loads it."""
    from transformers import AutoTokenizer, LlamaTokenizerFast, XLMRobertaTokenizerFast

    directory = str(path.parent)
    if kind == "xlmr":
        tok = XLMRobertaTokenizerFast(tokenizer_file=str(path))
    elif kind == "mistral":
        tok = LlamaTokenizerFast.from_pretrained(directory, add_eos_token=add_eos_token)
    else:
        tok = AutoTokenizer.from_pretrained(directory)
    # The MiniLM file carries truncation/padding settings; transformers ignores them for
    # explicit calls, as does rankfeed.
    if tok.pad_token is None:  # the LLM reranker runners: pad = unk, else eos
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def seed_scores(row, pos, negs):
    """The Matryoshka seed code's teacher scores: looked up by text, `pos_scores[pos.index(t)]`
    and `neg_scores[neg.index(t)]` (the first occurrence of a repeated text), 1 when the row has
    no scores; always returned."""
    def score(texts, scores, i):
        if scores is None:
            return 1.0
        return scores[texts.index(texts[i])]
    return ([score(row["pos"], row.get("pos_scores"), pos)]
            + [score(row["neg"], row.get("neg_scores"), j) for j in negs])


class EmbedderReference:
    """FlagEmbedding 1.4.2's `AbsEmbedderTrainDataset.__getitem__` + `AbsEmbedderCollator` for
    fixed selections: texts formatted (the row's `prompt` is the query instruction), tokenized
    WITH special tokens and truncated to their own max lengths, queries and passages padded
    separately (per chunk of `sub_batch_size` rows when it is > 0)."""

    def __init__(self, tok, qm, pm, text_settings, pad_to_multiple_of=None, padding_side="right",
                 knowledge_distillation=False, sub_batch_size=-1):
        self.tok, self.qm, self.pm = tok, qm, pm
        self.text = text_settings
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side
        self.kd = knowledge_distillation
        self.sub_batch_size = sub_batch_size

    def texts(self, row, pos, negs):
        t = self.text
        query = row["query"]
        if t.get("query_instruction") is not None:
            fmt = t.get("query_instruction_format", "{}{}").replace("\\n", "\n")
            prompt = row.get("prompt")  # null = absent (documented)
            query = fmt.format(prompt if prompt is not None else t["query_instruction"], query)
        passages = [row["pos"][pos]] + [row["neg"][j] for j in negs]
        if t.get("passage_instruction") is not None:
            fmt = t.get("passage_instruction_format", "{}{}").replace("\\n", "\n")
            passages = [fmt.format(t["passage_instruction"], p) for p in passages]
        scores = None
        if self.kd:
            scores = [row["pos_scores"][pos]] + [row["neg_scores"][j] for j in negs]
        return query, passages, scores

    def pad(self, inputs):
        self.tok.padding_side = self.padding_side
        n = len(inputs["input_ids"])
        k = self.sub_batch_size if self.sub_batch_size and self.sub_batch_size > 0 else None
        chunks = []
        for start in range(0, n, k or max(n, 1)):
            sub = {key: v[start:start + (k or n)] for key, v in inputs.items()}
            out = self.tok.pad(sub, padding=True, pad_to_multiple_of=self.pad_to_multiple_of,
                               return_tensors="np")
            chunks.append({key: np.asarray(v) for key, v in out.items()})
        return chunks if k else chunks[0]

    def batch(self, rows, selections):
        queries, passages, scores = [], [], []
        for sel in selections:
            q, ps, s = self.texts(rows[sel["row"]], sel["pos"], sel["neg"])
            queries.append(q)
            passages += ps
            scores += s or []
        q_in = self.tok(queries, truncation=True, max_length=self.qm, return_tensors=None)
        p_in = self.tok(passages, truncation=True, max_length=self.pm, return_tensors=None)
        arrays = {}
        for side, inputs in (("query", q_in), ("passage", p_in)):
            padded = self.pad(dict(inputs))
            keys = (padded[0] if isinstance(padded, list) else padded).keys()
            for key in keys:
                arrays[f"{side}_{key}"] = ([c[key] for c in padded] if isinstance(padded, list)
                                          else padded[key])
        if self.kd:
            arrays["teacher_scores"] = np.asarray(scores, dtype=np.float32)
        arrays["no_in_batch_neg"] = np.asarray(False)
        return arrays


class Reference:
    """One configuration of the reference: mode, lengths, padding, distillation."""

    def __init__(self, tok, mode, qm, pm, text_settings, pad_to_multiple_of=None,
                 padding_side="right", knowledge_distillation=False, sep_token="\n"):
        self.tok, self.mode, self.qm, self.pm = tok, mode, qm, pm
        self.text = text_settings
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side
        self.kd = knowledge_distillation
        self.sep = tok(sep_token, add_special_tokens=False)["input_ids"]

    def ids(self, text, max_length=None):
        if max_length is None:
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(text, truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"]

    def query_text(self, row):
        t = self.text
        return format_text(t.get("query_instruction"), t.get("query_instruction_format", "{}{}"),
                           row.get("query_prompt"), row["query"])

    def passage_text(self, row, p):
        t = self.text
        return format_text(t.get("passage_instruction"), t.get("passage_instruction_format", "{}{}"),
                           row.get("passage_prompt"), p)

    def group(self, row, pos, negs):
        """__getitem__ for a fixed selection: the features of the G pairs, and their scores."""
        passages = [row["pos"][pos]] + [row["neg"][j] for j in negs]
        passages = [self.passage_text(row, p) for p in passages]
        qm, pm = self.qm, self.pm
        features, qlens, plens = [], [], []
        if self.mode == "encoder":
            q = self.ids(self.query_text(row), qm + pm // 4)
            for p_text in passages:
                p = self.ids(p_text, pm + qm // 2)
                item = self.tok.prepare_for_model(q, p, truncation="only_second", max_length=qm + pm,
                                                  padding=False)
                features.append(dict(item))
        else:
            matryoshka = self.mode == "matryoshka"
            q = self.ids(self.query_text(row), qm if matryoshka else qm + pm // 4)
            default = DEFAULT_MATRYOSHKA_PROMPT if matryoshka else DEFAULT_LLM_PROMPT
            prompt = self.ids(row.get("prompt") or default)
            max_length = qm + pm - len(prompt) - len(self.sep)
            bos = self.tok.bos_token_id
            a = ([bos] if bos is not None and bos != self.tok.pad_token_id else []) + q
            for p_text in passages:
                p = self.ids(p_text, pm + qm // 2)
                item = self.tok.prepare_for_model(a, self.sep + p, truncation="only_second",
                                                  max_length=max_length, padding=False,
                                                  return_attention_mask=False,
                                                  return_token_type_ids=False,
                                                  add_special_tokens=False)
                ids = item["input_ids"] + self.sep + prompt
                features.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
                qlens.append(len(a) + len(self.sep))
                plens.append(len(self.sep) + len(prompt))
        scores = None
        if self.mode == "matryoshka":
            scores = seed_scores(row, pos, negs)
        elif self.kd:
            scores = [row["pos_scores"][pos]] + [row["neg_scores"][j] for j in negs]
        return features, scores, qlens, plens

    def batch(self, rows, selections):
        """The collator: pad to the longest (rounded up), int64 arrays; flat float32 scores."""
        feats, scores, qlens, plens = [], [], [], []
        for sel in selections:
            f, s, q, p = self.group(rows[sel["row"]], sel["pos"], sel["neg"])
            feats += f
            scores += s or []
            qlens += q
            plens += p
        self.tok.padding_side = self.padding_side
        out = self.tok.pad(feats, padding=True, pad_to_multiple_of=self.pad_to_multiple_of,
                           return_tensors="np")
        arrays = {k: np.asarray(v) for k, v in out.items()}
        if self.kd or self.mode == "matryoshka":
            arrays["teacher_scores"] = np.asarray(scores, dtype=np.float32)
        if self.mode == "matryoshka":
            arrays["query_lengths"] = np.asarray(qlens, dtype=np.int64)
            arrays["prompt_lengths"] = np.asarray(plens, dtype=np.int64)
        return arrays
