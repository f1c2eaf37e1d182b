"""Packed batches through real Hugging Face models (issue 19): rankfeed.packing's scores and
gradients on a packed batch equal those of the same pairs padded, for tiny random-weight models
of every supported family (BERT, XLM-R, Qwen2, Qwen3, Llama, Mistral, Gemma), eager and SDPA,
eval and train mode (dropout 0); unsupported models are refused. Run with -s for a summary line
per case.

Families without a bundled tokenizer run on the sample BERT tokenizer's ids remapped into the
tiny model's vocabulary (the layout, lengths and boundaries are what matter). The real XLM-R and
Mistral tokenizers (tools/fetch_assets.sh; CI fetches them) are used when present, and those
cases are skipped locally when an asset is missing."""

import importlib.util
import time

import numpy as np
import pytest

import rankfeed
from conftest import ROOT, tokenizer_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

try:
    from rankfeed import packing
except ImportError:  # the installed wheel predates packing.py: load it from the source tree
    spec = importlib.util.spec_from_file_location(
        "rankfeed.packing", ROOT / "python" / "rankfeed" / "packing.py")
    packing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(packing)

BERT = ROOT / "data" / "sample" / "bert" / "tokenizer.json"
FIXTURE = ROOT / "tests" / "fixtures" / "roundtrip.jsonl"
B, G = 2, 3
KW = dict(batch_size=B, group_size=G, query_max_len=16, passage_max_len=32, shuffle=False)
ATOL = 1e-5
VOCAB = 1000
YES = 7


@pytest.fixture(scope="module")
def bert_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "bert"
    rankfeed.convert(FIXTURE, BERT, out, progress=False)
    return out


def batches(ds, mode, n=2):
    """n (packed, padded) pairs of the same batches."""
    data = rankfeed.Dataset(ds)
    packed = data.loader(packed=True, mode=mode, **KW)
    padded = data.loader(mode=mode, **KW)
    out = []
    for p, q, _ in zip(packed, padded, range(n)):
        assert p["rows"].tolist() == q["rows"].tolist() and p["neg"].tolist() == q["neg"].tolist()
        out.append((p, q))
    return out


def remap(batch, fn, drop=()):
    b = {k: v for k, v in batch.items() if k not in drop}
    b["input_ids"] = fn(b["input_ids"])
    return b


def xlmr_ids(ids):  # BERT pad 0 -> XLM-R pad 1; real tokens avoid the pad id
    return np.where(ids == 0, 1, 2 + ids % (VOCAB - 2))


def mod_ids(ids):
    return ids % VOCAB


def dec_kw(**extra):
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=256, attention_dropout=0.0, pad_token_id=0, **extra)


def enc_kw(**extra):
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=1, **extra)


# family -> (model factory(impl), mode, id remap, keys to drop, yes_id)
def _families():
    t = transformers

    def dec(model_cls, config_cls, **extra):
        return lambda impl: model_cls(config_cls(attn_implementation=impl, **dec_kw(**extra)))

    fams = {
        "bert": (lambda impl: t.BertForSequenceClassification(t.BertConfig(
            attn_implementation=impl, vocab_size=30522, max_position_embeddings=64, **enc_kw())),
            "encoder", None, (), None),
        "xlm-roberta": (lambda impl: t.XLMRobertaForSequenceClassification(t.XLMRobertaConfig(
            attn_implementation=impl, vocab_size=VOCAB, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, max_position_embeddings=66, type_vocab_size=1, **enc_kw())),
            "encoder", xlmr_ids, ("token_type_ids",), None),
        "qwen2": (dec(t.Qwen2ForCausalLM, t.Qwen2Config), "llm", mod_ids, (), YES),
        "qwen2-cls": (dec(t.Qwen2ForSequenceClassification, t.Qwen2Config, num_labels=1),
                      "llm", mod_ids, (), None),
        "llama": (dec(t.LlamaForCausalLM, t.LlamaConfig), "llm", mod_ids, (), YES),
        "mistral": (dec(t.MistralForCausalLM, t.MistralConfig), "llm", mod_ids, (), YES),
    }
    if hasattr(t, "Qwen3Config"):
        fams["qwen3"] = (dec(t.Qwen3ForCausalLM, t.Qwen3Config), "llm", mod_ids, (), YES)
    if hasattr(t, "GemmaConfig"):
        fams["gemma"] = (dec(t.GemmaForCausalLM, t.GemmaConfig), "llm", mod_ids, (), YES)
    return fams


FAMILIES = _families()
CASES = [(f, impl, att) for f in FAMILIES for impl in ("eager", "sdpa")
         for att in (("auto",) if FAMILIES[f][1] == "encoder" else ("auto", "mask"))]


def build(factory, impl):
    torch.manual_seed(0)
    model = factory(impl)
    assert model.config._attn_implementation == impl
    return model.float()


def loss_of(scores):
    return torch.nn.functional.cross_entropy(scores.view(B, G), torch.zeros(B, dtype=torch.long))


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def check_parity(model, pairs, yes_id, attention, label):
    """Scores in eval and train mode and every gradient agree between packed and padded."""
    t0 = time.perf_counter()
    worst = {"eval": 0.0, "train": 0.0, "grad": 0.0}
    for packed, padded in pairs:
        model.eval()
        with torch.no_grad():
            ref = packing.padded_scores(model, padded, yes_id=yes_id)
            got = packing.packed_scores(model, packed, yes_id=yes_id, attention=attention)
        assert got.shape == ref.shape == (B * G,)
        worst["eval"] = max(worst["eval"], float((got - ref).abs().max()))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)

        model.train()  # dropout is 0: train mode must not change anything either
        model.zero_grad(set_to_none=True)
        ref_t = packing.padded_scores(model, padded, yes_id=yes_id)
        loss_of(ref_t).backward()
        g_ref = grads(model)
        model.zero_grad(set_to_none=True)
        got_t = packing.packed_scores(model, packed, yes_id=yes_id, attention=attention)
        loss_of(got_t).backward()
        g_got = grads(model)
        worst["train"] = max(worst["train"], float((got_t - ref_t).detach().abs().max()))
        torch.testing.assert_close(got_t, ref_t, atol=ATOL, rtol=0)
        assert g_ref.keys() == g_got.keys()
        nonzero = 0
        for name in g_ref:
            worst["grad"] = max(worst["grad"], float((g_got[name] - g_ref[name]).abs().max()))
            torch.testing.assert_close(g_got[name], g_ref[name], atol=ATOL, rtol=0, msg=name)
            nonzero += bool(g_ref[name].abs().sum() > 0)
        assert nonzero > len(g_ref) // 2, "most parameters get a gradient"
    T = sum(int(p["cu_seqlens"][-1]) for p, _ in pairs)
    print(f"\n[packed-parity] {label}: {len(pairs)} batches, {len(pairs) * B * G} pairs, {T} "
          f"tokens; max|d score| eval {worst['eval']:.1e} train {worst['train']:.1e}; max|d grad| "
          f"{worst['grad']:.1e} over {len(g_ref)} tensors; {time.perf_counter() - t0:.2f}s")


@pytest.mark.parametrize("family,impl,attention", CASES, ids=["-".join(c) for c in CASES])
def test_packed_equals_padded(bert_ds, family, impl, attention):
    factory, mode, fn, drop, yes_id = FAMILIES[family]
    pairs = batches(bert_ds, mode)
    if fn is not None:
        pairs = [(remap(p, fn, drop), remap(q, fn, drop)) for p, q in pairs]
    # Every packed row is longer than one pair: the mask is what keeps pairs apart.
    assert all(int(p["cu_seqlens"][-1]) > 2 * int(p["max_seqlen"]) for p, _ in pairs)
    model = build(factory, impl)
    check_parity(model, pairs, yes_id, attention, f"{family} {impl} attention={attention}")


def test_encoder_row_longer_than_the_position_table(bert_ds):
    # XLM-R: max_position_embeddings 66, a packed row of 100+ tokens; explicit token_type_ids
    # avoid the buffered ones (66 long), offset positions match the padded model's.
    factory, mode, fn, drop, _ = FAMILIES["xlm-roberta"]
    packed, padded = [(remap(p, fn, drop), remap(q, fn, drop)) for p, q in batches(bert_ds, mode, 1)][0]
    model = build(factory, "eager").eval()
    assert int(packed["cu_seqlens"][-1]) > model.config.max_position_embeddings
    kw = packing.to_model_inputs(packed, model)
    assert kw["position_ids"].min() == model.config.pad_token_id + 1
    assert kw["attention_mask"].shape == (1, len(packed["input_ids"]), len(packed["input_ids"]))
    with torch.no_grad():
        ref = packing.padded_scores(model, padded)
        # Negative controls: without the offset the scores differ, and the model's own head on a
        # 1 x T row pools one token for the whole row.
        bad = {**kw, "position_ids": kw["position_ids"] - model.config.pad_token_id - 1}
        wrong = packing.pair_scores(model.base_model(**bad), packed, model)
        assert (wrong - ref).abs().max() > 1e-3
        assert model(**kw).logits.shape == (1, 1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        packing.to_model_inputs({**packed, "position_ids": packed["position_ids"] + 70}, model)


def test_decoders_need_use_cache_false(bert_ds):
    # transformers looks at position_ids for packing only without a cache: with the default
    # use_cache=True (eval) the pairs attend to each other and the scores differ.
    factory, mode, fn, drop, yes_id = FAMILIES["qwen2"]
    packed, padded = [(remap(p, fn, drop), remap(q, fn, drop)) for p, q in batches(bert_ds, mode, 1)][0]
    model = build(factory, "sdpa").eval()
    kw = packing.to_model_inputs(packed, model, attention="native")
    assert kw["use_cache"] is False and "attention_mask" not in kw
    assert kw["input_ids"].shape == kw["position_ids"].shape == (1, len(packed["input_ids"]))
    with torch.no_grad():
        ref = packing.padded_scores(model, padded, yes_id=yes_id)
        ok = packing.pair_scores(model(**kw), packed, model, score=yes_id)  # full-model logits
        cached = packing.pair_scores(model(**{**kw, "use_cache": True}), packed, model, score=yes_id)
    torch.testing.assert_close(ok, ref, atol=ATOL, rtol=0)
    assert (cached - ref).abs().max() > 1e-3


def test_padded_reference_handles_right_padding(bert_ds):
    # The reference itself: left- and right-padded llm batches score the same per pair.
    factory, mode, fn, drop, yes_id = FAMILIES["llama"]
    model = build(factory, "sdpa").eval()
    data = rankfeed.Dataset(bert_ds)
    left = next(iter(data.loader(mode=mode, padding_side="left", **KW)))
    right = next(iter(data.loader(mode=mode, padding_side="right", **KW)))
    assert (left["attention_mask"][:, 0] == 0).any() and (right["attention_mask"][:, -1] == 0).any()
    with torch.no_grad():
        a = packing.padded_scores(model, remap(left, fn), yes_id=yes_id)
        b = packing.padded_scores(model, remap(right, fn), yes_id=yes_id)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_flash_attention_kwargs(bert_ds):
    # No flash-attn on CPU: check the varlen arguments transformers' flash path reads.
    factory, mode, fn, drop, _ = FAMILIES["llama"]
    packed, _ = batches(bert_ds, mode, 1)[0]
    model = build(factory, "eager")
    model.config._attn_implementation = "flash_attention_2"
    kw = packing.to_model_inputs(packed, model)
    cu = packed["cu_seqlens"]
    assert "attention_mask" not in kw and kw["use_cache"] is False
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["cu_seq_lens_q"].tolist() == cu.tolist()
    assert kw["cu_seq_lens_k"].tolist() == cu.tolist()
    assert kw["max_length_q"] == kw["max_length_k"] == int(np.diff(cu).max())
    assert kw["input_ids"].shape == kw["position_ids"].shape == (1, int(cu[-1]))
    # BERT's forward (this transformers) takes no varlen arguments: refused, not ignored.
    bert = build(FAMILIES["bert"][0], "eager")
    bert.config._attn_implementation = "flash_attention_2"
    enc, _ = batches(bert_ds, "encoder", 1)[0]
    if not packing._takes_kwargs(bert.base_model):
        with pytest.raises(ValueError, match="flash-attention varlen"):
            packing.to_model_inputs(enc, bert)


def test_unsupported_models_are_refused(bert_ds):
    packed, padded = batches(bert_ds, "encoder", 1)[0]
    torch.manual_seed(0)
    model = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=1))
    for call in (lambda: packing.to_model_inputs(packed, model),
                 lambda: packing.packed_scores(model, packed),
                 lambda: packing.pair_scores(None, packed, model)):
        with pytest.raises(ValueError, match=r"does not support model_type 'distilbert'.*"
                                             r"bert, roberta, xlm-roberta.*padded batches"):
            call()
    bert = build(FAMILIES["bert"][0], "eager")
    with pytest.raises(ValueError, match="no cu_seqlens"):
        packing.packed_scores(bert, padded)
    with pytest.raises(ValueError, match="attention must be one of"):
        packing.to_model_inputs(packed, bert, attention="bogus")


# --- the real tokenizers (tools/fetch_assets.sh) ---------------------------------------------

def _vocab_and_pad(path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(path))
    pad = next((tok.token_to_id(t) for t in ("<pad>", "[PAD]") if tok.token_to_id(t) is not None),
               None)
    return tok.get_vocab_size(), pad


@pytest.mark.parametrize("asset", ["xlmr", "mistral"])
def test_packed_equals_padded_real_tokenizer(asset, tmp_path):
    path = tokenizer_path(asset)  # skips locally (fails in CI) when the asset is missing
    vocab, pad = _vocab_and_pad(path)
    out = tmp_path / asset
    rankfeed.convert(FIXTURE, path, out, progress=False)
    t = transformers
    torch.manual_seed(0)
    if asset == "xlmr":
        model = t.XLMRobertaForSequenceClassification(t.XLMRobertaConfig(
            attn_implementation="sdpa", vocab_size=vocab,
            pad_token_id=pad if pad is not None else 1, max_position_embeddings=130,
            type_vocab_size=1, **enc_kw()))
        mode, yes_id = "encoder", None
    else:
        model = t.MistralForCausalLM(t.MistralConfig(
            attn_implementation="sdpa", **{**dec_kw(), "vocab_size": vocab}))
        mode, yes_id = "llm", YES
    pairs = batches(out, mode)
    check_parity(model.float(), pairs, yes_id, "auto", f"{asset} tokenizer sdpa")
